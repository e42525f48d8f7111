"""Generation benchmarks at real model shapes with random weights (LMDeploy's profile_generation and
profile_throughput, plus the transformers baseline and the roofline), on one GPU.

    python benchmarks/bench_generation.py --shapes llama2-7b --configs fp16,kv8,kv4,awq,awq-kv4 --out results/

Per (shape, config): batch-1 decode (1-token prompt, 512 new tokens) as tok/s, per-token latency percentiles
and the fraction of the memory-bandwidth limit; batch-1 decode at an 8k context; first-token latency for
128 / 2048 / 8192-token prompts next to the time the prefill matmuls alone need at the measured bf16 rate;
throughput at concurrency 1/16/64/256 with random lengths (fixed seed); the fixed 256 x (128 in, 128 out)
workload; KV capacity. `transformers` (eager, generate) runs the same batch-1 and batched workloads.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    SHAPES,
    RequestTimer,
    copy_bandwidth_bytes_per_s,
    make_shape_folder,
    markdown_table,
    matmul_flops_per_s,
    save,
)
from engine import EngineConfig, pipeline  # noqa: E402

CONFIGS = {  # name -> (awq weights?, quant_policy)
    "fp16": (False, 0), "kv8": (False, 8), "kv4": (False, 4),
    "awq": (True, 0), "awq-kv8": (True, 8), "awq-kv4": (True, 4),
}


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, min(vocab, 32000)) for _ in range(n)]


def decode_bytes_per_step(pipe, context: int, batch: int = 1) -> float:
    """Bytes one decode step must read: every weight once (the embedding table only for its rows) + the KV."""
    mem = pipe.memory()
    spec = pipe.engine.spec
    embed = spec.vocab_size * spec.hidden_size * pipe.engine.dtype.itemsize
    weights = mem["weights_bytes"] - (0 if spec.tie_word_embeddings else embed)
    return weights + batch * context * mem["kv_bytes_per_token"]


def linear_flops_per_token(spec) -> float:
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    per_layer = h * d * (2 * spec.num_heads + 2 * spec.num_kv_heads) + 3 * h * i
    return 2 * spec.num_layers * per_layer  # the lm_head runs on the last row only


def bench_engine(folder: Path, shape: str, config: str, ceilings: dict, quick: bool,
                 concurrencies=(1, 16, 64, 256), fixed_requests=256, decode_only: bool = False) -> dict:
    awq, qp = CONFIGS[config]
    pipe = pipeline(folder, EngineConfig(quant_policy=qp, load_format="dummy", enable_prefix_caching=False,
                                         max_batch_size=256, cache_max_entry_count=0.85))
    eng, spec = pipe.engine, pipe.engine.spec
    timer = RequestTimer(eng)
    rng = random.Random(0)
    mem = pipe.memory()
    res = {"shape": shape, "config": config, "kv_capacity_tokens": mem["kv_capacity_tokens"],
           "weights_GiB": mem["weights_bytes"] / 2**30, "kv_bytes_per_token": mem["kv_bytes_per_token"]}
    timer.run([(random_ids(rng, 1, spec.vocab_size), 32)], 1)  # warm-up
    n_new = 128 if quick else 512
    r = timer.run([(random_ids(rng, 1, spec.vocab_size), n_new)], 1)
    tok_s = 1e3 / r["tpot_p50_ms"] if r["tpot_p50_ms"] else float("nan")
    mean_step = (r["elapsed_s"] - r["ttft_p50_ms"] / 1e3) / (n_new - 1)
    res.update({"decode_tok_s": 1 / mean_step, "decode_tok_s_p50": tok_s, "itl_p50_ms": r["itl_p50_ms"],
                "itl_p90_ms": r["itl_p90_ms"], "itl_p99_ms": r["itl_p99_ms"]})
    bytes_step = decode_bytes_per_step(pipe, n_new // 2)
    res["decode_fraction_of_bw"] = bytes_step / mean_step / ceilings["copy_bw"]
    if not decode_only:
        _bench_latency_and_throughput(res, pipe, timer, rng, ceilings, quick, concurrencies, fixed_requests)
    pipe.close()
    del pipe, eng, timer
    gc.collect()
    torch.cuda.empty_cache()
    return res


def _bench_latency_and_throughput(res, pipe, timer, rng, ceilings, quick, concurrencies, fixed_requests) -> None:
    """8k-context decode, first-token latency, random-length throughput and the fixed256 workload, into res."""
    spec = pipe.engine.spec
    # batch-1 decode at an 8k context
    if not quick:
        r8 = timer.run([(random_ids(rng, 8192, spec.vocab_size), 129)], 1)
        step8 = (r8["elapsed_s"] - r8["ttft_p50_ms"] / 1e3) / 128
        res["decode8k_tok_s"] = 1 / step8
        res["decode8k_fraction_of_bw"] = decode_bytes_per_step(pipe, 8192 + 64) / step8 / ceilings["copy_bw"]
    # first-token latency
    for n in (128, 2048) if quick else (128, 2048, 8192):
        times = []
        for _ in range(3):
            times.append(timer.run([(random_ids(rng, n, spec.vocab_size), 1)], 1)["ttft_p50_ms"])
        res[f"ttft_{n}_ms"] = sorted(times)[1]
        res[f"prefill_matmul_floor_{n}_ms"] = linear_flops_per_token(spec) * n / ceilings["bf16_flops"] * 1e3
    # throughput, random lengths
    for conc in concurrencies:
        n_req = max(8, 2 * conc) if not quick else max(4, conc)
        reqs = [(random_ids(rng, rng.randint(32, 512), spec.vocab_size), rng.randint(32, 256)) for _ in range(n_req)]
        r = timer.run(reqs, conc)
        res[f"conc{conc}"] = r
    # the fixed workload of the targets
    reqs = [(random_ids(rng, 128, spec.vocab_size), 128) for _ in range(fixed_requests)]
    r = timer.run(reqs, fixed_requests)
    res["fixed256_output_tok_s"] = r["output_tokens_per_s"]
    res["fixed256"] = r


@torch.inference_mode()
def bench_transformers(shape: str, quick: bool) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SHAPES[shape])
    if cfg["model_type"] == "internlm2":
        return {"shape": shape, "note": "transformers has no InternLM2 implementation (custom code); skipped"}
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    dtype = torch.float16 if cfg["torch_dtype"] == "float16" else torch.bfloat16
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager").eval()
    res = {"shape": shape}
    gen_kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(batch, prompt_len, new):
        ids = torch.randint(3, 32000, (batch, prompt_len), device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, **gen_kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(1, 1, 8)
    new = 64 if quick else 128
    t = run(1, 1, new)
    res["decode_tok_s"] = new / t
    best = 0.0
    for batch in (16, 64) if quick else (16, 64, 128):
        try:
            t = run(batch, 128, 128)
            res[f"batch{batch}_output_tok_s"] = batch * 128 / t
            best = max(best, batch * 128 / t)
        except torch.OutOfMemoryError:
            res[f"batch{batch}_output_tok_s"] = "OOM"
            break
    res["best_output_tok_s"] = best
    return res


def bench_pressure(folder: Path, shape: str, config: str, fraction: float, n_requests: int, prompt: int,
                   new: int) -> dict:
    """Many long requests against a deliberately small KV cache: the KV policy decides how many run at once."""
    awq, qp = CONFIGS[config]
    pipe = pipeline(folder, EngineConfig(quant_policy=qp, load_format="dummy", enable_prefix_caching=False,
                                         max_batch_size=256, cache_max_entry_count=fraction))
    timer = RequestTimer(pipe.engine)
    rng = random.Random(1)
    timer.run([(random_ids(rng, 16, pipe.engine.spec.vocab_size), 8)], 1)
    reqs = [(random_ids(rng, prompt, pipe.engine.spec.vocab_size), new) for _ in range(n_requests)]
    r = timer.run(reqs, n_requests)
    out = {"shape": shape, "config": config, "cache_max_entry_count": fraction,
           "kv_capacity_tokens": pipe.memory()["kv_capacity_tokens"], "requests": n_requests, "prompt": prompt,
           "new_tokens": new, "output_tokens_per_s": r["output_tokens_per_s"], "requests_per_s": r["requests_per_s"],
           "preemptions": pipe.engine.scheduler.num_preemptions, "tpot_p50_ms": r["tpot_p50_ms"]}
    pipe.close()
    del pipe, timer
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama2-7b")
    parser.add_argument("--configs", default="fp16")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and requests (a smoke run)")
    parser.add_argument("--decode-only", action="store_true", help="batch-1 decode only (A/B runs)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--pressure", action="store_true",
                        help="only the memory-pressure workload: long requests in a small KV cache, per config")
    parser.add_argument("--pressure-fraction", type=float, default=0.15)
    args = parser.parse_args(argv)
    if args.pressure:
        root = Path(tempfile.mkdtemp())
        rows = []
        for shape in args.shapes.split(","):
            for config in args.configs.split(","):
                folder = make_shape_folder(shape, root, awq_group_size=128 if CONFIGS[config][0] else None)
                rows.append(bench_pressure(folder, shape, config, args.pressure_fraction, 192, 1024, 256))
                print(rows[-1], flush=True)
        save(args.out, "pressure", rows, markdown_table(rows, list(rows[0].keys())))
        return
    ceilings = {"copy_bw": copy_bandwidth_bytes_per_s(), "bf16_flops": matmul_flops_per_s()}
    print(f"device: {torch.cuda.get_device_name()} | copy {ceilings['copy_bw'] / 1e12:.2f} TB/s | "
          f"bf16 matmul {ceilings['bf16_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    root = Path(tempfile.mkdtemp())
    results = {"ceilings": ceilings, "device": torch.cuda.get_device_name(), "engine": [], "transformers": []}
    for shape in args.shapes.split(","):
        for config in args.configs.split(","):
            folder = make_shape_folder(shape, root, awq_group_size=128 if CONFIGS[config][0] else None)
            t = time.perf_counter()
            res = bench_engine(folder, shape, config, ceilings, args.quick, decode_only=args.decode_only)
            res["bench_s"] = time.perf_counter() - t
            results["engine"].append(res)
            print({k: v for k, v in res.items() if not isinstance(v, dict)}, flush=True)
            save(args.out, "generation", results, "")
        if not args.no_transformers and not args.decode_only:
            results["transformers"].append(bench_transformers(shape, args.quick))
            gc.collect()
            torch.cuda.empty_cache()
            print(results["transformers"][-1], flush=True)
    rows = []
    hf = {r["shape"]: r for r in results["transformers"]}
    for r in results["engine"]:
        ref = hf.get(r["shape"], {})
        row = {k: r.get(k) for k in ("shape", "config", "weights_GiB", "decode_tok_s", "decode_fraction_of_bw",
                                      "decode8k_tok_s", "ttft_128_ms", "ttft_2048_ms", "prefill_matmul_floor_2048_ms",
                                      "ttft_8192_ms", "fixed256_output_tok_s", "kv_capacity_tokens")}
        row["conc256_out_tok_s"] = r.get("conc256", {}).get("output_tokens_per_s")
        if ref.get("decode_tok_s"):
            row["x_hf_decode"] = r["decode_tok_s"] / ref["decode_tok_s"]
            row["x_hf_best_batch"] = r["fixed256_output_tok_s"] / ref["best_output_tok_s"]
        rows.append(row)
    md = markdown_table(rows, list(rows[0].keys())) if rows else ""
    if args.decode_only:
        save(args.out, "generation", results, md)
        return
    conc_rows = [{"shape": r["shape"], "config": r["config"], **{k: v for k, v in r[f"conc{c}"].items()
                  if k in ("concurrency", "requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
                           "tpot_p50_ms", "tpot_p99_ms")}} for r in results["engine"] for c in (1, 16, 64, 256)]
    md += "\n\n" + markdown_table(conc_rows, list(conc_rows[0].keys())) if conc_rows else ""
    if results["transformers"]:
        keys = sorted({k for r in results["transformers"] for k in r})
        md += "\n\ntransformers (eager):\n\n" + markdown_table(results["transformers"], keys)
    save(args.out, "generation", results, md)


if __name__ == "__main__":
    main()
