"""`python -m quant`: end to end in a subprocess, and the exit codes of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from quant.__main__ import main
from tests.quant.conftest import GROUP_SIZE

REPO = Path(__file__).resolve().parents[2]


def test_cli_end_to_end(llama_path, calib_txt, tmp_path):
    out = tmp_path / "llama-w4"
    cmd = [
        sys.executable, "-m", "quant", str(llama_path), "--work-dir", str(out), "--calib-dataset", str(calib_txt),
        "--calib-samples", "4", "--calib-seqlen", "32", "--w-bits", "4", "--w-group-size", str(GROUP_SIZE),
        "--search-scale", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout and "AWQ / RTN" in proc.stdout
    assert "quantize" in proc.stderr  # the tqdm bars
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["group_size"] == GROUP_SIZE
    report = json.loads((out / "quant_report.json").read_text())
    assert report["settings"]["search_scale"] is True and report["settings"]["calib_samples"] == 4


def test_cli_bad_input_exit_code(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--work-dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model path") and "does not exist" in err
    assert not (tmp_path / "out").exists()
