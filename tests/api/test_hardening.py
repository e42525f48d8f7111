"""Regression tests for the attacks that used to hold: bodies capped on the bytes actually read (chunked too),
prompts over the character budget refused before tokenizing, out-of-range sampling numbers refused with 400,
unknown /v1 routes and wrong methods answered in OpenAI error JSON, /v1/models shows no filesystem path, and
slow clients (slowloris) disconnected by read deadlines."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.api.conftest import MODEL_NAME, SESSION_LEN


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_chunked_body_over_the_cap_is_refused_on_bytes_read(manager):
    from api import build_api
    from api.background import BackgroundServer

    cap = 64 * 1024

    def chunks():  # no Content-Length: the cap must count what is read
        for _ in range(40):
            yield b'{"model": "demo", "prompt": "' + b"a" * 4096
        yield b'"}'

    with BackgroundServer(build_api(manager, max_body_bytes=cap)) as srv:
        r = httpx.post(srv.url + "/v1/completions", content=chunks(), timeout=60,
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert "bytes" in error_of(r)["message"]


def test_prompt_over_the_character_budget_is_refused_before_tokenizing(http):
    huge = "word " * (SESSION_LEN * 200)  # far more characters than any SESSION_LEN tokens can hold
    start = time.monotonic()
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": huge, "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert "characters" in error_of(r)["message"]
    assert time.monotonic() - start < 30  # refused by counting, not by tokenizing megabytes


@pytest.mark.parametrize("extra, param", [
    ({"top_k": 10**20}, "top_k"),
    ({"seed": 2**70}, "seed"),
    ({"stop_token_ids": [10**6], "min_tokens": 1}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_out_of_range_sampling_numbers_are_400_and_others_keep_working(http, extra, param):
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert param in error_of(r)["message"] or error_of(r).get("param") == param, r.text
    ok = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_unknown_routes_and_wrong_methods_get_openai_errors(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"] and error_of(r)["code"] == "method_not_allowed"


def test_models_list_shows_an_id_not_a_path(http):
    data = http.get("/v1/models").json()["data"]
    assert data and all("/" not in (m.get("root") or "") for m in data), data


def test_slow_clients_are_disconnected(manager):
    from api import build_api
    from api.background import BackgroundServer
    from api.server import uvicorn_options

    with BackgroundServer(build_api(manager), **uvicorn_options(header_timeout_s=1.0, body_timeout_s=1.0)) as srv:
        def closed_by_server(payload: bytes) -> bool:
            with socket.create_connection((srv.host, srv.port), timeout=30) as s:
                s.sendall(payload)
                s.settimeout(30)
                try:
                    return s.recv(1024) == b""  # the server closed the connection on us
                except ConnectionResetError:
                    return True

        start = time.monotonic()
        assert closed_by_server(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        assert closed_by_server(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert time.monotonic() - start < 60
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200  # and it keeps serving
