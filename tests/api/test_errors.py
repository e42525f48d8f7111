"""Every failure is OpenAI error JSON with the right status, never a 500: unknown model 404, malformed / mistyped /
out-of-range bodies 400 (FastAPI's 422 turned into 400), prompts over session_len 400 naming it, images to a text
model 400, missing or wrong API key 401, past the concurrency limit 429 with Retry-After, no model loaded 503."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.conftest import MODEL_NAME, SESSION_LEN, sse_events, wait_until_idle

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "any":
        assert error["param"] == param
    return error


@pytest.fixture(scope="module")
def extra_server(manager):
    """Start more servers over the same manager; all stop at the module's end."""
    from api import build_api
    from api.background import BackgroundServer

    started = []

    def start(**kwargs) -> str:
        srv = BackgroundServer(build_api(manager, **kwargs)).start()
        started.append(srv)
        return srv.url

    yield start
    for srv in started:
        srv.stop()


# ---- 404 -------------------------------------------------------------------------------------------------------
def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=USER, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and MODEL_NAME in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert_openai_error(http.get("/v1/models/gpt-9"), 404, "model")
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get(CHAT), 405)


# ---- 400: malformed, wrong types, out of range ---------------------------------------------------------------
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("raw", [b"{", b"", b"[]", b"null", b'"text"', b"42", b"\xff\xfe{}", b'{"max_tokens": NaN}',
                                 b'{"messages": [{"role": "user", "content": "x"}], "prompt": "x", "temperature": '
                                 b'Infinity}'])
def test_malformed_bodies_are_400(http, path, raw):
    assert_openai_error(http.post(path, content=raw, headers={"content-type": "application/json"}), 400)


WRONG = [
    ("max_tokens", "5"), ("max_tokens", 1.5), ("max_tokens", True), ("temperature", "hot"), ("temperature", [1]),
    ("n", 1.0), ("stream", "yes"), ("stream", 1), ("seed", "42"), ("stop", 3), ("stop", [1, 2]), ("top_p", None),
    ("stream_options", "yes"), ("model", 5), ("user", 7),
    ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1), ("temperature", 2.5), ("top_p", 0),
    ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("n", 0), ("n", 100000), ("seed", 2**70), ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", ""), ("stop", [""]), ("stop_token_ids", [-1]), ("min_tokens", -1),
]


@pytest.mark.parametrize("field,value", WRONG)
def test_wrong_type_or_out_of_range_is_400(http, field, value):
    for path, body in ((CHAT, {"model": MODEL_NAME, "messages": USER}), (COMPLETIONS, {"prompt": "x"})):
        body = {**body, "max_tokens": 2, field: value}
        if field == "top_p" and value is None:
            continue  # null means "default": accepted
        error = assert_openai_error(http.post(path, json=body), 400)
        assert field in error["message"], error


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "user"}], "max_tokens": 1, "min_tokens": 5},
    {"messages": [{"content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"messages": USER, "top_logprobs": 2},
    {"messages": USER, "logprobs": True, "top_logprobs": 21},
    {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
    {"messages": USER, "response_format": {"type": "json_schema"}},
])
def test_bad_chat_requests_are_400(http, body):
    assert_openai_error(http.post(CHAT, json={"max_tokens": 2, **body}), 400)


@pytest.mark.parametrize("body", [
    {"prompt": []}, {"prompt": [[]]}, {"prompt": ["a", 1]}, {"prompt": [1, "a"]}, {"prompt": [-1]},
    {"prompt": [10**9]}, {"prompt": {"text": "x"}}, {"prompt": "x", "logprobs": 21}, {"prompt": "x", "logprobs": True},
    {"prompt": "x", "suffix": "y"}, {"prompt": "x", "best_of": 3}, {"prompt": "x", "max_tokens": 0},
])
def test_bad_completion_requests_are_400(http, body):
    assert_openai_error(http.post(COMPLETIONS, json={"max_tokens": 2, **body}), 400)


def test_image_to_text_only_model_is_clear_400(client):
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": content}], max_tokens=2)
    assert "image" in e.value.body["message"] and e.value.body["code"] == "image_input_not_supported"


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_session_len_is_400_naming_the_limit(client, stream):
    long_text = "The quick brown fox jumps over the lazy dog. " * 80
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": long_text}],
                                       max_tokens=2, stream=stream)
    assert f"session_len is {SESSION_LEN}" in e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=[1] * (SESSION_LEN + 5), max_tokens=2, stream=stream)
    assert str(SESSION_LEN) in e.value.body["message"]


# ---- 401 and CORS ----------------------------------------------------------------------------------------------
def test_api_keys(extra_server):
    url = extra_server(api_keys=["sk-one", "sk-two"], allow_origins=["http://studio.example"])
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        err = assert_openai_error(http.get("/v1/models"), 401)
        assert err["code"] == "invalid_api_key"
        assert http.get("/v1/models").headers["www-authenticate"] == "Bearer"
        assert_openai_error(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_openai_error(http.get("/v1/models", headers={"Authorization": "sk-one"}), 401)
        assert_openai_error(http.post(CHAT, content=b"{", headers={"content-type": "application/json"}), 401)
        assert_openai_error(http.get("/metrics"), 401)
        assert http.get("/v1/models", headers={"Authorization": "Bearer sk-two"}).status_code == 200
        assert http.get("/metrics", headers={"Authorization": "Bearer sk-one"}).status_code == 200
        # CORS: preflight needs no key; the allowed origin is echoed, others are not
        pre = http.options(CHAT, headers={"Origin": "http://studio.example", "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://studio.example"
        denied = http.options(CHAT, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert denied.headers.get("access-control-allow-origin") != "http://evil.example"
        simple = http.get("/v1/models", headers={"Origin": "http://studio.example"})
        assert simple.status_code == 401 and simple.headers["access-control-allow-origin"] == "http://studio.example"
    good = openai.OpenAI(base_url=url + "/v1", api_key="sk-one", max_retries=0)
    assert good.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2).choices
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2)


# ---- 429 and 413 -----------------------------------------------------------------------------------------------
def test_concurrency_limit_429_with_retry_after(extra_server, pipe):
    url = extra_server(max_concurrent_requests=1, max_body_bytes=4096)
    long_stream = {"model": MODEL_NAME, "messages": USER, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", CHAT, json=long_stream) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # keep it referenced: a dropped iterator closes the connection
            next(lines)  # the request is admitted and running
            busy = http.post(CHAT, json={"messages": USER, "max_tokens": 2})
            err = assert_openai_error(busy, 429)
            assert busy.headers["retry-after"] == "1" and err["code"] == "rate_limit_exceeded"
            assert_openai_error(http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2}), 429)
            limited = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                limited.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
        # leaving the stream closed the connection: the request is aborted and its slot freed
        wait_until_idle(pipe)
        assert http.post(CHAT, json={"messages": USER, "max_tokens": 2}).status_code == 200
        # a request that could never fit is a 400, not an endless 429
        assert_openai_error(http.post(CHAT, json={"messages": USER, "max_tokens": 2, "n": 2}), 400, "n")
        assert_openai_error(http.post(CHAT, json={"messages": [{"role": "user", "content": "x" * 5000}]}), 413)
        metrics = http.get("/metrics").text
    assert "studio_requests_rejected_total 3" in metrics


# ---- 503 -------------------------------------------------------------------------------------------------------
def test_no_model_loaded_is_503(extra_server):
    from api import build_api
    from api.background import BackgroundServer
    from studio.manager import ModelManager

    with BackgroundServer(build_api(ModelManager())) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        assert http.get("/health").status_code == 503
        assert http.get("/v1/models").json() == {"object": "list", "data": []}
        err = assert_openai_error(http.post(CHAT, json={"messages": USER}), 503)
        assert "no model is loaded" in err["message"]
        assert_openai_error(http.post(COMPLETIONS, json={"prompt": "x"}), 503)
        assert "studio_model_loaded" in http.get("/metrics").text


def test_engine_error_mid_stream_is_an_error_event(http, pipe, monkeypatch):
    """A failure after the 200 went out arrives as an OpenAI error event, then [DONE]."""
    from engine.llm_engine import EngineStoppedError

    def refuse(*args, **kwargs):
        raise EngineStoppedError("the engine is shut down")

    monkeypatch.setattr(pipe.engine, "add_request", refuse)
    body = {"messages": USER, "max_tokens": 2, "stream": True}
    with http.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "model_unloaded"
    assert_openai_error(http.post(CHAT, json={**body, "stream": False}), 503)


def test_model_swap_mid_stream_ends_it_with_an_error_event(demo_model_path):
    """Loading another model (the UI's Model tab) while a request streams: it ends with an error event, not a hang;
    the API then serves the new model under its name."""
    import json

    from api import build_api
    from api.background import BackgroundServer
    from engine import EngineConfig
    from studio.manager import ModelManager

    mgr = ModelManager()
    config = EngineConfig(cache_block_seq_len=16, cpu_kv_cache_bytes=16 * 2**20)
    mgr.load(demo_model_path, config, name="first")
    try:
        with BackgroundServer(build_api(mgr)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
            body = {"messages": USER, "max_tokens": 1500, "ignore_eos": True, "stream": True}
            with http.stream("POST", CHAT, json=body) as r:
                lines = r.iter_lines()
                next(lines)
                mgr.load(demo_model_path, config, name="second")
                events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "model_unloaded"
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["second"]
            assert_openai_error(http.post(CHAT, json={"model": "first", "messages": USER}), 404, "model")
            assert http.post(CHAT, json={"model": "second", "messages": USER, "max_tokens": 2}).status_code == 200
    finally:
        mgr.unload()


def test_api_keys_hold_behind_a_root_path(manager):
    """Behind a proxy prefix (uvicorn --root-path) the paths the app sees include the prefix: still guarded."""
    from api import build_api
    from api.background import BackgroundServer

    with BackgroundServer(build_api(manager, api_keys=["k"]), root_path="/studio") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        assert_openai_error(http.get("/v1/models"), 401)
        assert http.get("/studio/v1/models").status_code in (401, 404)  # never a 200 without the key
        assert http.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
        assert http.get("/health").status_code == 200
