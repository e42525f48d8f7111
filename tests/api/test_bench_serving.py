"""benchmarks/bench_serving.py end to end on CPU, tiny: against the running API (--url) and in-process (--model)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_serving import main


def _check(report: dict, out_dir, num: int) -> None:
    (result,) = report["results"]
    assert result["completed"] == num and result["failed"] == 0
    assert result["output_token_throughput"] > 0 and result["request_throughput"] > 0
    for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
        assert set(result[key]) == {"mean", "p50", "p99"} and result[key]["p50"] > 0
    assert json.loads((out_dir / "bench_serving.json").read_text()) == report
    assert "| rate (req/s) |" in (out_dir / "bench_serving.md").read_text()


def test_bench_against_running_server(base_url, tmp_path):
    report = main(["--url", base_url, "--vocab-size", "1024", "--num-prompts", "6", "--request-rates", "inf",
                   "--input-len", "16", "--output-len", "6", "--num-warmup", "1", "--out", str(tmp_path)])
    _check(report, tmp_path, 6)
    assert report["meta"]["model"] == "demo"


@pytest.mark.slow
def test_bench_in_process(demo_model_path, tmp_path):
    report = main(["--model", str(demo_model_path), "--num-prompts", "4", "--request-rates", "16",
                   "--input-len", "16", "--output-len", "6", "--num-warmup", "1", "--cache-block-seq-len", "16",
                   "--out", str(tmp_path)])
    _check(report, tmp_path, 4)
    assert report["meta"]["device"] == "cpu" and report["meta"]["vocab_size"] == 1024
