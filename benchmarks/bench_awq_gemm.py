"""W4A16 (AWQ) matmul at Llama-2-7B shapes vs cuBLAS fp16, on CUDA.

Per linear (qkv 4096->12288, o 4096->4096, gate_up 4096->22016, down 11008->4096; group size 128) and batch M,
every kernel is first checked against reference.awq_linear (fp32 matmul on the dequantized weight), then timed
two ways:
- `awq_us` / `fp16_us`: CUDA-graph replay of back-to-back calls, each on its own copy of the weights (copies
  rotate through > 150 MB, three times the 50 MB L2, so every call streams its weights from HBM), divided by the
  number of calls: the kernel time plus the launch gap, as the engine's decode graphs run it.
- `awq_bench_us` / `fp16_bench_us`: triton.testing.do_bench medians (L2 flushed before each call); these include
  the Python launch path when it is slower than the GPU, which it is for the few-microsecond AWQ kernels.
AWQ is engine.kernels.awq_gemm.awq_linear_k with its default config, fp16 is torch.nn.functional.linear (cuBLAS)
on the dequantized weight. `GB/s` counts the bytes of the 4-bit weights (codes, zero points, scales; activations
are negligible at decode sizes), `frac_bw` divides by the measured device-to-device copy rate (read + write bytes
of a 4 GiB copy). `stream_us` is a plain Triton kernel that only reads the packed weights (the memory ceiling for
that size, launch and tail included).

`--sweep` also graph-times a grid of tile configs per (linear, M), compiled in parallel worker processes first,
and reports the best next to the default (to tune default_config). `--step`: the GEMV part of a decode step, all
32 layers' four linears (distinct random weights) plus the fp16 lm_head in one CUDA graph, AWQ vs fp16.

    python benchmarks/bench_awq_gemm.py --step --out bench-results/awq_gemm
    python benchmarks/bench_awq_gemm.py --sweep --out bench-results/awq_gemm
Writes <out>/awq_gemm.json and awq_gemm.md (and awq_gemm_sweep.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import graph_us  # noqa: E402

LINEARS = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}  # K, N
LM_HEAD = (4096, 32000)
NUM_LAYERS = 32
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GROUP = 128
DTYPE = torch.float16
ROTATE_BYTES = 160 * 2**20  # weight copies per linear: more than three L2s' worth


def weight_bytes(K: int, N: int, G: int = GROUP) -> int:
    return K * N // 2 + (K // G) * (N // 8) * 4 + (K // G) * N * 2


def make_awq(K: int, N: int, G: int, dtype, device, seed: int = 0):
    """Random AWQ weights: (K-packed qweight, qzeros, scales, checkpoint-layout qweight)."""
    from engine.kernels.awq_gemm import awq_repack

    gen = torch.Generator(device=device).manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31 - 1, (K, N // 8), dtype=torch.int32, device=device, generator=gen)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (K // G, N // 8), dtype=torch.int32, device=device, generator=gen)
    scales = (torch.rand(K // G, N, device=device, generator=gen) * 0.002 + 0.0005).to(dtype)
    return awq_repack(qweight, G), qzeros, scales, qweight


def copies(first, nbytes: int) -> list:
    """`first` plus clones up to ROTATE_BYTES in all (at least two)."""
    n = max(2, -(-ROTATE_BYTES // nbytes))
    return [first] + [tuple(t.clone() for t in first) if isinstance(first, tuple) else first.clone()
                      for _ in range(n - 1)]


def sweep_configs(M: int) -> list[dict]:
    """The tile grid `--sweep` times at batch M (entries override default_config)."""
    out = []

    def mma(**kw):
        out.append({"kernel": "mma", "max_split": 64, "programs_per_sm": 2, "num_stages": 3, **kw})

    def dec(**kw):  # decode sizes: weights on the MMA's M side, codes through the MMA as they are
        mma(SWAP_AB=True, FOLD=True, SPLIT_DOTS=True, **kw)

    def big(**kw):  # dequantize the tile, then MMA
        mma(FOLD=False, max_split=8, **kw)

    if M <= 16:
        bm = 8 if M <= 8 else 16
        for bn, stages, pps in itertools.product((64, 128), (3, 4), (3, 4, 5, 6)):
            dec(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=stages, programs_per_sm=pps)
        for bn, pps in itertools.product((64, 128), (3, 4, 6)):
            dec(BLOCK_M=bm, BLOCK_N=bn, num_warps=2, programs_per_sm=pps)
        if bm == 8:
            for pps in (2, 3):
                dec(BLOCK_M=bm, BLOCK_N=256, num_warps=4, programs_per_sm=pps)
        return out
    if M <= 32:
        for bn, warps, pps in itertools.product((64, 128), (4, 8), (3, 4)):
            dec(BLOCK_M=32, BLOCK_N=bn, num_warps=warps, programs_per_sm=pps)
        for bn, warps in ((64, 4), (128, 8)):
            big(BLOCK_M=32, BLOCK_N=bn, SWAP_AB=False, SPLIT_DOTS=False, num_warps=warps)
        return out
    dec(BLOCK_M=32, BLOCK_N=64, num_warps=4, programs_per_sm=4)
    dec(BLOCK_M=64, BLOCK_N=64, num_warps=4, programs_per_sm=4)
    for bm in (64, 128, 256):
        if bm > 2 * M:
            continue
        for stages in (2, 3):
            big(BLOCK_M=bm, BLOCK_N=64, SWAP_AB=False, SPLIT_DOTS=True, num_warps=8, num_stages=stages)
            big(BLOCK_M=bm, BLOCK_N=64, SWAP_AB=False, SPLIT_DOTS=False, num_warps=8, num_stages=stages)
    big(BLOCK_M=64, BLOCK_N=128, SWAP_AB=False, SPLIT_DOTS=False, num_warps=8)
    big(BLOCK_M=64, BLOCK_N=128, SWAP_AB=True, SPLIT_DOTS=True, num_warps=8)
    big(BLOCK_M=64, BLOCK_N=64, SWAP_AB=False, SPLIT_DOTS=False, num_warps=4)
    big(BLOCK_M=128, BLOCK_N=128, SWAP_AB=False, SPLIT_DOTS=True, num_warps=8, num_stages=4)
    return out


def short(cfg: dict | None) -> str:
    if not cfg:
        return "default"
    keys = ("kernel", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "programs_per_sm", "SWAP_AB", "FOLD",
            "SPLIT_DOTS", "DENORM")
    return " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


# ---- compile the sweep in worker processes --------------------------------------------------------------------
def _warm(job):
    """Worker: compile (into Triton's disk cache) the configs of `job` by running them once on the same shapes as
    the timing pass (same specializations, same cache keys)."""
    from engine.kernels.awq_gemm import awq_linear_k

    M, configs, dtype_name = job
    dtype = getattr(torch, dtype_name)
    for name in LINEARS:
        K, N = LINEARS[name]
        qk, qz, s, _ = make_awq(K, N, GROUP, dtype, "cuda")
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        for cfg in configs:
            try:
                awq_linear_k(x, qk, qz, s, GROUP, config=cfg)
            except Exception:  # noqa: BLE001, S112  (reported by the timing pass)
                continue
    torch.cuda.synchronize()


def precompile(configs_by_m, dtype, workers: int, per_job: int = 3) -> float:
    """Compile every config in `workers` processes (disjoint config chunks: no duplicate compiles)."""
    import multiprocessing as mp

    t0 = time.time()
    jobs = []
    for M, configs in configs_by_m.items():
        configs = [None, *configs]
        jobs += [(M, configs[i : i + per_job], str(dtype).split(".")[-1]) for i in range(0, len(configs), per_job)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_warm, jobs, chunksize=1)
    return time.time() - t0


# ---- timing ---------------------------------------------------------------------------------------------------
def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_us(fn) -> float:
    import triton.testing

    fn()
    return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def rotating(fn, weights, calls_min: int = 16) -> list:
    """fn(w) over the weight copies, round robin, at least calls_min calls."""
    n = max(calls_min, len(weights))
    return [lambda w=weights[i % len(weights)]: fn(w) for i in range(n)]


@triton.jit
def _stream_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Reads n int32 (grid-stride, BLOCK per step) and writes one xor per program: a pure weight-read ceiling."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


def stream_us(tensors) -> float:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(sms * 8, dtype=torch.int32, device="cuda")

    def run(t):
        _stream_kernel[(sms * 8,)](t, out, t.numel(), BLOCK=2048, num_warps=4)

    return graph_us(rotating(run, tensors))


def time_linear(name, ms, configs_by_m, copy_bw, deadline, rows, sweep_rows, errors, baseline=True) -> None:
    """Check and time one linear at every M: the default config and cuBLAS fp16 (baseline), the sweep configs."""
    from engine.kernels import reference
    from engine.kernels.awq_gemm import awq_linear_k, default_config

    K, N = LINEARS[name]
    qk, qz, s, qw = make_awq(K, N, GROUP, DTYPE, "cuda")
    w16 = reference.awq_dequantize(qw, qz, s, GROUP).t().contiguous()  # [N, K] fp16 for cuBLAS
    w32 = w16.float().t()
    nbytes = weight_bytes(K, N)
    awq_w = copies((qk, qz, s), nbytes)

    def frac(us):
        return nbytes / us / 1e3 * 1e9 / copy_bw

    def awq_time(x, cfg):
        return graph_us(rotating(lambda w: awq_linear_k(x, *w, GROUP, config=cfg), awq_w))

    if baseline:
        fp16_w = copies(w16, K * N * 2)
        stream = stream_us([w[0] for w in awq_w])
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        ref = x.float() @ w32
        r = {"linear": name, "K": K, "N": N, "M": M}
        if baseline:
            try:
                err = rel_err(awq_linear_k(x, qk, qz, s, GROUP), ref)
                awq = awq_time(x, None)
                awq_bench = bench_us(lambda x=x: awq_linear_k(x, qk, qz, s, GROUP))
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{name} M={M} default config: {type(exc).__name__}: {str(exc)[:300]}")
                err = awq = awq_bench = float("nan")
            fp16 = graph_us(rotating(lambda w, x=x: torch.nn.functional.linear(x, w), fp16_w))
            fp16_bench = bench_us(lambda x=x: torch.nn.functional.linear(x, w16))
            r.update(awq_us=awq, fp16_us=fp16, speedup=fp16 / awq, rel_err=err, stream_us=stream,
                     awq_bench_us=awq_bench, fp16_bench_us=fp16_bench,
                     config=short(default_config(M, N, K, GROUP)), **{"GB/s": nbytes / awq / 1e3,
                                                                      "frac_bw": frac(awq)})
            if err >= 2e-2:
                errors.append(f"{name} M={M} default config: rel_err {err:.3g}")
        best = None
        for cfg in configs_by_m.get(M, []):
            if time.time() > deadline:
                break
            try:
                e = rel_err(awq_linear_k(x, qk, qz, s, GROUP, config=cfg), ref)
                t = awq_time(x, cfg)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{name} M={M} {short(cfg)}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            sweep_rows.append({"linear": name, "M": M, "us": t, "frac_bw": frac(t), "rel_err": e,
                               "config": short(cfg)})
            if e >= 2e-2:
                errors.append(f"{name} M={M} {short(cfg)}: rel_err {e:.3g}")
            elif best is None or t < best[0]:
                best = (t, cfg)
        if best:
            r.update(best_us=best[0], best_frac_bw=frac(best[0]), best_config=short(best[1]))
        rows.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)


def decode_step(ms, dtype, device) -> list[dict]:
    """GEMV part of a decode step (32 layers x 4 linears + lm_head) in one CUDA graph, AWQ vs fp16 weights."""
    from engine.kernels.awq_gemm import awq_linear_k

    rows = []
    K0, V = LM_HEAD
    lm_head = torch.randn(V, K0, device=device, dtype=dtype) * 0.01
    awq_layers = []
    for layer in range(NUM_LAYERS):
        awq_layers.append({})
        for name, (K, N) in LINEARS.items():
            gen = torch.Generator(device=device).manual_seed(layer)
            qk = torch.randint(-(2**31), 2**31 - 1, (N, K // 8), dtype=torch.int32, device=device, generator=gen)
            qz = torch.randint(-(2**31), 2**31 - 1, (K // GROUP, N // 8), dtype=torch.int32, device=device,
                               generator=gen)
            s = (torch.rand(K // GROUP, N, device=device, generator=gen) * 0.002 + 0.0005).to(dtype)
            awq_layers[-1][name] = (qk, qz, s)
    for M in ms:
        xs = {K: torch.randn(M, K, device=device, dtype=dtype) for K in {k for k, _ in LINEARS.values()}}
        calls = [lambda w=w, x=xs[LINEARS[name][0]]: awq_linear_k(x, *w, GROUP)
                 for layer in awq_layers for name, w in layer.items()]
        awq_us = graph_us(calls) * len(calls)
        head_us = graph_us([lambda x=xs[K0]: torch.nn.functional.linear(x, lm_head)])
        rows.append({"M": M, "awq_linears_us": awq_us, "lm_head_us": head_us,
                     "awq_step_ms": (awq_us + head_us) / 1e3, "awq_tok_per_s_bound": M * 1e6 / (awq_us + head_us)})
    del awq_layers
    torch.cuda.empty_cache()
    fp16_layers = [{name: torch.randn(N, K, device=device, dtype=dtype) * 0.01 for name, (K, N) in LINEARS.items()}
                   for _ in range(NUM_LAYERS)]
    for r in rows:
        M = r["M"]
        xs = {K: torch.randn(M, K, device=device, dtype=dtype) for K in {k for k, _ in LINEARS.values()}}
        calls = [lambda w=w, x=xs[LINEARS[name][0]]: torch.nn.functional.linear(x, w)
                 for layer in fp16_layers for name, w in layer.items()]
        fp16_us = graph_us(calls) * len(calls)
        r.update(fp16_linears_us=fp16_us, fp16_step_ms=(fp16_us + r["lm_head_us"]) / 1e3,
                 fp16_tok_per_s_bound=M * 1e6 / (fp16_us + r["lm_head_us"]))
    del fp16_layers
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    from benchmarks.common import copy_bandwidth_bytes_per_s, markdown_table, save

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/awq_gemm"))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--linears", default=",".join(LINEARS))
    parser.add_argument("--sweep", action="store_true", help="time a grid of tile configs too")
    parser.add_argument("--sweep-ms", default="1,8,16,32,64,128,256")
    parser.add_argument("--workers", type=int, default=12, help="processes compiling the sweep configs")
    parser.add_argument("--step", action="store_true", help="decode-step estimate in a CUDA graph")
    parser.add_argument("--step-ms", default="1,8,16,64,256")
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds; the sweep stops there")
    args = parser.parse_args()
    t_start = time.time()
    device = torch.device("cuda")
    ms = [int(m) for m in args.ms.split(",")]
    names = args.linears.split(",")
    sweep_ms = [int(m) for m in args.sweep_ms.split(",")] if args.sweep else []
    configs_by_m = {M: sweep_configs(M) for M in sweep_ms}
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    if args.sweep:
        try:
            info["precompile_s"] = precompile(configs_by_m, DTYPE, args.workers)
            print(f"precompiled sweep configs in {info['precompile_s']:.0f} s", flush=True)
        except Exception as exc:  # noqa: BLE001  (the timing pass compiles what is missing)
            print(f"precompile failed: {exc!r}", flush=True)
    copy_bw = copy_bandwidth_bytes_per_s(device)
    info["copy_GBps"] = copy_bw / 1e9
    print(json.dumps(info), flush=True)
    rows, sweep_rows, errors, step = [], [], [], []

    def frac(nbytes, us):
        return nbytes / us / 1e3 * 1e9 / copy_bw

    def report():
        totals = []
        for M in ms:
            sel = [r for r in rows if r["M"] == M]
            if len(sel) == len(LINEARS):
                awq, fp16 = sum(r["awq_us"] for r in sel), sum(r["fp16_us"] for r in sel)
                nbytes = sum(weight_bytes(*LINEARS[r["linear"]]) for r in sel)
                totals.append({"M": M, "layer_awq_us": awq, "layer_fp16_us": fp16, "frac_bw": frac(nbytes, awq),
                               "layer_best_us": sum(r.get("best_us", r["awq_us"]) for r in sel),
                               "layer_stream_us": sum(r["stream_us"] for r in sel),
                               "x32_layers_awq_ms": NUM_LAYERS * awq / 1e3,
                               "x32_layers_fp16_ms": NUM_LAYERS * fp16 / 1e3})
        cols = ["linear", "M", "awq_us", "GB/s", "frac_bw", "fp16_us", "speedup", "stream_us", "awq_bench_us",
                "fp16_bench_us", "rel_err", "config"]
        if sweep_rows:
            cols += ["best_us", "best_frac_bw", "best_config"]
        md = [f"# AWQ W4A16 matmul, Llama-2-7B shapes ({info['device']}, torch {info['torch']}, triton "
              f"{info['triton']}), copy bandwidth {copy_bw / 1e9:.0f} GB/s", "", markdown_table(rows, cols), "",
              "## Per layer (sum of the four linears)", "",
              markdown_table(totals, ["M", "layer_awq_us", "layer_best_us", "layer_stream_us", "frac_bw",
                                      "layer_fp16_us", "x32_layers_awq_ms", "x32_layers_fp16_ms"])]
        if step:
            md += ["", "## Decode-step GEMVs in one CUDA graph (32 layers x 4 linears + fp16 lm_head)", "",
                   markdown_table(step, ["M", "awq_linears_us", "lm_head_us", "awq_step_ms", "awq_tok_per_s_bound",
                                         "fp16_linears_us", "fp16_step_ms", "fp16_tok_per_s_bound"])]
        if errors:
            md += ["", "## Errors", ""] + [f"- {e}" for e in errors[:60]]
        save(args.out, "awq_gemm", {"info": info, "rows": rows, "totals": totals, "step": step,
                                    "sweep": sweep_rows, "errors": errors}, "\n".join(md))
        if sweep_rows:
            ordered = sorted(sweep_rows, key=lambda r: (r["linear"], r["M"], r["us"] if r["us"] == r["us"] else 1e9))
            (args.out / "awq_gemm_sweep.md").write_text(
                markdown_table(ordered, ["linear", "M", "us", "frac_bw", "rel_err", "config"]) + "\n")

    # defaults first (saved), then the decode-step graph (saved), then the sweep: a late failure keeps the rest
    for name in names:
        time_linear(name, ms, {}, copy_bw, 0, rows, sweep_rows, errors)
        torch.cuda.empty_cache()
    report()
    if args.step:
        step += decode_step([int(m) for m in args.step_ms.split(",")], DTYPE, device)
        report()
    if args.sweep:
        by_key = {(r["linear"], r["M"]): r for r in rows}
        for M, name in itertools.product(sweep_ms, names):  # decode sizes first
            extra = []
            time_linear(name, [M], configs_by_m, copy_bw, t_start + args.deadline, extra, sweep_rows, errors,
                        baseline=False)
            for r in extra:
                if "best_us" in r and (r["linear"], r["M"]) in by_key:
                    by_key[(r["linear"], r["M"])].update({k: r[k] for k in ("best_us", "best_frac_bw", "best_config")})
            torch.cuda.empty_cache()
        report()
    print(f"total {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
