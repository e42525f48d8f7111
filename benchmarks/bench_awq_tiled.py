"""W4A16 on the tile-contiguous layout (engine/kernels/awq_tiled.py) vs the current K-packed kernel
(engine/kernels/awq_gemm.py) vs cuBLAS fp16, at the Llama-2-7B linear shapes, on CUDA.

Per linear (qkv 4096->12288, o 4096->4096, gate_up 4096->22016, down 11008->4096; group 128, fp16) and M in
1, 16, 64, 256: every kernel is checked against x @ W (fp32, W dequantized exactly), then CUDA-graph timed over
weight copies rotated through > 160 MB (three L2s: every call reads HBM), as bench_awq_gemm.py does:
- `packed_us`: awq_gemm.awq_linear_k, its default config (the engine today);
- `tiled_us`: awq_tiled.awq_tiled_linear, its default config; `best_us` / `best_config`: the best of a small sweep;
- `fp16_us`: torch.nn.functional.linear on the dequantized fp16 weight (cuBLAS);
- `stream_us`: a read-only Triton pass over the tiled buffer (the memory ceiling for these bytes).
`frac_*` = 4-bit weight bytes (codes + zeros + scales, the checkpoint's count) / time / measured copy rate.
The sweep's kernels compile first in worker processes; the sweep stops at --deadline seconds.

    python benchmarks/bench_awq_tiled.py --out bench-results/awq_tiled
Writes <out>/awq_tiled.json and awq_tiled.md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LINEARS = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}  # K, N
MS = (1, 16, 64, 256)
GROUP = 128
DTYPE = torch.float16
ROTATE_BYTES = 160 * 2**20


def weight_bytes(K: int, N: int, G: int = GROUP) -> int:
    return K * N // 2 + (K // G) * (N // 8) * 4 + (K // G) * N * 2


def sweep_configs(M: int) -> list[dict]:
    """Entries override awq_tiled.default_config; a few per M (the whole sweep compiles in seconds)."""
    def fold(**kw):
        return dict(SWAP_AB=True, FOLD=True, SPLIT_DOTS=True, max_split=64, **kw)

    def deq(**kw):
        return dict(FOLD=False, SPLIT_DOTS=False, **kw)

    if M <= 8:
        return [fold(BLOCK_M=8, BLOCK_N=bn, num_warps=4, num_stages=st, programs_per_sm=pps)
                for bn, st, pps in ((128, 3, 4), (128, 5, 4), (128, 4, 6), (128, 4, 8), (64, 4, 8), (64, 6, 6))] + [
            fold(BLOCK_M=8, BLOCK_N=128, num_warps=4, num_stages=4, programs_per_sm=4, EVICT="evict_first"),
            fold(BLOCK_M=8, BLOCK_N=128, num_warps=2, num_stages=4, programs_per_sm=6)]
    if M <= 32:
        bm = triton.next_power_of_2(M)
        return [fold(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, programs_per_sm=pps)
                for bn, w, st, pps in ((128, 4, 3, 4), (128, 4, 5, 4), (128, 4, 4, 6), (64, 4, 4, 6), (64, 2, 4, 8),
                                       (128, 8, 4, 4))]
    if M <= 64:
        return [deq(BLOCK_M=64, BLOCK_N=128, SWAP_AB=True, num_warps=w, num_stages=st, programs_per_sm=2,
                    max_split=ms) for w, st, ms in ((4, 3, 1), (4, 4, 2), (8, 3, 2), (8, 4, 4), (4, 3, 4))] + [
            deq(BLOCK_M=64, BLOCK_N=64, SWAP_AB=False, num_warps=4, num_stages=3, programs_per_sm=2, max_split=4),
            fold(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3, programs_per_sm=2)]
    return [deq(BLOCK_M=bm, BLOCK_N=bn, SWAP_AB=sw, num_warps=8, num_stages=st, programs_per_sm=2, max_split=ms)
            for bm, bn, sw, st, ms in ((128, 128, True, 3, 1), (128, 128, True, 3, 2), (256, 128, True, 3, 1),
                                       (128, 64, False, 3, 2), (256, 64, False, 3, 1), (64, 128, True, 4, 2))]


def short(cfg: dict | None) -> str:
    if not cfg:
        return "default"
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "programs_per_sm", "max_split", "SWAP_AB", "FOLD",
            "EVICT")
    names = {"BLOCK_M": "bm", "BLOCK_N": "bn", "num_warps": "w", "num_stages": "st", "programs_per_sm": "pps",
             "max_split": "split", "SWAP_AB": "swap", "FOLD": "fold", "EVICT": "evict"}
    return " ".join(f"{names[k]}={int(cfg[k]) if isinstance(cfg[k], bool) else cfg[k]}" for k in keys
                    if k in cfg and cfg[k] != "")


def make_weights(K: int, N: int, device, seed: int = 0):
    """(checkpoint qweight, qzeros, scales) random, as bench_awq_gemm.make_awq."""
    gen = torch.Generator(device=device).manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31 - 1, (K, N // 8), dtype=torch.int32, device=device, generator=gen)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (K // GROUP, N // 8), dtype=torch.int32, device=device,
                           generator=gen)
    scales = (torch.rand(K // GROUP, N, device=device, generator=gen) * 0.002 + 0.0005).to(DTYPE)
    return qweight, qzeros, scales


# ---- compile the sweep in worker processes --------------------------------------------------------------------
def _warm(job):
    from engine.kernels.awq_tiled import awq_tile_repack, awq_tiled_linear

    M, configs = job
    for K, N in LINEARS.values():
        qw, qz, s = make_weights(K, N, "cuda")
        packed = awq_tile_repack(qw, qz, s, GROUP)
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        for cfg in configs:
            try:
                awq_tiled_linear(x, packed, N, GROUP, DTYPE, config=cfg)
            except Exception:  # noqa: BLE001, S112  (reported by the timing pass)
                continue
    torch.cuda.synchronize()


def precompile(ms, workers: int) -> float:
    import multiprocessing as mp

    t0 = time.time()
    jobs = []
    for M in ms:
        configs = [None, *sweep_configs(M)]
        jobs += [(M, configs[i : i + 2]) for i in range(0, len(configs), 2)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_warm, jobs, chunksize=1)
    return time.time() - t0


# ---- timing ---------------------------------------------------------------------------------------------------
def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def copies(first, nbytes: int) -> list:
    n = max(2, -(-ROTATE_BYTES // nbytes))
    return [first] + [tuple(t.clone() for t in first) if isinstance(first, tuple) else first.clone()
                      for _ in range(n - 1)]


def rotating(fn, weights, calls_min: int = 16) -> list:
    n = max(calls_min, len(weights))
    return [lambda w=weights[i % len(weights)]: fn(w) for i in range(n)]


@triton.jit
def _stream_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Reads n int32 (grid-stride) and writes one xor per program: a pure weight-read ceiling."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


def bench_linear(name, ms, copy_bw, sms, sweep, deadline, errors) -> list[dict]:
    """Check and time one linear at every M: K-packed default, tiled default, tiled sweep, cuBLAS, stream."""
    from benchmarks.common import graph_us
    from engine.kernels import reference
    from engine.kernels.awq_gemm import awq_linear_k, awq_repack
    from engine.kernels.awq_tiled import awq_tile_repack, awq_tiled_linear, default_config

    K, N = LINEARS[name]
    qw, qz, s = make_weights(K, N, "cuda")
    w32 = reference.awq_dequantize(qw, qz, s.float(), GROUP)  # [K, N] exact
    w16 = w32.t().contiguous().to(DTYPE)  # [N, K] for cuBLAS
    nbytes = weight_bytes(K, N)
    packed_w = copies((awq_repack(qw, GROUP), qz, s), nbytes)
    tiled_w = copies(awq_tile_repack(qw, qz, s, GROUP), nbytes)
    fp16_w = copies(w16, K * N * 2)
    stream_out = torch.empty(sms * 8, dtype=torch.int32, device="cuda")

    def stream_pass(t):
        flat = t.view(torch.int32).view(-1)
        _stream_kernel[(sms * 8,)](flat, stream_out, flat.numel(), BLOCK=2048, num_warps=4)

    stream = graph_us(rotating(stream_pass, tiled_w))

    def frac(us):
        return nbytes / (us * 1e-6) / copy_bw

    def timed(label, M, ref, fn, check, weights):
        try:
            err = rel_err(check(), ref)
            if err >= 2e-2:
                errors.append(f"{name} M={M} {label}: rel_err {err:.3g}")
                return float("nan")
            return graph_us(rotating(fn, weights))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{name} M={M} {label}: {type(exc).__name__}: {str(exc)[:200]}")
            return float("nan")

    rows = []
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        ref = x.float() @ w32
        r = {"linear": name, "M": M}
        r["packed_us"] = timed("packed", M, ref, lambda w, x=x: awq_linear_k(x, *w, GROUP),
                               lambda x=x: awq_linear_k(x, *packed_w[0], GROUP), packed_w)
        r["tiled_us"] = timed("tiled default", M, ref, lambda w, x=x: awq_tiled_linear(x, w, N, GROUP, DTYPE),
                              lambda x=x: awq_tiled_linear(x, tiled_w[0], N, GROUP, DTYPE), tiled_w)
        r["fp16_us"] = graph_us(rotating(lambda w, x=x: torch.nn.functional.linear(x, w), fp16_w))
        r["stream_us"] = stream
        best = (r["tiled_us"], "default") if r["tiled_us"] == r["tiled_us"] else (float("inf"), "-")
        for cfg in sweep_configs(M) if sweep else []:
            if time.time() > deadline:
                errors.append(f"deadline: sweep cut at {name} M={M}")
                break
            us = timed("tiled " + short(cfg), M, ref,
                       lambda w, x=x, c=cfg: awq_tiled_linear(x, w, N, GROUP, DTYPE, config=c),
                       lambda x=x, c=cfg: awq_tiled_linear(x, tiled_w[0], N, GROUP, DTYPE, config=c), tiled_w)
            if us < best[0]:
                best = (us, short(cfg))
        r.update(best_us=best[0], best_config=best[1], frac_packed=frac(r["packed_us"]),
                 frac_tiled=frac(r["tiled_us"]), frac_best=frac(best[0]), frac_stream=frac(stream),
                 best_vs_fp16=r["fp16_us"] / best[0], best_vs_packed=r["packed_us"] / best[0],
                 default_config=short(default_config(M, N, K, GROUP)))
        rows.append(r)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    return rows


def main() -> None:
    from benchmarks.common import copy_bandwidth_bytes_per_s, markdown_table, save

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/awq_tiled"))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--linears", default=",".join(LINEARS))
    parser.add_argument("--no-sweep", action="store_true", help="defaults only")
    parser.add_argument("--workers", type=int, default=12, help="processes compiling the sweep")
    parser.add_argument("--deadline", type=float, default=200.0, help="seconds; the sweep stops there")
    args = parser.parse_args()
    t_start = time.time()
    ms = [int(m) for m in args.ms.split(",")]
    names = args.linears.split(",")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    if not args.no_sweep:
        try:
            info["precompile_s"] = round(precompile(ms, args.workers), 1)
        except Exception as exc:  # noqa: BLE001  (the timing pass compiles what is missing)
            print(f"precompile failed: {exc!r}", flush=True)
    copy_bw = copy_bandwidth_bytes_per_s("cuda")
    info["copy_GBps"] = round(copy_bw / 1e9)
    print(json.dumps(info), flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, errors = [], []
    for name in names:
        rows += bench_linear(name, ms, copy_bw, sms, not args.no_sweep, t_start + args.deadline, errors)
        torch.cuda.empty_cache()
    cols = ["linear", "M", "packed_us", "tiled_us", "best_us", "fp16_us", "stream_us", "frac_packed", "frac_tiled",
            "frac_best", "frac_stream", "best_vs_packed", "best_vs_fp16", "best_config"]
    totals = []
    for M in ms:
        sel = [r for r in rows if r["M"] == M]
        tot = {"M": M, **{k: sum(r[k] for r in sel) for k in ("packed_us", "tiled_us", "best_us", "fp16_us",
                                                              "stream_us")}}
        nbytes = sum(weight_bytes(*LINEARS[r["linear"]]) for r in sel)
        tot.update(frac_best=nbytes / (tot["best_us"] * 1e-6) / copy_bw, best_vs_fp16=tot["fp16_us"] / tot["best_us"])
        totals.append(tot)
    md = [f"# W4A16 tiled layout vs K-packed vs cuBLAS fp16, Llama-2-7B linears ({info['device']}, torch "
          f"{info['torch']}, triton {info['triton']}), copy rate {copy_bw / 1e9:.0f} GB/s", "",
          markdown_table(rows, cols), "", "## Per layer (sum of the four linears)", "",
          markdown_table(totals, ["M", "packed_us", "tiled_us", "best_us", "fp16_us", "stream_us", "frac_best",
                                  "best_vs_fp16"])]
    if errors:
        md += ["", "## Errors", ""] + [f"- {e}" for e in errors[:40]]
    md += ["", f"total {time.time() - t_start:.0f} s"]
    save(args.out, "awq_tiled", {"info": info, "rows": rows, "totals": totals, "errors": errors}, "\n".join(md))


if __name__ == "__main__":
    main()
