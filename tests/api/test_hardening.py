"""Regression tests of the hardening issue on the API: per-request numbers validated against the model at the door
(400, and innocent requests unharmed), the body cap enforced on the bytes read (chunked bodies too), prompts too long
by their characters refused before tokenizing, read deadlines and a connection cap, /v1/models showing an id."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.conftest import MODEL_NAME, SESSION_LEN, wait_until_idle


def chat(http, **extra):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    return http.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("extra, param", [
    ({"top_k": 10**20}, "top_k"),
    ({"stop_token_ids": [10**6], "min_tokens": 1}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": 2**64 + 5}, "seed"),
])
def test_out_of_range_sampling_values_are_400_and_hurt_nobody(http, pipe, extra, param):
    vocab = pipe.engine.spec.vocab_size
    if extra.get("stop_token_ids") == [10**6]:
        extra = {**extra, "stop_token_ids": [vocab]}  # the first id past the vocabulary
    with ThreadPoolExecutor(8) as pool:
        innocent = [pool.submit(chat, http) for _ in range(6)]
        bad = [pool.submit(chat, http, **extra) for _ in range(2)]
        for f in bad:
            r = f.result()
            assert r.status_code == 400, r.text
            assert param in r.text
        for f in innocent:
            assert f.result().status_code == 200
    for stream in (False, True):
        r = chat(http, stream=stream, **extra)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    wait_until_idle(pipe)


def test_chunked_body_over_the_cap_is_413_without_reading_it_all(manager):
    from api import build_api
    from api.background import BackgroundServer

    sent = [0]

    def chunks():
        for _ in range(64):  # 64 MiB offered, cap 1 MiB
            sent[0] += 1
            yield b"x" * 2**20

    with BackgroundServer(build_api(manager, max_body_bytes=2**20)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            try:
                r = c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
                assert r.status_code == 413
            except httpx.HTTPError:
                pass  # the server answered 413 and closed while the client was still sending: also refused
            assert sent[0] < 64
            assert c.get("/health").status_code == 200


def test_a_prompt_too_long_by_its_characters_is_refused_before_tokenizing(http, pipe, monkeypatch):
    calls = []
    original = pipe.encode
    monkeypatch.setattr(pipe, "encode", lambda *a, **k: calls.append(1) or original(*a, **k))
    huge = "a" * (SESSION_LEN * 64 + 1)  # more characters than SESSION_LEN tokens can cover in this vocabulary
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": huge, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": huge}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []
    assert http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_models_list_shows_an_id_not_a_path(http, pipe):
    card = http.get("/v1/models").json()["data"][0]
    assert card["id"] == MODEL_NAME and card["root"] == MODEL_NAME
    assert str(pipe.model_path) not in http.get("/v1/models").text


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""  # orderly close, nothing answered
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_slow_headers_and_bodies_are_cut_and_connections_are_capped(manager):
    from api import build_api, uvicorn_options
    from api.background import BackgroundServer

    options = uvicorn_options(header_timeout_s=1.0, body_timeout_s=1.0, max_connections=4)
    with BackgroundServer(build_api(manager), **options) as srv:
        slow_headers = socket.create_connection((srv.host, srv.port))
        slow_headers.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
        slow_body = socket.create_connection((srv.host, srv.port))
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        start = time.monotonic()
        assert _closed_within(slow_headers, 20) and _closed_within(slow_body, 20)
        assert time.monotonic() - start < 15
        held = [socket.create_connection((srv.host, srv.port)) for _ in range(4)]
        extra = socket.create_connection((srv.host, srv.port))
        assert _closed_within(extra, 10)  # past the cap: closed at once
        for s in held + [slow_headers, slow_body, extra]:
            s.close()
        deadline = time.monotonic() + 20
        while True:  # the held sockets are gone: the server takes requests again
            try:
                if httpx.get(srv.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
