"""Kernel micro-benchmarks on CUDA: every Triton op at Llama-2-7B (MHA, 32/32 heads) and Llama-3-8B (GQA, 32/8)
shapes, head_dim 128, fp16 activations, KV cache fp16 / int8 / int4 (block size 64).

Times are triton.testing.do_bench medians (`time_us`; L2 flushed before each call, launch overhead included when
the CPU is the slower side). Decode attention is also timed the way the engine runs it (`graph_us`): 32 calls
captured back to back in one CUDA graph, like a decode step's layers, each on its own cache blocks, so every call
reads its K/V from HBM and no Python or launch overhead is counted. `MB` counts the bytes a kernel must move
(inputs read once, outputs written once; for attention all cached K/V of the batch plus their scales, q and the
output), so `GB/s` over the device's copy bandwidth (measured here: a large device-to-device torch copy, read +
write bytes) says how close a kernel runs to the memory roofline (`frac_copy_bw` from do_bench, `frac_bw_graph`
from the graph time). Prefill rows also give TFLOP/s (causal: half the QK^T and PV products). A second table
sweeps tile configs and split counts at a few decode / prefill shapes, to tune the defaults.

    python -m benchmarks.bench_kernels --out bench-results/kernels   # writes kernels.json and kernels.md
    python -m benchmarks.bench_kernels --only decode --out ...        # decode attention rows + decode sweep only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import graph_us, markdown_table
from engine.kernels.reference import KV_GROUPS

MODELS = {  # name -> hidden, intermediate, q heads, kv heads, head_dim
    "llama2-7b": {"hidden": 4096, "inter": 11008, "hq": 32, "hk": 32, "d": 128},
    "llama3-8b": {"hidden": 4096, "inter": 14336, "hq": 32, "hk": 8, "d": 128},
}
KV_FORMATS = {"fp16": 0, "int8": 8, "int4": 4}
DECODE_BATCHES = (1, 16, 64)
DECODE_CONTEXTS = (1024, 8192)
PREFILL_TOKENS = 2048
BLOCK_SIZE = 64
DTYPE = torch.float16
SWEEP_DEADLINE_S = 140.0  # the sweep stops here so the whole run stays under 3 minutes on an H200


def bench_ms(fn, *args, **kwargs) -> float:
    """Median milliseconds of fn(*args, **kwargs) (binding the arguments now, not at call time)."""
    import triton.testing

    def call():
        return fn(*args, **kwargs)

    call()  # compile outside the timed region
    return triton.testing.do_bench(call, warmup=10, rep=40, return_mode="median")


def copy_bandwidth(device) -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(2**31, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(dst.copy_, src)
    del src, dst
    return 2 * 2**31 / (ms * 1e-3)


def row(kernel, model, case, kv, ms, nbytes, copy_bw, **extra) -> dict:
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {"kernel": kernel, "model": model, "case": case, "kv": kv, "time_us": ms * 1e3, "MB": nbytes / 1e6,
            "GB/s": gbps, "frac_copy_bw": gbps * 1e9 / copy_bw, **extra}


class PagedKV:
    """One layer's paged cache with room for `num_tokens` tokens, random contents, shuffled block order."""

    def __init__(self, num_tokens, num_kv_heads, head_dim, quant_policy, device):
        self.quant_policy, self.num_kv_heads, self.head_dim = quant_policy, num_kv_heads, head_dim
        self.num_blocks = num_tokens // BLOCK_SIZE
        stored = head_dim // 2 if quant_policy == 4 else head_dim
        shape = (self.num_blocks, BLOCK_SIZE, num_kv_heads, stored)
        if quant_policy == 0:
            self.k, self.v = (torch.randn(shape, dtype=DTYPE, device=device) for _ in range(2))
            self.k_sz = self.v_sz = None
        else:
            self.k = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
            v_storage = (self.num_blocks, num_kv_heads, stored, BLOCK_SIZE)  # token-minor, as the engine allocates
            self.v = torch.randint(0, 256, v_storage, dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
            groups = KV_GROUPS[quant_policy]  # (scale, min) pairs per head vector
            sz = torch.empty((self.num_blocks, num_kv_heads, groups, BLOCK_SIZE, 2), dtype=torch.float16, device=device)
            sz[..., 0].uniform_(0.005, 0.05)
            sz[..., 1].uniform_(-2.0, -1.0)
            self.k_sz, self.v_sz = sz, sz.clone()
        self.perm = torch.randperm(self.num_blocks, device=device).to(torch.int32)

    def block_tables(self, batch, context, index=0):
        """The index-th of the disjoint [batch, context / BLOCK_SIZE] tables the cache holds (wrapping around)."""
        per_seq = context // BLOCK_SIZE
        n = batch * per_seq
        start = (index % (self.num_blocks // n)) * n
        return self.perm[start : start + n].view(batch, per_seq)

    def num_tables(self, batch, context) -> int:
        return self.num_blocks // (batch * context // BLOCK_SIZE)

    def bytes_per_token(self) -> int:
        """K and V bytes one cached token costs (codes plus their (scale, min) pairs when quantized)."""
        stored = self.head_dim // 2 if self.quant_policy == 4 else self.head_dim
        elt = 2 if self.quant_policy == 0 else 1
        sz = KV_GROUPS[self.quant_policy] * 2 * 2 if self.quant_policy else 0
        return 2 * self.num_kv_heads * (stored * elt + sz)

    def args(self):
        return self.k, self.v

    def scales(self):
        return self.k_sz, self.v_sz, self.quant_policy

    def old_args(self):
        """K/V in the pre-change layout, V head_dim-contiguous (for the --baseline kernel)."""
        if not self.quant_policy:
            return self.k, self.v
        if not hasattr(self, "_old_v"):
            self._old_v = self.v.contiguous()
        return self.k, self._old_v

    def old_scales(self):
        """The scales in the pre-change [num_blocks, block_size, Hk, 2] layout (for the --baseline kernel)."""
        if not self.quant_policy:
            return None, None, 0
        if not hasattr(self, "_old"):
            self._old = tuple(t[:, :, 0].permute(0, 2, 1, 3).contiguous() for t in (self.k_sz, self.v_sz))
        return (*self._old, self.quant_policy)


GRAPH_CALLS = 32  # decode calls per timed graph: one per layer of a 7B/8B model


def decode_graph_us(launch, cache: PagedKV, q, batch, context, scales=None, kv=None) -> float:
    """Graph time of `launch(q, k, v, tables, lens, scale, k_sz, v_sz, qp)` over GRAPH_CALLS disjoint block tables."""
    d = q.shape[-1]
    lens = torch.full((batch,), context, dtype=torch.int32, device=q.device)
    scales = scales or cache.scales()
    kv = kv or cache.args()
    tables = [cache.block_tables(batch, context, i) for i in range(min(GRAPH_CALLS, cache.num_tables(batch, context)))]
    calls = [
        (lambda t=tables[i % len(tables)]: launch(q, *kv, t, lens, d**-0.5, *scales))
        for i in range(GRAPH_CALLS)
    ]
    return graph_us(calls)


def baseline_module(name="benchmarks._baseline_decode"):
    """benchmarks/_baseline_*.py: a kernel as it was before the quantized-KV rewrite (old scale layout), if present."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def bench_elementwise(model, cfg, copy_bw, device) -> list[dict]:
    from engine.kernels.activation import silu_and_mul
    from engine.kernels.rms_norm import rms_norm
    from engine.kernels.rotary import apply_rotary

    rows, h, e = [], cfg["hidden"], 2
    for n in (64, PREFILL_TOKENS):
        x = torch.randn(n, h, dtype=DTYPE, device=device)
        res, w = torch.randn_like(x), torch.randn(h, dtype=DTYPE, device=device)
        ms = bench_ms(rms_norm, x, w, 1e-5, res)
        rows.append(row("rms_norm+residual", model, f"{n} tok", "-", ms, 4 * n * h * e + h * e, copy_bw))
    n, inter = PREFILL_TOKENS, cfg["inter"]
    x = torch.randn(n, 2 * inter, dtype=DTYPE, device=device)
    rows.append(row("silu_and_mul", model, f"{n} tok", "-", bench_ms(silu_and_mul, x), 3 * n * inter * e,
                    copy_bw))
    hq, hk, d = cfg["hq"], cfg["hk"], cfg["d"]
    q = torch.randn(n, hq, d, dtype=DTYPE, device=device)
    k = torch.randn(n, hk, d, dtype=DTYPE, device=device)
    cos, sin = torch.randn(n, d // 2, device=device), torch.randn(n, d // 2, device=device)
    nbytes = 2 * n * (hq + hk) * d * e + 2 * n * (d // 2) * 4
    rows.append(row("apply_rotary", model, f"{n} tok", "-", bench_ms(apply_rotary, q, k, cos, sin), nbytes,
                    copy_bw))
    return rows


def bench_store_kv(model, cfg, cache: PagedKV, kv, copy_bw, device) -> list[dict]:
    from engine.kernels.store_kv import store_kv

    rows = []
    for n in (64, PREFILL_TOKENS):
        k = torch.randn(n, cfg["hk"], cfg["d"], dtype=DTYPE, device=device)
        v = torch.randn_like(k)
        slots = torch.randperm(cache.num_blocks * BLOCK_SIZE, device=device)[:n]
        ms = bench_ms(store_kv, k, v, *cache.args(), slots, *cache.scales())
        nbytes = 2 * k.numel() * 2 + n * cache.bytes_per_token() + slots.numel() * 8
        rows.append(row("store_kv", model, f"{n} tok", kv, ms, nbytes, copy_bw))
    return rows


def bench_decode(model, cfg, cache: PagedKV, kv, copy_bw, device, baseline=False) -> list[dict]:
    from engine.kernels.decode_attention import default_config, paged_decode_attention, pick_num_splits

    impls = [("decode_attention", paged_decode_attention, cache.args(), cache.scales(), pick_num_splits)]
    old = baseline_module() if baseline else None
    if old is not None:
        impls.append(("decode_attention (before)", old.paged_decode_attention, cache.old_args(), cache.old_scales(),
                      old.pick_num_splits))
    rows, hq, d = [], cfg["hq"], cfg["d"]
    for batch in DECODE_BATCHES:
        for context in DECODE_CONTEXTS:
            q = torch.randn(batch, hq, d, dtype=DTYPE, device=device)
            tables = cache.block_tables(batch, context)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            nbytes = batch * context * cache.bytes_per_token() + 2 * q.numel() * 2 + tables.numel() * 4
            for name, fn, kv_args, scales, pick in impls:
                ms = bench_ms(fn, q, *kv_args, tables, lens, d**-0.5, *scales)
                graph_us = decode_graph_us(fn, cache, q, batch, context, scales, kv_args)
                splits = pick(batch, cfg["hk"], context, default_config(q)["block_n"], q.device)
                rows.append(row(name, model, f"B={batch} ctx={context}", kv, ms, nbytes, copy_bw, splits=splits,
                                graph_us=graph_us, frac_bw_graph=nbytes / (graph_us * 1e-6) / copy_bw))
                emit(rows[-1])
    return rows


def bench_prefill(model, cfg, cache: PagedKV, kv, copy_bw, device, baseline=False) -> list[dict]:
    from engine.kernels.prefill_attention import paged_prefill_attention

    impls = [("prefill_attention", paged_prefill_attention, cache.args(), cache.scales())]
    old = baseline_module("benchmarks._baseline_prefill") if baseline else None
    if old is not None:
        impls.append(("prefill_attention (before)", old.paged_prefill_attention, cache.old_args(), cache.old_scales()))
    rows, hq, d, n = [], cfg["hq"], cfg["d"], PREFILL_TOKENS
    for context in (n, 4 * n):  # a fresh prompt; the last chunk of a long prompt (or a prefix-cache hit)
        q = torch.randn(n, hq, d, dtype=DTYPE, device=device)
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        lens = torch.tensor([context], dtype=torch.int32, device=device)
        tables = cache.block_tables(1, context)
        pairs = n * (context - n) + n * (n + 1) / 2  # (query, key) pairs the causal mask keeps
        nbytes = context * cache.bytes_per_token() + 2 * q.numel() * 2
        for name, fn, kv_args, scales in impls:
            ms = bench_ms(fn, q, *kv_args, tables, cu, lens, d**-0.5, *scales, n)
            rows.append(row(name, model, f"{n} new / ctx {context}", kv, ms, nbytes, copy_bw,
                            TFLOPs=4 * hq * d * pairs / (ms * 1e-3) / 1e12))
            emit(rows[-1])
    return rows


def bench_sdpa_baseline(model, cfg, copy_bw, device) -> list[dict]:
    """torch SDPA (flash) on contiguous, non-paged fp16 K/V: a yardstick for the prefill rows."""
    hq, hk, d, n = cfg["hq"], cfg["hk"], cfg["d"], PREFILL_TOKENS
    q = torch.randn(1, hq, n, d, dtype=DTYPE, device=device)
    k, v = (torch.randn(1, hk, n, d, dtype=DTYPE, device=device) for _ in range(2))
    try:
        ms = bench_ms(torch.nn.functional.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=hk != hq)
    except Exception as exc:  # an older torch without enable_gqa
        print(f"sdpa baseline skipped: {exc}", file=sys.stderr)
        return []
    pairs = n * (n + 1) / 2
    return [row("torch sdpa (baseline)", model, f"{n} new / ctx {n}", "fp16 contiguous", ms,
                (q.numel() * 2 + k.numel() * 2) * 2, copy_bw, TFLOPs=4 * hq * d * pairs / (ms * 1e-3) / 1e12)]


DECODE_TILE_CONFIGS = [(64, 4, 2), (64, 2, 2), (32, 4, 2), (64, 4, 3), (128, 2, 2)]


def sweep_decode(caches, copy_bw, device, out_of_time, tile_configs=None) -> list[dict]:
    """Graph-timed decode at ctx 8k: split counts at B=1 and B=16 (default tiles), then tile configs (block_n, warps,
    stages) at B=16 and B=1 with the default split count."""
    from engine.kernels.decode_attention import decode_attention_launch, default_config, pick_num_splits

    rows = []
    context = max(DECODE_CONTEXTS)

    def measure(model, kv, cache, batch, block_n, warps, stages, splits):
        cfg = MODELS[model]
        d = cfg["d"]
        q = torch.randn(batch, cfg["hq"], d, dtype=DTYPE, device=device)
        nbytes = batch * context * cache.bytes_per_token()
        default = default_config(q, BLOCK_SIZE, cache.quant_policy)
        default_splits = pick_num_splits(batch, cfg["hk"], context, default["block_n"], q.device)
        is_default = (block_n, warps, stages, splits) == (default["block_n"], default["num_warps"],
                                                          default["num_stages"], default_splits)

        def launch(*args):
            return decode_attention_launch(*args, num_splits=splits, block_n=block_n, num_warps=warps,
                                           num_stages=stages)

        us = decode_graph_us(launch, cache, q, batch, context)
        rows.append(row("decode_attention", model, f"B={batch} ctx={context}", kv, us * 1e-3, nbytes, copy_bw,
                        config=f"block_n={block_n} warps={warps} stages={stages} splits={splits}"
                        + (" (default)" if is_default else ""), graph_us=us))
        emit(rows[-1])

    for batch, split_counts in ((1, (8, 16, 32, 64)), (16, (1, 2, 4, 8))):
        for (model, kv), cache in caches.items():
            for splits in split_counts:
                if out_of_time():
                    return rows
                measure(model, kv, cache, batch, 64, 4, 2, splits)
    for block_n, warps, stages in tile_configs or DECODE_TILE_CONFIGS:
        for (model, kv), cache in caches.items():
            cfg = MODELS[model]
            for batch in (16, 1):
                if out_of_time():
                    return rows
                splits = pick_num_splits(batch, cfg["hk"], context, block_n, device)
                measure(model, kv, cache, batch, block_n, warps, stages, splits)
    return rows


def sweep(caches, copy_bw, device, out_of_time) -> list[dict]:
    """Decode (sweep_decode) then prefill tile configs for Llama-2 fp16 / int4. Stops when out of time."""
    from engine.kernels.prefill_attention import prefill_attention_launch

    rows = sweep_decode(caches, copy_bw, device, out_of_time)
    for (model, kv), cache in caches.items():
        cfg = MODELS[model]
        d = cfg["d"]
        if model == "llama2-7b" and kv in ("fp16", "int4"):
            n = PREFILL_TOKENS
            q = torch.randn(n, cfg["hq"], d, dtype=DTYPE, device=device)
            cu = torch.tensor([0, n], dtype=torch.int32, device=device)
            lens = torch.tensor([n], dtype=torch.int32, device=device)
            tables = cache.block_tables(1, n)
            for bm, bn, warps, stages in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2)]:
                if out_of_time():
                    return rows
                ms = bench_ms(prefill_attention_launch, q, *cache.args(), tables, cu, lens, d**-0.5, *cache.scales(),
                              n, bm, bn, warps, stages)
                rows.append(row("prefill_attention", model, f"{n} new / ctx {n}", kv, ms,
                                n * cache.bytes_per_token() + 2 * q.numel() * 2, copy_bw,
                                TFLOPs=4 * cfg["hq"] * d * n * (n + 1) / 2 / (ms * 1e-3) / 1e12,
                                config=f"block_m={bm} block_n={bn} warps={warps} stages={stages}"))
                emit(rows[-1])
    return rows


_EMIT_PATH = None


def emit(r: dict) -> None:
    """Append a finished row to the .jsonl progress file (so a run cut short still leaves its rows)."""
    if _EMIT_PATH is not None:
        with open(_EMIT_PATH, "a") as f:
            f.write(json.dumps(r) + "\n")


def run(device="cuda", do_sweep=True, only="all", baseline=False, deadline_s=SWEEP_DEADLINE_S) -> dict:
    start = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(device)
    rows = []
    caches = {}
    for model, cfg in MODELS.items():
        if only == "all":
            rows += bench_elementwise(model, cfg, copy_bw, device)
            rows += bench_sdpa_baseline(model, cfg, copy_bw, device)
        for kv, quant_policy in KV_FORMATS.items():
            max_tokens = max(max(DECODE_BATCHES) * max(DECODE_CONTEXTS), 32 * 8192)  # >= 2 tables at B=16 ctx 8k
            cache = PagedKV(max_tokens, cfg["hk"], cfg["d"], quant_policy, device)
            if only == "all":
                rows += bench_store_kv(model, cfg, cache, kv, copy_bw, device)
            rows += bench_decode(model, cfg, cache, kv, copy_bw, device, baseline=baseline)
            if only == "all":
                rows += bench_prefill(model, cfg, cache, kv, copy_bw, device, baseline=baseline)
            # all six caches stay resident for the sweep: about 19 GB (Llama-2 fp16 at 512k tokens: 8.6 GB)
            caches[(model, kv)] = cache
            torch.cuda.synchronize()

    def out_of_time():
        return time.perf_counter() - start > deadline_s

    sweep_rows = []
    if do_sweep:
        sweep_rows = sweep_decode(caches, copy_bw, device, out_of_time) if only == "decode" else sweep(
            caches, copy_bw, device, out_of_time)
    return {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "rows": rows,
        "sweep": sweep_rows,
        "elapsed_s": time.perf_counter() - start,
    }


def to_markdown(result: dict) -> str:
    cols = ["kernel", "model", "case", "kv", "time_us", "graph_us", "MB", "GB/s", "frac_copy_bw", "frac_bw_graph",
            "TFLOPs", "splits"]
    parts = [
        f"# Triton kernels on {result['device']}",
        f"torch {result['torch']}, triton {result['triton']}; measured copy bandwidth "
        f"{result['copy_bandwidth_GBps']:,.0f} GB/s (read + write); do_bench medians; fp16 activations.",
        "",
        markdown_table(result["rows"], cols),
    ]
    if result["sweep"]:
        parts += ["", "## Config sweep (decode: graph_us)", "", markdown_table(
            result["sweep"], ["kernel", "model", "case", "kv", "config", "time_us", "GB/s", "frac_copy_bw", "TFLOPs"])]
    parts += ["", f"elapsed {result['elapsed_s']:.0f} s"]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    global _EMIT_PATH, DECODE_BATCHES, DECODE_CONTEXTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="report path prefix (writes .json and .md), or a folder")
    p.add_argument("--no-sweep", action="store_true", help="skip the tile-config / split-count sweep")
    p.add_argument("--only", choices=["all", "decode"], default="all", help="decode: decode attention rows and sweep")
    p.add_argument("--baseline", action="store_true",
                   help="also time benchmarks/_baseline_decode.py / _baseline_prefill.py (kernels as they were before "
                        "the quantized-KV rewrite, fed the old layouts), if present")
    p.add_argument("--deadline", type=float, default=SWEEP_DEADLINE_S, help="seconds after which the sweep stops")
    p.add_argument("--batches", default=None, help="decode batch sizes, comma-separated (default 1,16,64)")
    p.add_argument("--contexts", default=None, help="decode context lengths, comma-separated (default 1024,8192)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 1

    out = Path(args.out)
    if out.is_dir():
        out = out / "kernels"
    out.parent.mkdir(parents=True, exist_ok=True)
    _EMIT_PATH = out.with_suffix(".jsonl")
    if args.batches:
        DECODE_BATCHES = tuple(int(x) for x in args.batches.split(","))
    if args.contexts:
        DECODE_CONTEXTS = tuple(int(x) for x in args.contexts.split(","))
    result = run(args.device, do_sweep=not args.no_sweep, only=args.only, baseline=args.baseline,
                 deadline_s=args.deadline)
    md = to_markdown(result)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
