"""Regression tests of hardening round 3 (issue 24), each against a real server on 127.0.0.1: unauthenticated
sockets cannot starve a client with credentials, and reach nothing but /health and the login page; every body is
capped on the bytes read (a 500 MB multipart login leaves the server's memory flat); Compare obeys the folder policy
with Model's answer; scoring holds admission slots; budgets on prompt tokens, output and answer size; a long request
never starves a short one; OpenAI-shaped 405s; a half-closed client still gets its answer."""

from __future__ import annotations

import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import app as studio_app
from tests.api.conftest import MODEL_NAME, wait_until_idle

KEY = "k-round3"
AUTH = {"Authorization": f"Bearer {KEY}"}


def parse(*argv: str):
    return studio_app.build_parser().parse_args(list(argv))


def serve(app, **options):
    from api import uvicorn_options
    from api.background import BackgroundServer

    return BackgroundServer(app, **uvicorn_options(budget=app.state.connection_budget, **options))


@pytest.fixture(scope="module")
def keyed(demo_model_path, tmp_path_factory):
    """The whole app (UI + API) with an API key, a 200-connection cap and a 1 MiB upload cap; no model loaded."""
    out = tmp_path_factory.mktemp("round3-out")
    app, _ = studio_app.create_app(parse("--no-model", "--api-keys", KEY, "--demo-model-dir", str(demo_model_path),
                                         "--quant-output-root", str(out), "--max-upload-mb", "1"))
    with serve(app, max_connections=200) as srv:
        yield srv, app


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def login_cookies(url: str) -> httpx.Cookies:
    r = httpx.post(url + "/login", data={"username": "me", "password": KEY}, timeout=60)
    assert r.status_code == 200, r.text
    return r.cookies


# ---- 1. unauthenticated clients ------------------------------------------------------------------------------
def test_without_credentials_only_health_and_the_login_page_answer(keyed):
    srv, _ = keyed
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/health").status_code == 503  # open (no model loaded here)
        assert c.get("/").status_code == 200  # the login page
        with c.stream("GET", "/gradio_api/heartbeat/h1") as r:
            assert r.status_code == 401  # not an endless "ALIVE" stream
        for path in ("/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/upload", "/gradio_api/queue/join"):
            r = c.post(path, json={"event_id": "x", "session_hash": "x", "fn_index": 0, "data": []})
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "login_required"
        c.cookies = login_cookies(srv.url)
        with c.stream("GET", "/gradio_api/heartbeat/h1") as r:
            assert r.status_code == 200  # logged in: the heartbeat streams as before


def test_a_thousand_unauthenticated_sockets_cannot_starve_an_authenticated_client(keyed):
    srv, app = keyed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    budget = app.state.connection_budget
    attackers: list[socket.socket] = []
    start = time.monotonic()
    try:
        for i in range(1000):
            s = socket.create_connection((srv.host, srv.port), timeout=30)
            if i % 2:
                try:  # a streaming route, no credentials (sent blind: the server may have closed this one already)
                    s.sendall(f"GET /gradio_api/heartbeat/h{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                except OSError:
                    pass
            attackers.append(s)
        for _ in range(20):  # while they are held: new connections with the key, each served
            r = httpx.get(srv.url + "/v1/models", headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as kept:
            for _ in range(10):
                assert kept.get("/v1/models").status_code == 200
        assert budget.num_untrusted <= budget.max_untrusted
        assert budget.num_evicted > 500  # they were cut, not merely outnumbered
        assert time.monotonic() - start < 300
    finally:
        for s in attackers:
            s.close()


def test_the_address_holding_most_unauthenticated_sockets_loses_them_first(keyed):
    srv, app = keyed
    budget = app.state.connection_budget
    evicted = budget.num_evicted
    early = socket.create_connection((srv.host, srv.port), timeout=60)  # opened first, request not sent yet
    flood = []
    try:
        for _ in range(3 * budget.max_untrusted):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))  # another loopback address as the source; the server is still 127.0.0.1
            s.settimeout(30)
            s.connect((srv.host, srv.port))
            flood.append(s)
        _wait_for(lambda: budget.num_evicted - evicted >= 2 * budget.max_untrusted, "the flood to be cut")
        early.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
        assert early.recv(65536).startswith(b"HTTP/1.1 200")  # the oldest, yet kept: its address held one
    finally:
        early.close()
        for s in flood:
            s.close()


# ---- 2. body caps ---------------------------------------------------------------------------------------------
MULTIPART_HEAD = (b"--B\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nme\r\n"
                  b"--B\r\nContent-Disposition: form-data; name=\"password\"; filename=\"p\"\r\n"
                  b"Content-Type: application/octet-stream\r\n\r\n")


def send_chunked(host: str, port: int, path: str, total: int, head: bytes = MULTIPART_HEAD,
                 extra_headers: bytes = b"") -> tuple[int, bytes]:
    """POST a chunked multipart body of `total` bytes (less if the server stops it); (bytes sent, what came back)."""
    chunk = b"x" * 2**20
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent = 0
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=B\r\n" + extra_headers + b"\r\n")
        try:
            s.sendall(b"%x\r\n" % len(head) + head + b"\r\n")
            while sent < total:
                s.sendall(frame)
                sent += len(chunk)
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending: refused
        answer = b""
        try:
            while data := s.recv(65536):
                answer += data
        except OSError:
            pass
    return sent, answer


def test_a_dozen_500_mb_multipart_logins_leave_memory_flat(keyed):
    srv, _ = keyed
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: send_chunked(srv.host, srv.port, "/login", 500 * 2**20), range(12)))
    finally:
        done.set()
        sampler.join()
    assert all(sent < 500 * 2**20 for sent, _ in results)  # cut early, not read to the end
    answered = [a for _, a in results if a]
    assert all(a.startswith(b"HTTP/1.1 413") for a in answered), answered[:1]
    assert peak[0] - before < 50 * 2**20, f"RSS grew by {(peak[0] - before) / 2**20:.0f} MiB"
    login_cookies(srv.url)  # a normal login still works


def test_uploads_are_capped_on_the_bytes_read(keyed):
    srv, _ = keyed
    cookies = login_cookies(srv.url)
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items()).encode()
    sent, answer = send_chunked(srv.host, srv.port, "/gradio_api/upload", 64 * 2**20,
                                head=b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"c.txt\"\r\n"
                                     b"Content-Type: text/plain\r\n\r\n",
                                extra_headers=b"Cookie: " + cookie + b"\r\n")
    assert sent < 64 * 2**20
    assert not answer or answer.startswith(b"HTTP/1.1 413")
    r = httpx.post(srv.url + "/gradio_api/upload", cookies=cookies, timeout=60,
                   files={"files": ("c.txt", b"hello calibration\n", "text/plain")})
    assert r.status_code == 200, r.text  # under the cap: stored as before


# ---- 3. Compare obeys --model-dir ------------------------------------------------------------------------------
def test_compare_refuses_outside_paths_with_the_model_tabs_answer(tmp_path, demo_model_path):
    from ui.common import friendly_error
    from ui.compare_tab import build_spec, predicted_table
    from ui.model_tab import load_model
    from ui.state import StudioSettings, StudioState

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "secret").mkdir()
    settings = StudioSettings(demo_model_dir=Path(demo_model_path), quant_output_root=tmp_path / "out",
                              model_roots=studio_app.model_roots(parse("--model-dir", str(allowed))))
    state = StudioState(settings=settings)
    form = ["fp16"], "", "0.5", "16", "8", "1", "local"
    answers = set()
    for outside in (str(tmp_path / "secret"), str(tmp_path / "missing")):
        with pytest.raises(PermissionError) as refused:
            build_spec(state, outside, "", *form)
        answers.add(friendly_error(refused.value))
        with pytest.raises(PermissionError) as refused:  # the AWQ folder of the W4A16 rows too
            build_spec(state, str(demo_model_path), outside, *form)
        answers.add(friendly_error(refused.value))
        _, note = predicted_table(state, outside, "", *form)
        assert "must be inside" in note and "config.json" not in note and "does not exist" not in note
        status, _, _ = load_model(state, outside, "auto", "auto", 0, 0.5, 256, 4, False)
        assert next(iter(answers)) in status
    assert len(answers) == 1  # existing or missing, Compare or Model: one answer
    assert build_spec(state, str(demo_model_path), "", *form).model == str(demo_model_path)  # inside: accepted


# ---- 4 / 5. admission and budgets -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(manager):
    from api import build_api
    from api.background import BackgroundServer
    from api.limits import RequestLimits

    limits = RequestLimits(max_prompt_tokens=2000, max_response_bytes=2**19)
    app = build_api(manager, max_concurrent_requests=4, limits=limits)
    with BackgroundServer(app) as srv:
        yield srv, app


def _wait_for(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_scoring_waits_its_turn_behind_the_concurrency_limit(limited, pipe):
    srv, app = limited
    wait_until_idle(pipe)
    admission = app.state.api.admission
    score = {"model": MODEL_NAME, "prompt": ["one two three"] * 4, "echo": True, "logprobs": 5, "max_tokens": 0}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        hold = {"model": MODEL_NAME, "prompt": "hi", "n": 4, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=hold) as held:
            assert held.status_code == 200
            _wait_for(lambda: admission.in_flight == 4, "the stream to hold every slot")
            r = c.post("/v1/completions", json=score)
            assert r.status_code == 429 and r.headers["retry-after"], r.text  # queued behind it, not run beside it
        _wait_for(lambda: admission.in_flight == 0, "the slots to come back")
        seen = []
        with ThreadPoolExecutor(8) as pool:
            watching = threading.Event()

            def watch():
                while not watching.is_set():
                    seen.append(admission.in_flight)
                    watching.wait(0.005)

            watcher = pool.submit(watch)
            answers = list(pool.map(lambda _: c.post("/v1/completions", json=score), range(6)))
            watching.set()
            watcher.result()
        assert {a.status_code for a in answers} <= {200, 429} and 200 in {a.status_code for a in answers}
        assert max(seen) <= 4
        ok = next(a for a in answers if a.status_code == 200).json()
        assert len(ok["choices"]) == 4 and ok["choices"][0]["logprobs"]["token_logprobs"][0] is None
    wait_until_idle(pipe)


def test_a_request_s_prompt_tokens_have_a_budget(limited):
    srv, _ = limited
    r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
        "model": MODEL_NAME, "prompt": [[5] * 400] * 4, "n": 1, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 200, r.text  # 1,600 tokens: under 2,000
    r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
        "model": MODEL_NAME, "prompt": [[5] * 510] * 4, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 400 and "--max-prompt-tokens-per-request" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", timeout=60, json={  # 1,600 tokens x 21 logprobs: over 0.5 MiB
        "model": MODEL_NAME, "prompt": [[5] * 400] * 4, "echo": True, "logprobs": 20, "max_tokens": 0, "stream": True})
    assert r.status_code == 400 and "--max-response-mb" in r.json()["error"]["message"]


def test_unbounded_answers_are_refused_or_capped(http, pipe):
    huge = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "n": 128, "max_tokens": 10**9,
            "logprobs": True, "top_logprobs": 20, "ignore_eos": True}
    r = http.post("/v1/chat/completions", json=huge)
    assert r.status_code == 400 and "--max-output-tokens-per-request" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={**huge, "stream": True})
    assert r.status_code == 400
    wait_until_idle(pipe)


def test_a_big_answer_that_is_not_streamed_is_refused_with_a_hint(limited, pipe):
    srv, _ = limited
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300,
            "logprobs": True, "top_logprobs": 20}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
        assert "--max-response-mb" in r.json()["error"]["message"]
        with c.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 4, "stream": True}) as r:
            assert r.status_code == 200
            r.read()
        r = c.post("/v1/chat/completions", json={**body, "max_tokens": None})  # unset: fitted, not refused
        assert r.status_code == 200, r.text
    wait_until_idle(pipe)


def test_a_short_request_is_served_while_a_long_one_runs(http, base_url, pipe):
    wait_until_idle(pipe)
    batch = pipe.engine.config.max_batch_size
    long_req = {"model": MODEL_NAME, "prompt": "Once upon a time", "n": batch, "max_tokens": 400,
                "ignore_eos": True, "stream": True}
    finished = {"long": None, "short": None}
    with httpx.Client(base_url=base_url, timeout=120) as c:
        with c.stream("POST", "/v1/completions", json=long_req) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            _wait_for(lambda: pipe.engine.num_running >= batch, "the long request to fill the batch")
            short = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
            assert short.status_code == 200
            finished["short"] = time.monotonic()
            assert pipe.engine.num_running > 0  # the long one still runs: the short one did not wait for it
            for line in lines:
                if line == "data: [DONE]":
                    finished["long"] = time.monotonic()
                break  # enough: leaving the block closes the stream and aborts the rest
    assert finished["long"] is None
    assert pipe.engine.scheduler.num_fair_preemptions >= 1
    wait_until_idle(pipe)


# ---- 6. small ones -------------------------------------------------------------------------------------------------
def test_wrong_methods_and_options_get_openai_errors(keyed, demo_model_path):
    from fastapi.testclient import TestClient

    srv, _ = keyed
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for method, path, headers in (("POST", "/health", {}), ("DELETE", "/health", {}), ("POST", "/metrics", AUTH),
                                      ("DELETE", "/metrics", AUTH), ("OPTIONS", "/v1/chat/completions", AUTH)):
            r = c.request(method, path, headers=headers)
            assert r.status_code == 405, (method, path, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error" and r.headers["allow"]
        assert c.get("/v1/nope", headers=AUTH).json()["error"]["code"] == "not_found"
        c.cookies = login_cookies(srv.url)
        for method, path, status in (("GET", "/nope", 404), ("POST", "/gradio_api/nope", 404), ("DELETE", "/", 405)):
            r = c.request(method, path)  # the UI's own router, logged in: OpenAI's shape too
            assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error", (path, r.text)
    app, _ = studio_app.create_app(parse("--no-model", "--demo-model-dir", str(demo_model_path), "--allow-origins",
                                         "https://app.example"))
    with TestClient(app) as client:
        r = client.options("/v1/chat/completions", headers={"Origin": "https://app.example",
                                                            "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"


def test_a_half_closed_client_still_gets_its_answer(server, pipe):
    body = (b'{"model": "%s", "prompt": "hi", "max_tokens": 3}' % MODEL_NAME.encode())
    with socket.create_connection((server.host, server.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while data := s.recv(65536):
            answer += data
    final = answer.split(b"HTTP/1.1 100 Continue\r\n\r\n")[-1]  # interim lines the server may send first
    assert final.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b'"text_completion"' in final
    wait_until_idle(pipe)
