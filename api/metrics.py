"""Prometheus text exposition (format 0.0.4) of the API's and the engine's counters, written by hand: no client
library needed. Engine counters restart from 0 when another model is loaded (Prometheus reads that as a reset)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

PREFIX = "studio"


@dataclass
class APIMetrics:
    http_requests: Counter = field(default_factory=Counter)  # (route, status) -> count
    num_rejected: int = 0  # 429s from the concurrency limit
    num_client_disconnects: int = 0  # requests whose client left before the answer was complete


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        full = f"{PREFIX}_{name}"
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            self.lines.append(f"{full}{{{label_text}}} {value}" if label_text else f"{full} {value}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(api: APIMetrics, in_flight: int, max_concurrent: int, model_name: str | None, pipe) -> str:
    w = _Writer()
    w.metric("http_requests_total", "counter", "HTTP requests answered by the API, by route and status code",
             [({"route": route, "status": str(status)}, n) for (route, status), n in sorted(api.http_requests.items())])
    w.metric("requests_rejected_total", "counter", "requests refused with 429 at the concurrency limit",
             [({}, api.num_rejected)])
    w.metric("client_disconnects_total", "counter", "requests aborted because their client went away",
             [({}, api.num_client_disconnects)])
    w.metric("api_requests_in_flight", "gauge", "engine requests admitted by the API and not yet answered",
             [({}, in_flight)])
    w.metric("api_max_concurrent_requests", "gauge", "the API's concurrency limit", [({}, max_concurrent)])
    w.metric("model_loaded", "gauge", "1 when a model is loaded",
             [({"model": model_name or ""}, 1 if pipe is not None else 0)])
    if pipe is None:
        return w.text()
    labels = {"model": model_name or ""}
    stats, engine = pipe.engine.stats, pipe.engine
    mem = pipe.memory()
    counters = [
        ("engine_requests_total", "requests the engine accepted", stats.num_requests),
        ("engine_requests_finished_total", "requests that ended with stop or length", stats.num_finished),
        ("engine_requests_aborted_total", "requests aborted (client gone, cancelled)", stats.num_aborted),
        ("engine_requests_failed_total", "requests ended by an engine error", stats.num_errors),
        ("prompt_tokens_total", "prompt tokens of accepted requests", stats.num_prompt_tokens),
        ("generation_tokens_total", "tokens generated", stats.num_generated_tokens),
        ("engine_steps_total", "engine steps run (prefill or decode)", stats.num_steps),
    ]
    for name, help_text, value in counters:
        w.metric(name, "counter", help_text, [(labels, value)])
    gauges = [
        ("requests_waiting", "requests queued in the engine, not yet scheduled", engine.num_waiting),
        ("requests_running", "requests in the engine's running batch", engine.num_running),
        ("kv_cache_usage_ratio", "fraction of KV-cache blocks in use", mem["kv_usage"]),
        ("kv_cache_used_blocks", "KV-cache blocks in use", mem["used_kv_blocks"]),
        ("kv_cache_free_blocks", "KV-cache blocks free", mem["free_kv_blocks"]),
        ("kv_cache_blocks", "KV-cache blocks in all", mem["num_kv_blocks"]),
        ("kv_cache_capacity_tokens", "tokens the KV cache holds in all", mem["kv_capacity_tokens"]),
        ("weights_bytes", "bytes of model weights", mem["weights_bytes"]),
        ("session_len", "max prompt + reply tokens per request", pipe.session_len),
    ]
    for name, help_text, value in gauges:
        w.metric(name, "gauge", help_text, [(labels, value)])
    return w.text()
