"""`--help` answers before any heavy import: the entry points parse their arguments first, so `python app.py
--help`, `python -m quant --help`, `python -m studio.compare --help` and `python -m studio.chat --help` never load
torch, transformers, gradio, fastapi or uvicorn (19 s / 8 s on a loaded machine when they did). Checked by what
the process imported, not by timing it; the help text itself names the command and its options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "gradio", "fastapi", "uvicorn", "triton")
PROBE = """
import contextlib, io, json, runpy, sys
kind, target, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [target, *argv]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        runpy.run_path(target, run_name="__main__") if kind == "path" else runpy.run_module(target, run_name="__main__")
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code, "help": out.getvalue(), "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


@pytest.mark.parametrize(("kind", "target", "usage", "options"), [
    ("path", "app.py", "usage: app.py", ["--server-port", "--quant-policy", "--max-connections"]),
    ("module", "quant", "usage: python -m quant", ["--work-dir", "--calib-dataset", "--dtype"]),
    ("module", "studio.compare", "usage: python -m studio.compare",
     ["--settings", "--awq-model", "--quantize", "--session-len", "--timeout", "w4a16-kv4", "fp32-kv8"]),
    ("module", "studio.chat", "usage: python -m studio.chat", ["--max-new-tokens", "--demo"]),
])
def test_help_answers_without_heavy_imports(kind, target, usage, options):
    proc = subprocess.run([sys.executable, "-c", PROBE, kind, target, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and report["heavy"] == [], report["heavy"]
    assert report["help"].startswith(usage), report["help"][:200]
    for option in options:
        assert option in report["help"], option
