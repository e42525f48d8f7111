"""AWQ on the real model (SmolLM2-135M-Instruct): `python -m quant` at group size 64 (576 is not a multiple of 128:
the tool refuses 128 and names what fits), then perplexity through the engine on held-out prose, a different text
from the calibration set: AWQ must keep clearly more of the 16-bit quality than plain round-to-nearest.

The calibration is small (a CPU budget: 8 samples x 256 tokens of the built-in set); BENCHMARKS.md's quality table
has the full-size run. The figures are printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import EngineConfig, pipeline
from studio.quality import heldout_text, perplexity

REPO = Path(__file__).resolve().parents[2]
GROUP = 64
HELDOUT_CHARS = 4000  # about 900 tokens of the held-out text


def run_quant(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "quant", str(model), "--work-dir", str(out), "--device", "cpu", "--quiet", *extra]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=1800)


def ppl(folder: Path) -> float:
    config = EngineConfig(dtype="float32", session_len=1025, cpu_kv_cache_bytes=128 * 2**20)
    with pipeline(folder, config) as pipe:
        return perplexity(pipe, heldout_text(HELDOUT_CHARS), window=512).ppl


def test_real_model_group_128_is_refused_with_the_sizes_that_fit(real_model_path, tmp_path):
    proc = run_quant(real_model_path, tmp_path / "g128", "--w-group-size", "128")
    assert proc.returncode != 0
    assert "576" in proc.stderr and "64 or 32" in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "g128").exists()


@pytest.mark.timeout(2400)
def test_real_model_awq_beats_round_to_nearest_on_heldout_perplexity(real_model_path, tmp_path):
    awq, rtn = tmp_path / "awq", tmp_path / "rtn"
    small = ("--calib-samples", "8", "--calib-seqlen", "256", "--search-tokens", "2048")
    done = run_quant(real_model_path, awq, "--w-group-size", str(GROUP), *small)
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_quant(real_model_path, rtn, "--w-group-size", str(GROUP), "--method", "rtn")
    assert done.returncode == 0, done.stderr[-2000:]
    base, p_awq, p_rtn = ppl(real_model_path), ppl(awq), ppl(rtn)
    print(f"\nheld-out perplexity, group {GROUP}: 16-bit {base:.3f}, AWQ {p_awq:.3f} "
          f"({(p_awq / base - 1) * 100:+.1f}%), RTN {p_rtn:.3f} ({(p_rtn / base - 1) * 100:+.1f}%)")
    assert base < p_awq < p_rtn
    assert (p_awq - base) < 0.75 * (p_rtn - base), "AWQ should remove a clear part of RTN's perplexity loss"
