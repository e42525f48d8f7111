"""SIGTERM / SIGINT while streams run: `python app.py` stops accepting, ends every running stream with an error
event and [DONE] within the grace period, unloads the model and exits 0, with no traceback on stderr."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_stream(url: str, events: list, started: threading.Event) -> None:
    body = {"messages": [{"role": "user", "content": "tell a long story"}], "max_tokens": 100000, "stream": True,
            "ignore_eos": True}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    events.append(data if data == "[DONE]" else json.loads(data))
                    started.set()
    except httpx.HTTPError as e:
        events.append(e)
    started.set()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_streams_with_an_error_event_and_exits_zero(demo_model_path, sig):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--demo", "--server-port", str(port), "--demo-model-dir",
                             str(demo_model_path), "--no-ui", "--session-len", "4096", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "app.py did not start"
            time.sleep(0.2)
        streams = [([], threading.Event()) for _ in range(4)]
        threads = [threading.Thread(target=read_stream, args=(url, ev, st), daemon=True) for ev, st in streams]
        for t in threads:
            t.start()
        for _, started in streams:
            assert started.wait(60)
        proc.send_signal(sig)
        start = time.monotonic()
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for t in threads:
        t.join(timeout=30)
    assert proc.returncode == 0, err
    assert elapsed < 20
    assert "Traceback" not in err, err
    for events, _ in streams:
        assert events[-1] == "[DONE]", events[-3:]
        error = events[-2]
        assert isinstance(error, dict) and error["error"]["code"] == "server_shutting_down", events[-3:]
