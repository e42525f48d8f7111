"""What the Compare runner measures with (benchmarks/ reuse it): real model shapes as config-only folders (random
weights, `load_format=dummy`: nothing to download), a request driver that records per-token arrival times, and the
markdown table writer."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from engine.config import GenerationConfig
from studio.demo_model import build_tokenizer

SHAPES = {
    "llama2-7b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    },
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False,
    },
    "internlm2-1.8b": {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8,
        "vocab_size": 92544, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "bias": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    },
}


def make_shape_folder(name: str, root: Path, awq_group_size: int | None = None) -> Path:
    """A folder with config.json and a tokenizer: enough for pipeline(..., EngineConfig(load_format='dummy'))."""
    folder = root / (name + ("-awq" if awq_group_size else ""))
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(SHAPES[name])
    if awq_group_size:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": awq_group_size,
                                      "zero_point": True, "version": "gemm"}
        cfg["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    build_tokenizer(folder)
    return folder


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class RequestTimer:
    """Submits token-id requests to an engine and records per-token arrival times."""

    def __init__(self, engine):
        self.engine = engine

    def run(self, requests: list[tuple[list[int], int]], concurrency: int) -> dict:
        """requests: (prompt ids, new tokens). Keeps `concurrency` in flight; returns timing statistics."""
        lock = threading.Lock()
        done = threading.Event()
        records = [{"submit": None, "tokens": []} for _ in requests]
        next_index = [0]
        finished = [0]

        def submit_next():
            with lock:
                i = next_index[0]
                if i >= len(requests):
                    return
                next_index[0] += 1
            ids, n = requests[i]
            records[i]["submit"] = time.perf_counter()
            gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, ignore_eos=True)
            self.engine.add_request(ids, gc, lambda out, i=i: on_output(i, out))

        def on_output(i, out):
            now = time.perf_counter()
            records[i]["tokens"].extend([now] * len(out.token_ids))
            if out.finished:
                with lock:
                    finished[0] += 1
                    all_done = finished[0] == len(requests)
                if all_done:
                    done.set()
                else:
                    submit_next()

        start = time.perf_counter()
        for _ in range(min(concurrency, len(requests))):
            submit_next()
        done.wait()
        elapsed = time.perf_counter() - start
        ttft = [r["tokens"][0] - r["submit"] for r in records]
        tpot = [(r["tokens"][-1] - r["tokens"][0]) / (len(r["tokens"]) - 1) for r in records if len(r["tokens"]) > 1]
        itl = [b - a for r in records for a, b in zip(r["tokens"], r["tokens"][1:])]
        out_tokens = sum(len(r["tokens"]) for r in records)
        return {
            "requests": len(requests), "concurrency": concurrency, "elapsed_s": elapsed,
            "requests_per_s": len(requests) / elapsed, "output_tokens_per_s": out_tokens / elapsed,
            "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
            "tpot_p50_ms": percentile(tpot, 50) * 1e3, "tpot_p99_ms": percentile(tpot, 99) * 1e3,
            "itl_p50_ms": percentile(itl, 50) * 1e3, "itl_p90_ms": percentile(itl, 90) * 1e3,
            "itl_p99_ms": percentile(itl, 99) * 1e3,
        }


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e3 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
