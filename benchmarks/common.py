"""Shared benchmark pieces: real model shapes as config-only folders (weights are random: `load_format=dummy`),
the device's measured ceilings (copy bandwidth, bf16 matmul rate), request drivers and table writers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from studio.workload import SHAPES, RequestTimer, make_shape_folder, markdown_table, percentile  # noqa: F401


def copy_bandwidth_bytes_per_s(device="cuda", size_bytes=4 * 2**30, iters=20) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written."""
    src = torch.empty(size_bytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * size_bytes / statistics.median(times)


def matmul_flops_per_s(device="cuda", n=8192, dtype=torch.bfloat16, iters=10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3)


def graph_us(calls, reps: int = 15) -> float:
    """Microseconds per call of `calls` (zero-argument callables) captured back to back in one CUDA graph:
    what a kernel costs inside the engine's decode graphs, without Python launch overhead."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    del graph
    return statistics.median(times) / len(calls)


def save(out: Path, name: str, data, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    (out / f"{name}.md").write_text(markdown + "\n")
    print(markdown, flush=True)
