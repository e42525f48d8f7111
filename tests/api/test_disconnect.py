"""A client that goes away aborts its requests at once, streaming or not, and their KV blocks are freed."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.api.conftest import MODEL_NAME, wait_until_idle

LONG = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 450,
        "ignore_eos": True}


def _metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("n", [1, 3])
def test_stream_disconnect_aborts_and_frees_blocks(base_url, pipe, n):
    wait_until_idle(pipe)
    aborted = pipe.engine.stats.num_aborted
    with httpx.Client(base_url=base_url, timeout=30) as http:
        gone = _metric(http, "studio_client_disconnects_total")
        with http.stream("POST", "/v1/chat/completions", json={**LONG, "n": n, "stream": True}) as r:
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data: {") and '"content":"' in line and '"content":""' not in line
                if seen >= 2 * n:
                    break
            assert pipe.engine.num_running == n and pipe.memory()["used_kv_blocks"] > 0
        # leaving the block closed the connection mid-stream
        start = time.monotonic()
        wait_until_idle(pipe, timeout_s=5)
        assert time.monotonic() - start < 3.0
        assert pipe.engine.stats.num_aborted - aborted == n
        assert _metric(http, "studio_client_disconnects_total") == gone + 1
        assert _metric(http, "studio_api_requests_in_flight") == 0


def test_non_stream_disconnect_aborts(base_url, pipe):
    wait_until_idle(pipe)
    aborted = pipe.engine.stats.num_aborted
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(30, read=0.6)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True,
                                                    "n": 2})
    wait_until_idle(pipe, timeout_s=5)
    assert pipe.engine.stats.num_aborted - aborted == 2
    with httpx.Client(base_url=base_url, timeout=30) as http:
        assert _metric(http, "studio_api_requests_in_flight") == 0
        assert _metric(http, "studio_kv_cache_used_blocks") == 0


def test_disconnect_noticed_by_polling_when_the_server_does_not_cancel(manager, pipe):
    """Under ASGI spec 2.4 servers starlette stops listening for http.disconnect and sends into the void; the API
    then notices the hang-up itself by polling request.is_disconnected(). Drive the app as such a server would."""
    import asyncio
    import json

    from api import build_api

    app = build_api(manager)
    body = json.dumps({**LONG, "stream": True}).encode()
    wait_until_idle(pipe)
    aborted = pipe.engine.stats.num_aborted

    async def drive() -> float:
        state = {"body_sent": False, "chunks": 0}
        hung_up = asyncio.Event()

        async def receive():
            if not state["body_sent"]:
                state["body_sent"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await hung_up.wait()
            return {"type": "http.disconnect"}

        async def send(message):  # like a server whose client left: accepts everything, delivers nothing
            if message["type"] == "http.response.body" and message.get("body"):
                state["chunks"] += 1
                if state["chunks"] == 3:
                    hung_up.set()

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
                 "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 80)}
        start = asyncio.get_running_loop().time()
        await asyncio.wait_for(app(scope, receive, send), 20)
        return asyncio.get_running_loop().time() - start

    elapsed = asyncio.run(drive())
    assert elapsed < 5, "the stream ran on after the client left"
    wait_until_idle(pipe, timeout_s=5)
    assert pipe.engine.stats.num_aborted - aborted == 1
    assert app.state.api.metrics.num_client_disconnects == 1
    assert app.state.api.admission.in_flight == 0
