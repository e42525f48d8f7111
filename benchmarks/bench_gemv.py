"""Decode-size matmuls at Llama-2-7B shapes on CUDA: the dense GEMV kernel (engine/kernels/gemv.py) vs cuBLAS, and
what programmatic dependent launch (PDL) buys in a chain of kernels.

- `chain`: the non-attention part of a batch-1 decode step as the engine runs it, in one CUDA graph: per layer
  add+RMSNorm, qkv, o (its input a strided slice of the qkv output), add+RMSNorm, gate_up, SiLU-and-mul, down;
  32 layers with their own weights, then the lm_head. Variants: fp16 weights through cuBLAS / the GEMV kernel
  without / with PDL; W4A16 (AWQ, group 128) without / with PDL.
  `frac_bw` = bytes of all weights read / step time / measured copy rate (read + write bytes of a 4 GiB copy).
- `--sweep`: per linear and batch M, graph-timed tile configs of the GEMV kernel next to cuBLAS (weights rotate
  through copies larger than the L2, so every call streams from HBM).

    python benchmarks/bench_gemv.py --out bench-results/gemv [--sweep]
Writes <out>/gemv.json and gemv.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SHAPES, copy_bandwidth_bytes_per_s, graph_us, markdown_table, save  # noqa: E402

LINEARS = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096),
           "lm_head": (4096, 32000)}  # K, N
HIDDEN, INTER, LAYERS, VOCAB, GROUP = 4096, 11008, 32, 32000, 128
DTYPE = torch.float16
ROTATE_BYTES = 200 * 2**20


def random_awq(K, N, gen):
    qk = torch.randint(-(2**31), 2**31 - 1, (N, K // 8), dtype=torch.int32, device="cuda", generator=gen)
    qz = torch.randint(-(2**31), 2**31 - 1, (K // GROUP, N // 8), dtype=torch.int32, device="cuda", generator=gen)
    s = (torch.rand(K // GROUP, N, device="cuda", generator=gen) * 0.002 + 0.0005).to(DTYPE)
    return qk, qz, s


def chain(awq: bool, awq_config: dict | None = None, fuse_silu: bool = True) -> tuple[float, int]:
    """-> (µs per decode step of the chain, weight bytes read per step)."""
    from engine.kernels import ops
    from engine.kernels.awq_gemm import awq_linear_k

    gen = torch.Generator(device="cuda").manual_seed(0)
    layers, nbytes = [], 0
    for _ in range(LAYERS):
        layer = {}
        for name in ("qkv", "o", "gate_up", "down"):
            K, N = LINEARS[name]
            if awq:
                layer[name] = random_awq(K, N, gen)
                nbytes += sum(t.numel() * t.element_size() for t in layer[name])
            else:
                layer[name] = torch.randn(N, K, device="cuda", generator=gen, dtype=DTYPE) * 0.02
                nbytes += N * K * 2
        layer["norm1"] = torch.ones(HIDDEN, device="cuda", dtype=DTYPE)
        layer["norm2"] = torch.ones(HIDDEN, device="cuda", dtype=DTYPE)
        nbytes += 4 * HIDDEN
        layers.append(layer)
    lm_head = torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen, dtype=DTYPE) * 0.02
    nbytes += VOCAB * HIDDEN * 2
    x0 = torch.randn(1, HIDDEN, device="cuda", dtype=DTYPE)

    def lin(x, w, silu_mul=False):
        if awq:
            return awq_linear_k(ops.silu_and_mul(x) if silu_mul else x, *w, GROUP, config=awq_config)
        return ops.silu_mul_linear(x, w) if silu_mul else ops.linear(x, w)

    def step():
        x, res = x0, torch.zeros_like(x0)
        for layer in layers:
            h, res = ops.rms_norm(x, layer["norm1"], 1e-5, res)
            qkv = lin(h, layer["qkv"])
            x = lin(qkv[:, :HIDDEN], layer["o"])  # strided rows, as the attention output would not be
            h, res = ops.rms_norm(x, layer["norm2"], 1e-5, res)
            gate_up = lin(h, layer["gate_up"])
            if fuse_silu:
                x = lin(gate_up, layer["down"], silu_mul=True)
            else:
                x = lin(ops.silu_and_mul(gate_up), layer["down"])
        return ops.linear(x, lm_head)

    us = graph_us([step], reps=20)
    layers.clear()
    torch.cuda.empty_cache()
    return us, nbytes


def sweep_configs(M: int) -> list[dict]:
    out = []
    if M == 1:
        for bn, bk, warps, pps in itertools.product((2, 4, 8, 16), (512, 1024, 2048), (4, 8), (4, 8, 12)):
            if bn * bk <= 16384:
                out.append(dict(DOT=False, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, programs_per_sm=pps, max_split=32))
    for bn, bk, warps, pps in itertools.product((16, 32, 64, 128), (64, 128, 256), (4,), (2, 4, 8)):
        if bn * bk <= 16384:
            out.append(dict(DOT=True, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, programs_per_sm=pps, max_split=32))
    return out


def shape_linears(shape: str) -> dict:
    """(K, N) of a model shape's linears (benchmarks/common.SHAPES)."""
    c = SHAPES[shape]
    h, i, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    d = h // heads
    qkv = (heads + 2 * c["num_key_value_heads"]) * d
    return {"qkv": (h, qkv), "o": (heads * d, h), "gate_up": (h, 2 * i), "down": (i, h),
            "lm_head": (h, c["vocab_size"])}


def sweep(ms, copy_bw, deadline, rows, errors, linears=LINEARS, shape="llama2-7b", dtype=DTYPE) -> None:
    from engine.kernels.gemv import default_config, gemv

    for name, (K, N) in linears.items():
        w0 = torch.randn(N, K, device="cuda", dtype=dtype) * 0.02
        ws = [w0] + [w0.clone() for _ in range(max(1, ROTATE_BYTES // (N * K * 2)))]
        nbytes = N * K * 2
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            ref = x.float() @ w0.float().t()

            def t_of(fn, ws=ws, x=x):
                return graph_us([lambda w=ws[i % len(ws)]: fn(x, w) for i in range(max(16, len(ws)))])

            cublas = t_of(torch.nn.functional.linear)
            default = t_of(gemv)
            r = {"shape": shape, "linear": name, "M": M, "cublas_us": cublas, "gemv_us": default,
                 "cublas_frac_bw": nbytes / cublas * 1e6 / copy_bw, "gemv_frac_bw": nbytes / default * 1e6 / copy_bw,
                 "config": json.dumps(default_config(M, N, K))}
            best = None
            for cfg in sweep_configs(M):
                if time.time() > deadline:
                    break
                try:
                    err = ((gemv(x, w0, config=cfg).float() - ref).norm() / ref.norm()).item()
                    t = t_of(lambda x, w, cfg=cfg: gemv(x, w, config=cfg))
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{name} M={M} {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                if err > 5e-3:
                    errors.append(f"{name} M={M} {cfg}: rel_err {err:.3g}")
                elif best is None or t < best[0]:
                    best = (t, cfg)
            if best:
                r.update(best_us=best[0], best_frac_bw=nbytes / best[0] * 1e6 / copy_bw,
                         best_config=json.dumps(best[1]))
            rows.append(r)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
        ws.clear()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/gemv"))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-ms", default="1,2,4,8")
    parser.add_argument("--deadline", type=float, default=200.0, help="seconds; the sweep stops there")
    parser.add_argument("--sweep-shapes", default="llama2-7b", help="model shapes (benchmarks/common.SHAPES)")
    parser.add_argument("--no-chain", action="store_true")
    args = parser.parse_args()
    t0 = time.time()
    copy_bw = copy_bandwidth_bytes_per_s()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "copy_GBps": copy_bw / 1e9}
    print(json.dumps(info), flush=True)
    chains, rows, errors = [], [], []
    variants = [
        ("fp16 cuBLAS", False, None, True, dict(ENGINE_GEMV="0", ENGINE_PDL="0")),
        ("fp16 GEMV", False, None, True, dict(ENGINE_GEMV="1", ENGINE_PDL="0")),
        ("fp16 GEMV + PDL", False, None, True, dict(ENGINE_GEMV="1", ENGINE_PDL="1")),
        ("fp16 GEMV + PDL, separate SiLU", False, None, False, dict(ENGINE_GEMV="1", ENGINE_PDL="1")),
        ("W4A16", True, None, True, dict(ENGINE_PDL="0")),
        ("W4A16 + PDL", True, None, True, dict(ENGINE_PDL="1")),
    ]
    for label, awq, cfg, fuse_silu, variables in [] if args.no_chain else variants:
        try:
            with mock.patch.dict(os.environ, variables):  # the kernels read these at launch
                us, nbytes = chain(awq, cfg, fuse_silu)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"chain {label}: {type(exc).__name__}: {str(exc)[:300]}")
            print(errors[-1], flush=True)
            continue
        chains.append({"variant": label, "step_us": us, "weights_MB": nbytes / 1e6,
                       "frac_bw": nbytes / us * 1e6 / copy_bw, "tok_s_bound": 1e6 / us})
        print(json.dumps(chains[-1]), flush=True)

    def report():
        md = [f"# Decode-size matmuls, Llama-2-7B shapes ({info['device']}, torch {info['torch']}, triton "
              f"{info['triton']}), copy {copy_bw / 1e9:.0f} GB/s", "",
              "## Decode step without attention, one CUDA graph", "",
              markdown_table(chains, ["variant", "step_us", "weights_MB", "frac_bw", "tok_s_bound"])]
        if rows:
            cols = ["shape", "linear", "M", "cublas_us", "cublas_frac_bw", "gemv_us", "gemv_frac_bw", "best_us",
                    "best_frac_bw", "best_config"]
            md += ["", "## Per linear", "", markdown_table(rows, cols)]
        if errors:
            md += ["", "## Errors", ""] + [f"- {e}" for e in errors[:40]]
        save(args.out, "gemv", {"info": info, "chain": chains, "rows": rows, "errors": errors}, "\n".join(md))

    report()
    if args.sweep:
        for shape in args.sweep_shapes.split(","):
            dtype = torch.float16 if SHAPES[shape]["torch_dtype"] == "float16" else torch.bfloat16
            with mock.patch.dict(os.environ, {"ENGINE_PDL": "1"}):
                sweep([int(m) for m in args.sweep_ms.split(",")], copy_bw, t0 + args.deadline, rows, errors,
                      shape_linears(shape), shape, dtype)
        report()
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
