"""`python -m studio.compare` end to end on the demo model, on CPU: two settings measured in their own child
processes plus one that fails (a W4A16 folder that does not exist) and is reported in its row; the planner's
predictions next to the measurements (weights bytes and KV capacity equal), outputs written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cli_two_settings_and_a_failing_one(demo_model_path, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "studio.compare", str(demo_model_path), "--settings", "fp16,fp16-kv4,w4a16",
           "--awq-model", str(tmp_path / "no-such-awq-folder"), "--session-len", "128", "--prompt-len", "8",
           "--new-tokens", "4", "--concurrency", "2", "--cpu-kv-cache-bytes", str(4 * 2**20), "--device", "cpu",
           "--sessions", "2", "--max-kld", "0.05", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one row failed: the exit code says so
    result = json.loads((out / "compare.json").read_text())
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == ["fp16", "fp16-kv4", "w4a16"]
    fp16, kv4, bad = rows["fp16"], rows["fp16-kv4"], rows["w4a16"]
    assert fp16["status"] == kv4["status"] == "ok", (fp16.get("error"), kv4.get("error"))
    assert bad["status"] == "error" and "no-such-awq-folder" in bad["error"] and "does not exist" in bad["error"]
    # planner vs engine: weights bytes and KV capacity agree exactly
    for r in (fp16, kv4):
        assert r["weights_bytes"] == r["pred_weights_bytes"] and r["weights_bytes_match"] is True
        assert r["kv_capacity_tokens"] == r["pred_kv_capacity_tokens"]
        assert r["max_sessions"] == r["pred_max_sessions"] == r["kv_capacity_tokens"] // 128
        assert r["memory_kind"].startswith("CPU memory") and r["memory_peak_GiB"] >= r["memory_after_load_GiB"] > 0
        assert r["decode_tok_s"] > 0 and r["throughput_tok_s"] > 0 and r["ttft_ms"] > 0
        assert r["perplexity"] > 1 and len(r["greedy_token_ids"]) == 4
        assert "meaningless" in r["quality_note"]
    # KV capacity grows with the KV policy exactly as the engine's bytes per token say (same budget)
    assert kv4["kv_bytes_per_token"] < fp16["kv_bytes_per_token"]
    block = 64
    budget = 0.8 * 4 * 2**20
    for r in (fp16, kv4):
        assert r["kv_capacity_tokens"] == int(budget // (r["kv_bytes_per_token"] * block)) * block
    assert kv4["kv_capacity_tokens"] > 2 * fp16["kv_capacity_tokens"]
    assert fp16["greedy_match"] == "4/4 (reference)" and kv4["greedy_match"].endswith("/4")
    md = (out / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| setting | session_len |"))
    for col in ("setting", "status", "pred_weights_GiB", "weights_GiB", "kv_capacity_tokens", "max_sessions",
                "memory_peak_GiB", "decode_tok_s", "throughput_tok_s", "ttft_ms", "perplexity", "error"):
        assert f" {col} " in header, header
    assert "does not exist" in md and "CPU memory" in md
    # quality against the 16-bit reference (fp16's own child saved it): fp16 vs itself is 0, int4 KV is not
    assert fp16["kld_mean"] == 0 and fp16["top1"] == 1 and kv4["kld_mean"] > 0 and 0 < kv4["top1"] <= 1
    assert set(kv4["quality"]) == {"prose", "code", "chat", "chinese", "all"}
    assert result["reference"].startswith("fp16 @ 128")
    # the planner's fit before the run, printed and in the markdown
    assert "Planner, before the run:" in proc.stdout and "- fp16 @ 128 / 0.8: fits" in proc.stdout
    assert "- w4a16 @ 128 / 0.8: cannot run" in md
    # the verdict: the fastest measured row with >= 2 sessions, named with its numbers (random weights: the mean
    # KLD <= 0.05 constraint is not judged, and the line says so)
    meets = [r for r in (fp16, kv4) if r["max_sessions"] >= 2]
    best = max(meets, key=lambda r: (r["throughput_tok_s"], r["decode_tok_s"]))
    line = result["verdict"]["line"]
    assert result["verdict"]["setting"] == f"{best['setting']} @ 128 / 0.8"
    assert line.startswith(f"Verdict: {best['setting']} @ 128 / 0.8 is the fastest setting that meets")
    assert f"throughput {best['throughput_tok_s']:.1f} tok/s" in line and f"mean KLD {best['kld_mean']:.4f}" in line
    assert line in md and line in proc.stdout and "random weights: KL divergence not judged" in line
    assert "| text |" in md and "| chinese |" in md  # the per-text quality table
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bad_setting_is_refused_at_the_door(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "studio.compare", str(tmp_path), "--settings", "fp16,int3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown setting 'int3'" in proc.stderr


def test_cancel_kills_the_child(demo_model_path):
    """ChildRunner.cancel from another thread kills the running child's process group at once."""
    import threading
    import time
    from dataclasses import asdict

    from studio.compare import Cancelled, ChildRunner, Workload

    runner = ChildRunner()
    payload = {"model_path": str(demo_model_path), "quant_policy": 0, "dtype": "auto", "is_w4a16": False,
               "session_len": 512, "cache_max_entry_count": 0.8, "load_format": "auto",
               "workload": asdict(Workload(prompt_len=16, new_tokens=400, concurrency=1, device="cpu")),
               "cpu_kv_cache_bytes": 4 * 2**20}
    started = threading.Event()
    pids = []

    def on_progress(stage, fraction):
        if stage == "batch-1 decode":
            pids.append(runner.proc.pid)
            started.set()

    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_run(runner, payload, on_progress, Cancelled)))
    thread.start()
    assert started.wait(180), "the child never reached its decode stage"
    t0 = time.monotonic()
    runner.cancel()
    thread.join(60)
    assert outcome == ["cancelled"] and time.monotonic() - t0 < 30
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # gone, not left behind
    assert runner.proc is None


def _run(runner, payload, on_progress, cancelled):
    try:
        runner.run(payload, on_progress)
        return "finished"
    except cancelled:
        return "cancelled"


def test_verdict_names_why_no_setting_qualifies_and_picks_the_fastest_that_does():
    from studio.compare import CompareSpec, parse_settings, verdict

    spec = CompareSpec("m", parse_settings("fp16,w4a16,w4a16-kv4"), [2048], [0.8], gpu_memory_gb=24, sessions=4,
                       max_kld=0.05)
    base = {"session_len": 2048, "cache_max_entry_count": 0.8, "status": "ok", "top1": 0.9, "kld_p99": 0.2}
    rows = [dict(base, setting="fp16", memory_peak_GiB=30.0, max_sessions=8, kld_mean=0.0, throughput_tok_s=90.0),
            dict(base, setting="w4a16", memory_peak_GiB=10.0, max_sessions=6, kld_mean=0.02, throughput_tok_s=70.0),
            dict(base, setting="w4a16-kv4", memory_peak_GiB=8.0, max_sessions=20, kld_mean=0.09,
                 throughput_tok_s=120.0)]
    got = verdict(rows, spec, "cuda")
    assert got["setting"] == "w4a16 @ 2048 / 0.8" and "throughput 70.0 tok/s" in got["line"]
    assert "1 of 3 settings qualify" in got["line"] and "peak memory <= 24 GB" in got["line"]
    rows[1]["max_sessions"] = 3
    none = verdict(rows, spec, "cuda")
    assert none["setting"] is None and none["line"].startswith("Verdict: no setting meets")
    for why in ("peak 30.00 GiB > 24 GB", "3 sessions of 2048 tokens < 4", "mean KLD 0.0900 > 0.05"):
        assert why in none["line"], none["line"]
