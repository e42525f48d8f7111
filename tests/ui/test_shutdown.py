"""SIGTERM / SIGINT while a stream runs: the stream ends with an error event and [DONE], the model is unloaded and
app.py exits 0 without tracebacks (uvicorn's own handler used to re-raise the signal: exit -15, no cleanup)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.ui.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_streams_cleanly_and_exits_zero(sig, demo_model_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--demo-model-dir", str(demo_model_path), "--server-port", str(port),
         "--no-ui", "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "CI": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "app.py did not become healthy"
            time.sleep(0.2)

        lines: list[str] = []
        first = threading.Event()

        def read_stream():
            body = {"model": "demo-model", "prompt": "Once", "max_tokens": 100_000, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        assert first.wait(120), "no streamed chunk arrived"
        proc.send_signal(sig)
        reader.join(timeout=60)
        assert not reader.is_alive(), "the stream was not ended after the signal"
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert lines[-1] == "data: [DONE]", lines[-3:]
    events = [json.loads(line[len("data: "):]) for line in lines[:-1] if line.startswith("data: {")]
    assert any("error" in e for e in events), "the cut stream must say why it ended"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "Quant Studio stopped." in proc.stdout.read()
