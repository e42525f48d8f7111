"""`python -m quant` as a new user runs it offline: the default calibration set needs no network, --quiet prints
no progress bar (the libraries' included), and the written folder's README says it is an AWQ quantization."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_offline_default_quiet_run_and_the_model_card(demo_model_path, tmp_path):
    out = tmp_path / "demo-awq"
    cmd = [sys.executable, "-m", "quant", str(demo_model_path), "--work-dir", str(out), "--calib-samples", "4",
           "--calib-seqlen", "64", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # no hub, however it is asked
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "it/s" not in proc.stderr and "%|" not in proc.stderr, proc.stderr[-2000:]  # no bar of any kind
    assert "calibration: built-in offline text" in proc.stdout and "4 samples x 64 tokens" in proc.stdout
    report = json.loads((out / "quant_report.json").read_text())
    assert report["settings"]["calib_dataset"] == "builtin" and report["settings"]["calib_samples"] == 4
    assert report["settings"]["calib_samples_requested"] == 4
    card = (out / "README.md").read_text()
    assert card.startswith(f"# {demo_model_path.name}: AWQ W4A16 (group size 128)")
    source_card = (demo_model_path / "README.md").read_text()
    assert card.rstrip().endswith(source_card.rstrip())  # the original card follows, whole
