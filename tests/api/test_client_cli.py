"""`python -m studio.client`: the terminal chat client against the running API (multi-turn, streaming, /reset)."""

from __future__ import annotations

import httpx
import pytest

from studio import client as chat_client
from tests.api.conftest import MODEL_NAME


def test_api_base_normalizes_urls():
    assert chat_client.api_base("http://h:1") == "http://h:1/v1"
    assert chat_client.api_base("http://h:1/") == "http://h:1/v1"
    assert chat_client.api_base("http://h:1/v1/") == "http://h:1/v1"
    assert chat_client.api_base("h:1") == "http://h:1/v1"


def test_stream_chat_and_models(base_url):
    with chat_client.make_client(base_url) as c:
        assert chat_client.list_models(c) == [MODEL_NAME]
        deltas = list(chat_client.stream_chat(c, MODEL_NAME, [{"role": "user", "content": "hi"}], max_tokens=6,
                                              temperature=0, ignore_eos=True))
        full = httpx.post(base_url + "/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}).json()
        assert "".join(deltas) == full["choices"][0]["message"]["content"]
        with pytest.raises(chat_client.ChatError, match="does not exist"):
            list(chat_client.stream_chat(c, "nope", [{"role": "user", "content": "hi"}]))


def test_chat_loop_multi_turn(base_url, monkeypatch):
    sent = []
    real_stream = chat_client.stream_chat

    def spy(client, model, messages, **params):
        sent.append([dict(m) for m in messages])
        yield from real_stream(client, model, messages, **params)

    monkeypatch.setattr(chat_client, "stream_chat", spy)
    lines = iter(["hello", "", "and again", "/reset", "fresh start", "/exit", "never read"])
    written = []
    with chat_client.make_client(base_url) as c:
        chat_client.chat_loop(c, MODEL_NAME, system="be brief", params={"max_tokens": 4},
                              read=lambda prompt: next(lines), write=written.append)
    assert [len(m) for m in sent] == [2, 4, 2]
    assert sent[1][0] == {"role": "system", "content": "be brief"}
    assert sent[1][1] == {"role": "user", "content": "hello"} and sent[1][2]["role"] == "assistant"
    assert sent[2][1] == {"role": "user", "content": "fresh start"}
    assert "(new conversation)\n" in written
    assert next(lines) == "never read"


def test_main_picks_the_served_model_and_reports_errors(base_url, monkeypatch, capsys):
    inputs = iter(["hi there"])

    def fake_input(prompt=""):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert chat_client.main([base_url, "--max-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert f"chatting with {MODEL_NAME}" in out
    monkeypatch.setattr("builtins.input", lambda prompt="": "hi")
    monkeypatch.setattr(chat_client, "chat_loop", lambda *a, **k: None)
    assert chat_client.main(["http://127.0.0.1:9", "--model", "x"]) == 0  # no request before the first turn
    assert chat_client.main(["http://127.0.0.1:9"]) == 1  # nothing listens on port 9 ("discard"): clear error
    assert "cannot reach" in capsys.readouterr().err
