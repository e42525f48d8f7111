"""Serving benchmark over HTTP, in the spirit of vLLM's benchmark_serving.py: random prompts arrive as a Poisson
process at several request rates (fixed seed) and stream back through the OpenAI protocol; it measures request
throughput, output tokens/s, TTFT and TPOT (mean, p50, p99) and end-to-end latency, and writes JSON + markdown.

    # against any running OpenAI-compatible server
    python benchmarks/bench_serving.py --url http://127.0.0.1:7860 --vocab-size 32000
    # or start this studio's API in-process over a model folder, with engine flags
    python benchmarks/bench_serving.py --model /path/llama2-7b --quant-policy 8 --out results/serving

Prompts are random token ids sent to /v1/completions (exact input lengths, no shared prefixes) with ignore_eos, so
every request generates exactly its max_tokens. TPOT = (latency - TTFT) / (output tokens - 1). Each rate is bounded
by --rate-timeout and all of them by --max-duration: what still runs then is cancelled and counted as failed, so a
run always ends (defaults: 64 requests at each of 2, 8 and inf req/s, at most 180 s after warm-up).
Needs httpx, and the engine (flags, in-process server) and fastapi + uvicorn for --model; never gradio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/bench_serving.py` from anywhere


@dataclass
class RequestSpec:
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    error: str = ""


@dataclass
class RateSummary:
    request_rate: float | str
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests / s
    input_token_throughput: float
    output_token_throughput: float
    ttft_ms: dict = field(default_factory=dict)  # mean, p50, p99
    tpot_ms: dict = field(default_factory=dict)
    e2e_latency_ms: dict = field(default_factory=dict)
    first_error: str = ""


def make_requests(num: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                  rng: random.Random) -> list[RequestSpec]:
    """Lengths uniform in [len * range_ratio, len]; ids avoid the lowest 100 (special tokens in most vocabularies)."""
    low_id = min(100, vocab_size // 2)
    specs = []
    for _ in range(num):
        n_in = rng.randint(max(1, int(input_len * range_ratio)), input_len)
        n_out = rng.randint(max(1, int(output_len * range_ratio)), output_len)
        specs.append(RequestSpec([rng.randrange(low_id, vocab_size) for _ in range(n_in)], n_out))
    return specs


async def send_one(client: httpx.AsyncClient, model: str, spec: RequestSpec) -> RequestResult:
    body = {"model": model, "prompt": spec.prompt_ids, "max_tokens": spec.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(prompt_tokens=len(spec.prompt_ids))
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200].decode(errors='replace')}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if not result.ttft_s:
                    result.ttft_s = time.perf_counter() - start
                if line == "data: [DONE]":
                    break
                if '"usage":{' in line or '"error"' in line[:16]:  # parse only what carries numbers or errors
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        result.error = str(event["error"].get("message"))
                        return result
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
        result.latency_s = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no usage in the stream"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)

    def pct(p: float) -> float:
        k = (len(ordered) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": round(statistics.fmean(ordered) * 1000, 2), "p50": round(pct(0.5) * 1000, 2),
            "p99": round(pct(0.99) * 1000, 2)}


async def run_rate(base_url: str, model: str, specs: list[RequestSpec], rate: float, rng: random.Random,
                   max_concurrency: int | None, timeout_s: float, api_key: str | None) -> RateSummary:
    limits = httpx.Limits(max_connections=max_concurrency or len(specs) + 8, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    results: list[RequestResult] = [RequestResult(error="cancelled at --rate-timeout") for _ in specs]
    async with httpx.AsyncClient(base_url=base_url, limits=limits, headers=headers,
                                 timeout=httpx.Timeout(timeout_s + 30, connect=30)) as client:

        async def one(i: int, delay: float) -> None:
            await asyncio.sleep(delay)
            if gate is None:
                results[i] = await send_one(client, model, specs[i])
            else:
                async with gate:
                    results[i] = await send_one(client, model, specs[i])

        delays, t = [], 0.0
        for _ in specs:
            delays.append(t)
            if math.isfinite(rate):
                t += rng.expovariate(rate)
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(i, d)) for i, d in enumerate(delays)]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tpots = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return RateSummary(
        request_rate=rate if math.isfinite(rate) else "inf",
        num_requests=len(specs),
        completed=len(ok),
        failed=len(failed),
        duration_s=round(duration, 3),
        request_throughput=round(len(ok) / duration, 3),
        input_token_throughput=round(sum(r.prompt_tokens for r in ok) / duration, 1),
        output_token_throughput=round(sum(r.output_tokens for r in ok) / duration, 1),
        ttft_ms=_stats_ms([r.ttft_s for r in ok]),
        tpot_ms=_stats_ms(tpots),
        e2e_latency_ms=_stats_ms([r.latency_s for r in ok]),
        first_error=failed[0].error if failed else "",
    )


def to_markdown(meta: dict, summaries: list[RateSummary]) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"model `{meta['model']}` at {meta['server']}; {meta['num_prompts']} requests per rate, input "
        f"<= {meta['input_len']} tokens, output <= {meta['output_len']} tokens (range ratio {meta['range_ratio']}), "
        f"seed {meta['seed']}" + (f", max concurrency {meta['max_concurrency']}" if meta["max_concurrency"] else ""),
        "",
        "| rate (req/s) | done | failed | duration s | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms "
        "| TPOT p50 ms | TPOT p99 ms | latency p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.request_rate} | {s.completed} | {s.failed} | {s.duration_s} | {s.request_throughput} "
            f"| {s.output_token_throughput} | {s.ttft_ms['p50']} | {s.ttft_ms['p99']} | {s.tpot_ms['p50']} "
            f"| {s.tpot_ms['p99']} | {s.e2e_latency_ms['p50']} |"
        )
    if meta.get("engine"):
        lines += ["", f"engine: `{json.dumps(meta['engine'])}`"]
    if meta.get("device"):
        lines += [f"device: {meta['device']}"]
    return "\n".join(lines) + "\n"


async def benchmark(base_url: str, model: str | None, args, vocab_size: int) -> tuple[dict, list[RateSummary]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:
        if model is None:
            models = (await client.get("/models")).json()["data"]
            model = models[0]["id"]
        warm_rng = random.Random(args.seed + 1)
        warm = make_requests(args.num_warmup, min(args.input_len, 64), 8, 1.0, vocab_size, warm_rng)
        if warm:
            results = await asyncio.gather(*(send_one(client, model, s) for s in warm))
            bad = [r.error for r in results if not r.ok]
            if bad:
                raise RuntimeError(f"warm-up requests failed: {bad[0]}")
    summaries = []
    deadline = time.perf_counter() + args.max_duration
    for i, rate in enumerate(args.request_rates):
        budget = min(args.rate_timeout, deadline - time.perf_counter())
        if budget < 5:
            print(f"--max-duration {args.max_duration} s reached: skipping rates {args.request_rates[i:]}", flush=True)
            break
        rng = random.Random(args.seed * 1000 + i)
        specs = make_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio, vocab_size, rng)
        summary = await run_rate(base_url, model, specs, rate, rng, args.max_concurrency, budget, args.api_key)
        summaries.append(summary)
        print(f"rate {summary.request_rate}: {summary.completed}/{summary.num_requests} done in "
              f"{summary.duration_s:.1f} s, {summary.output_token_throughput} output tok/s, TTFT p50 "
              f"{summary.ttft_ms['p50']} ms, TPOT p50 {summary.tpot_ms['p50']} ms", flush=True)
    meta = {"model": model, "server": base_url, "num_prompts": args.num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "range_ratio": args.range_ratio, "seed": args.seed,
            "max_concurrency": args.max_concurrency, "request_rates": [s.request_rate for s in summaries]}
    return meta, summaries


def _parse_rates(text: str) -> list[float]:
    rates = [float("inf") if r.strip() in ("inf", "max") else float(r) for r in text.split(",") if r.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("request rates are positive numbers or 'inf', comma-separated")
    return rates


def build_parser() -> argparse.ArgumentParser:
    from studio.engine_args import add_engine_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running OpenAI-compatible server (with or without /v1)")
    where.add_argument("--model", help="a model folder: start this studio's API in-process over it")
    parser.add_argument("--served-model-name", default=None, help="model id to request (default: the server's first)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="prompt ids are drawn below this (default: the model's vocab in-process, else 32000)")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per request rate")
    parser.add_argument("--request-rates", type=_parse_rates, default=_parse_rates("2,8,inf"),
                        help="Poisson arrival rates in requests/s, comma-separated; inf sends all at once")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.5, help="lengths are uniform in [ratio*len, len]")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (client side)")
    parser.add_argument("--num-warmup", type=int, default=4)
    parser.add_argument("--rate-timeout", type=float, default=120.0, help="seconds per rate before cancelling the rest")
    parser.add_argument("--max-duration", type=float, default=180.0,
                        help="seconds for all rates together (after loading and warm-up); later rates are skipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_serving.json and bench_serving.md")
    add_engine_args(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    server = manager = None
    engine_meta, device = None, None
    try:
        if args.model:
            from api import build_api
            from api.background import BackgroundServer
            from studio.engine_args import engine_config_from_args
            from studio.manager import ModelManager

            manager = ModelManager()
            start = time.perf_counter()
            loaded = manager.load(args.model, engine_config_from_args(args))
            print(f"loaded {loaded.name} in {time.perf_counter() - start:.1f} s", flush=True)
            pipe = manager.pipeline()
            vocab_size = args.vocab_size or pipe.engine.spec.vocab_size
            limit = max(256, args.num_prompts + args.num_warmup)
            server = BackgroundServer(build_api(manager, max_concurrent_requests=limit,
                                                served_model_name=args.served_model_name)).start()
            base_url = server.url + "/v1"
            engine_meta = asdict(loaded.config)
            mem = pipe.memory()
            engine_meta.update({k: mem[k] for k in ("num_kv_blocks", "kv_capacity_tokens", "weights_bytes")})
            device = str(pipe.engine.device)
            if pipe.engine.device.type == "cuda":
                import torch

                device = torch.cuda.get_device_name(pipe.engine.device)
        else:
            url = args.url.rstrip("/")
            base_url = url if url.endswith("/v1") else url + "/v1"
            vocab_size = args.vocab_size or 32000
        meta, summaries = asyncio.run(benchmark(base_url, args.served_model_name, args, vocab_size))
    finally:
        if server is not None:
            server.stop()
        if manager is not None:
            manager.unload()
    meta.update({"engine": engine_meta, "device": device, "vocab_size": vocab_size})
    report = {"meta": meta, "results": [asdict(s) for s in summaries]}
    markdown = to_markdown(meta, summaries)
    print(markdown)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_serving.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "bench_serving.md").write_text(markdown)
        print(f"wrote {args.out / 'bench_serving.json'} and {args.out / 'bench_serving.md'}")
    return report


if __name__ == "__main__":
    main()
