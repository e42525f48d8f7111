"""Fuzz the request schema of both POST routes with hypothesis: random bytes, random JSON, and bodies that mix
plausible and wrong values in every field. Never a 500: each answer is a 200 (a complete response or stream) or an
OpenAI error JSON with a 4xx, and the server stays up. Derandomized and bounded (a few hundred examples)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import MODEL_NAME, wait_until_idle

ROUTES = ("/v1/chat/completions", "/v1/completions")
OK_STATUSES = {200, 400, 404, 413}
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 8)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
           | st.sampled_from(["\ud800", "gpt-4o\udfff", "\x00"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def field(valid, invalid=json_values):
    """Mostly valid (about 9 in 10), so that whole bodies are valid often enough to reach the engine."""
    return st.integers(0, 9).flatmap(lambda i: invalid if i == 9 else valid)


NASTY = ["\ud800", "\udfff", "\x00", "\n", "é", "你", "🙂", "<s>", "</s>", "<|im_end|>", "<|im_start|>", "{{", "}}",
         "{%", "%}", "\\", '"', "data: [DONE]\n\n"]
text = st.text(max_size=40) | st.lists(st.sampled_from(NASTY), max_size=6).map("".join)
roles = st.sampled_from(["system", "developer", "user", "assistant"])
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
image_part = st.fixed_dictionaries({"type": st.just("image_url"),
                                    "image_url": st.fixed_dictionaries({"url": st.just("data:image/png;base64,AAAA")})})
odd_part = st.dictionaries(st.sampled_from(["type", "text", "image_url"]), json_values, max_size=3)
parts = st.lists(field(text_part, image_part | odd_part), max_size=3)
message = st.fixed_dictionaries({"role": field(roles, st.sampled_from(["tool", "bot", ""]) | json_values)},
                                optional={"content": field(text | parts), "name": field(text)})
token_ids = st.lists(st.integers(0, 1023), min_size=1, max_size=12)
bad_token_ids = st.lists(st.integers(-2, 10**6), max_size=12)
prompt = field(text | st.lists(text, min_size=1, max_size=3) | token_ids | st.lists(token_ids, min_size=1, max_size=2),
               bad_token_ids | st.lists(bad_token_ids, max_size=2) | json_values)
floats = lambda lo, hi: st.floats(lo, hi, allow_nan=False)  # noqa: E731

COMMON = {
    "model": field(st.just(MODEL_NAME), st.sampled_from(["gpt-4o", "", "\udc00"]) | json_values),
    "temperature": field(floats(0, 2), floats(-5, -0.01) | floats(2.01, 1e6) | json_values),
    "top_p": field(floats(0.01, 1), floats(-1, 0) | floats(1.01, 5) | json_values),
    "top_k": field(st.integers(-1, 50), st.integers(-(2**40), -2) | json_values),
    "min_p": field(floats(0, 1), floats(1.01, 5) | json_values),
    "repetition_penalty": field(floats(0.5, 2), floats(-2, 0) | json_values),
    "presence_penalty": field(floats(-2, 2), floats(2.01, 100) | json_values),
    "frequency_penalty": field(floats(-2, 2), floats(-100, -2.01) | json_values),
    "stop": field(st.text(min_size=1, max_size=5) | st.lists(st.text(min_size=1, max_size=5), max_size=4),
                  st.just("") | st.lists(text, min_size=5, max_size=6) | json_values),
    "stop_token_ids": field(st.lists(st.integers(0, 1023), max_size=3)),
    "seed": field(st.integers(-(2**63), 2**64 - 1), st.integers(2**64, 2**80) | json_values),
    "n": field(st.integers(1, 3), st.integers(-3, 0) | st.integers(129, 10**6) | json_values),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": field(st.booleans()),
    "skip_special_tokens": field(st.booleans()),
    "min_tokens": field(st.integers(0, 2), st.integers(-5, -1) | json_values),
    "user": field(text),
}
MAX_TOKENS = {"max_tokens": field(st.integers(1, 8), st.integers(-(2**70), 0) | json_values)}  # always sent: quick

chat_bodies = st.fixed_dictionaries(
    {**MAX_TOKENS, "messages": field(st.lists(message, min_size=1, max_size=3), st.just([]) | json_values)},
    optional={**COMMON, "logprobs": field(st.booleans()), "top_logprobs": field(st.integers(0, 20)),
              "max_completion_tokens": field(st.integers(1, 8)),
              "response_format": field(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
              "tools": field(st.just([]), st.lists(json_values, min_size=1, max_size=2))},
)
completion_bodies = st.fixed_dictionaries(
    {**MAX_TOKENS, "prompt": prompt},
    optional={**COMMON, "logprobs": field(st.integers(0, 20), st.integers(21, 100) | json_values),
              "echo": field(st.booleans()), "suffix": field(st.just(""), text), "best_of": field(st.integers(1, 3))},
)


@pytest.fixture(scope="module")
def fuzz_http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def check_answer(http: httpx.Client, route: str, content: bytes) -> None:
    with http.stream("POST", route, content=content, headers={"content-type": "application/json"}) as r:
        body = r.read()
    assert r.status_code in OK_STATUSES, (r.status_code, body[:300], content[:300])
    if r.status_code != 200:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[len("data: "):] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert not any('"error"' in e[:10] for e in events[:-1]), events
    else:
        assert json.loads(body)["choices"]


@pytest.mark.parametrize("route,bodies", [(ROUTES[0], chat_bodies), (ROUTES[1], completion_bodies)],
                         ids=["chat", "completions"])
def test_fuzz_structured_bodies(fuzz_http, pipe, route, bodies):
    @FUZZ
    @given(body=bodies)
    def run(body):
        check_answer(fuzz_http, route, json.dumps(body).encode())

    run()
    wait_until_idle(pipe)
    assert fuzz_http.get("/health").status_code == 200


@FUZZ
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       route=st.sampled_from(ROUTES))
def test_fuzz_raw_bodies(fuzz_http, raw, route):
    check_answer(fuzz_http, route, raw)
