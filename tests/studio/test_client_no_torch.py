"""`python -m studio.client` is a laptop client: it must run with httpx alone. A subprocess whose import system
refuses torch (and gradio / transformers / fastapi) runs it against an address where nothing listens: it must get
as far as trying to connect and say so, never fail on an import."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = textwrap.dedent("""
    import runpy, sys

    BLOCKED = ("torch", "gradio", "transformers", "fastapi", "triton")

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Refuse())
    sys.argv = ["studio.client", *sys.argv[1:]]
    try:
        runpy.run_module("studio.client", run_name="__main__", alter_sys=True)
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("BLOCKED-LOADED:", loaded, file=sys.stderr)
""")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_blocker_really_blocks_torch():
    proc = subprocess.run([sys.executable, "-c", BLOCKER.replace('runpy.run_module("studio.client"',
                                                                 'runpy.run_module("engine.pipeline"'), "x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr, proc.stderr[-2000:]


def test_client_runs_without_torch():
    proc = run_client("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OpenAI-compatible server" in proc.stdout
    port = closed_port()
    proc = run_client(f"http://127.0.0.1:{port}")
    assert proc.returncode == 1, (proc.stdout, proc.stderr[-2000:])
    assert f"cannot reach http://127.0.0.1:{port}/v1" in proc.stderr
    assert "BLOCKED-LOADED: []" in proc.stderr and "ImportError" not in proc.stderr
