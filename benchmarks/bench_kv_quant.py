"""KV-cache quantization A/B at a real model shape (random weights, one GPU): batch-1 decode (1-token prompt), batch-1
decode at a long context, and the fixed256 workload (256 x (128 in, 128 out)), for the engine of one checkout, so two
commits can be compared on the same GPU in one session (issue 28: int4 KV with rotation and per-half scales must stay
within 3% of the one-pair scheme's batch-1 decode and fixed256 throughput).

    python benchmarks/bench_kv_quant.py --configs kv4 --repo /path/to/other/checkout   # the baseline
    python benchmarks/bench_kv_quant.py --configs kv4                                  # this checkout

Prints one JSON line per config: decode_tok_s (median of --repeats runs of --new-tokens steps), decode_ctx_tok_s
(at --context tokens; 0 skips it), fixed256_output_tok_s and kv_bytes_per_token. --kernels instead times the KV
kernels alone at Llama-2-7B shape with the checkout's benchmarks/bench_kernels.py (its cache layout): decode
attention graph-timed like a decode step (32 calls) at a few (batch, context) cases, for each of --decode-warps, then
store_kv and prefill rows; one JSON line each.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose engine runs (default: this one)")
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--configs", default="kv4", help="comma-separated: fp16, kv8, kv4")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--fixed-requests", type=int, default=256)
    parser.add_argument("--kernels", action="store_true", help="time the KV kernels alone (see above)")
    parser.add_argument("--decode-warps", default="2,4")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.repo.resolve()))
    import torch

    if args.kernels:
        bench_kernels(args, torch)
        return

    from benchmarks.common import RequestTimer, make_shape_folder
    from engine import EngineConfig, pipeline

    folder = make_shape_folder(args.shape, Path(tempfile.mkdtemp()))
    for config in args.configs.split(","):
        print(json.dumps(bench_config(folder, config, args, torch, RequestTimer, EngineConfig, pipeline)), flush=True)


KERNEL_CASES = ((1, 4096), (1, 256), (64, 1024), (256, 256))  # decode (batch, context)


def bench_kernels(args, torch) -> None:
    from benchmarks import bench_kernels as bk
    from engine.kernels.decode_attention import decode_attention_launch, pick_num_splits

    device = torch.device("cuda")
    copy_bw = bk.copy_bandwidth(device)
    cfg = bk.MODELS["llama2-7b"]
    for kv in args.configs.replace("kv", "int").split(","):
        cache = bk.PagedKV(8 * 65536, cfg["hk"], cfg["d"], bk.KV_FORMATS[kv], device)
        for batch, context in KERNEL_CASES:
            q = torch.randn(batch, cfg["hq"], cfg["d"], dtype=bk.DTYPE, device=device)
            splits = pick_num_splits(batch, cfg["hk"], context, 64, device)
            for warps in [int(w) for w in args.decode_warps.split(",")]:
                def launch(*a, warps=warps, splits=splits):
                    return decode_attention_launch(*a, num_splits=splits, block_n=64, num_warps=warps, num_stages=2)

                us = bk.decode_graph_us(launch, cache, q, batch, context)
                print(json.dumps({"repo": str(args.repo), "kernel": "decode_attention", "kv": kv, "batch": batch,
                                  "context": context, "warps": warps, "splits": splits, "graph_us_32_calls": us}),
                      flush=True)
        for r in bk.bench_store_kv("llama2-7b", cfg, cache, kv, copy_bw, device) + bk.bench_prefill(
                "llama2-7b", cfg, cache, kv, copy_bw, device):
            print(json.dumps({"repo": str(args.repo), **r}), flush=True)
        del cache
        torch.cuda.empty_cache()


def bench_config(folder, config, args, torch, RequestTimer, EngineConfig, pipeline) -> dict:
    """One engine of the checkout's classes (passed in: imported from --repo) through the three workloads."""
    policies = {"fp16": 0, "kv8": 8, "kv4": 4}
    t0 = time.perf_counter()
    pipe = pipeline(folder, EngineConfig(quant_policy=policies[config], load_format="dummy",
                                         enable_prefix_caching=False, max_batch_size=256, cache_max_entry_count=0.85))
    timer, rng, vocab = RequestTimer(pipe.engine), random.Random(0), min(pipe.engine.spec.vocab_size, 32000)

    def ids(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    def decode_rate(prompt_len, new_tokens):
        r = timer.run([(ids(prompt_len), new_tokens)], 1)
        return (new_tokens - 1) / (r["elapsed_s"] - r["ttft_p50_ms"] / 1e3)

    timer.run([(ids(1), 32)], 1)  # warm-up
    res = {"repo": str(args.repo), "shape": args.shape, "config": config, "device": torch.cuda.get_device_name(),
           "kv_bytes_per_token": pipe.memory()["kv_bytes_per_token"]}
    runs = [decode_rate(1, args.new_tokens) for _ in range(args.repeats)]
    res["decode_tok_s"], res["decode_tok_s_runs"] = statistics.median(runs), runs
    if args.context:
        res["decode_ctx_tok_s"] = decode_rate(args.context, 129)
    reqs = [(ids(128), 128) for _ in range(args.fixed_requests)]
    res["fixed256_output_tok_s"] = timer.run(reqs, args.fixed_requests)["output_tokens_per_s"]
    res["bench_s"] = time.perf_counter() - t0
    pipe.close()
    return res


if __name__ == "__main__":
    main()
