"""The API through the real `openai` client: models, chat and completions (streaming or not), usage, stop strings,
n > 1, seeded sampling, logprobs in both OpenAI shapes, and the extra sampling fields."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import MODEL_NAME, SESSION_LEN, sse_events

MESSAGES = [{"role": "user", "content": "Tell me a story about a dragon who loved books."}]


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    card = models.data[0]
    assert card.object == "model" and card.owned_by and isinstance(card.created, int)
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": MODEL_NAME}


def test_chat_completion_shape_and_usage(client, pipe):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL_NAME
    assert isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(pipe.encode(MESSAGES))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_chat_stream_matches_non_stream_and_counts_tokens(client, pipe):
    params = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**params)
    chunks = list(client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True},
                                                 logprobs=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    streamed_tokens = sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs)
    assert usage.completion_tokens == streamed_tokens == 20
    assert usage.prompt_tokens == len(pipe.encode(MESSAGES)) == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_key(http):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["delta"] == {} and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completion_and_stream(client, pipe):
    prompt = "The capital of France is"
    params = dict(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(**params)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 16
    assert r.usage.prompt_tokens == len(pipe.encode(prompt, apply_chat_template=False))
    chunks = list(client.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16


def test_completion_prompt_lists_and_token_ids(client, pipe):
    ids = pipe.encode("Once upon a time", apply_chat_template=False)
    by_text = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    many = client.completions.create(model=MODEL_NAME, prompt=["Once upon a time", "Water boils at"], n=2,
                                     max_tokens=8, temperature=0)
    assert [c.index for c in sorted(many.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    first = next(c for c in many.choices if c.index == 0)
    assert first.text == by_text.choices[0].text
    expected_prompt = len(ids) + len(pipe.encode("Water boils at", apply_chat_template=False))
    assert many.usage.prompt_tokens == expected_prompt


def test_echo(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=4, temperature=0)
    assert r.choices[0].text == "Hello there" + plain.choices[0].text


def test_echo_with_logprobs_scores_the_prompt_as_the_engine_does(client, pipe):
    prompt = "The quick brown fox jumps over the lazy dog"
    expected = pipe.score(prompt, top_logprobs=2)
    scored = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage.prompt_tokens == len(expected) and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([e["logprob"] for e in expected[1:]], abs=1e-5)
    assert "".join(lp.tokens).endswith(prompt) and lp.text_offset[0] == 0  # the tokens include a BOS, if any
    assert [prompt[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)][-3:] == lp.tokens[-3:]
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])
    # generating too: the prompt's logprobs, then the completion's, offsets running on through the echoed text
    both = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                     logprobs=1, extra_body={"ignore_eos": True})
    lp2 = both.choices[0].logprobs
    assert len(lp2.tokens) == len(expected) + 3
    assert lp2.token_logprobs[: len(expected)] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert lp2.text_offset[len(expected)] == len(prompt)
    assert both.choices[0].text.startswith(prompt)
    # streamed: the first event carries the echo and its logprobs
    events = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=0,
                                            stream=True))
    assert events[0].choices[0].text == prompt
    assert events[0].choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert events[-1].choices[0].finish_reason == "length"


def test_stop_strings(client):
    base = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    # a stop string from the middle of the greedy continuation: 2 visible characters
    starts = [i for i in range(1, len(text) - 1) if all(c.isprintable() and not c.isspace() and c != "\ufffd"
                                                         for c in text[i:i + 2])]
    assert starts, f"no visible characters to stop on in {text!r}"
    stop = text[starts[len(starts) // 2]:starts[len(starts) // 2] + 2]
    cut = text.index(stop)
    r = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=24, temperature=0,
                                  stop=[stop, "never-appears-zz"], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:cut]
    streamed = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=24, stream=True,
                                         temperature=0, stop=stop, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[:cut]


def test_n_choices_indexed_and_different(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=2, max_tokens=16, temperature=1.0,
                                       seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 32
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=2, max_tokens=16, seed=7,
                                                 temperature=1.0, stream=True, extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in r.choices}


def test_seeded_sampling_is_reproducible(client):
    params = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0.9, top_p=0.95,
                  extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**params, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**params, seed=1234).choices[0].message.content
    c = client.chat.completions.create(**params, seed=4321).choices[0].message.content
    assert a == b
    assert a != c


def test_default_temperature_samples(client):
    """OpenAI's default temperature is 1.0: unseeded requests differ, while temperature 0 is greedy."""
    texts = {client.completions.create(model=MODEL_NAME, prompt="Once", max_tokens=16,
                                       extra_body={"ignore_eos": True}).choices[0].text for _ in range(3)}
    assert len(texts) > 1
    greedy = {client.completions.create(model=MODEL_NAME, prompt="Once", max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)}
    assert len(greedy) == 1


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert isinstance(entry.token, str) and entry.logprob <= 0 and isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 3
        assert all(t.logprob <= 0 for t in entry.top_logprobs)
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)
    decoded = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    text = r.choices[0].message.content
    # the engine holds back a trailing incomplete UTF-8 character, so the text may lack decoded's last "\ufffd"s
    assert decoded.startswith(text) and set(decoded[len(text):]) <= {"\ufffd"}
    plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_shape(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert token in top and 2 <= len(top) <= 3


def test_extra_sampling_fields(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, seed=3, user="someone",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 8, "ignore_eos": False,
                    "skip_special_tokens": True},
    )
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"


def test_max_tokens_clamped_to_session_len(client, pipe):
    prompt = "word " * 100
    n_prompt = len(pipe.encode(prompt, apply_chat_template=False))
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=100_000, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == SESSION_LEN - n_prompt


def test_model_may_be_omitted_and_developer_role(http):
    body = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "hi"}]}], "max_tokens": 2}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL_NAME


def test_openapi_and_cors_absent_by_default(http):
    assert http.get("/openapi.json").status_code == 200
    r = http.options("/v1/models", headers={"Origin": "http://example.com", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers


def test_connection_is_loopback(base_url):
    assert httpx.URL(base_url).host == "127.0.0.1"
