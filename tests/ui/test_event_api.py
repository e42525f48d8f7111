"""The UI's named events, driven through gradio_client: load the demo model, stream a chat reply, readable errors
for bad models (the server keeps serving), and one engine shared by the UI and the /v1 API."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

# load_model(model_path, model_format, dtype, quant_policy, cache_max_entry_count, session_len, max_batch_size,
#            trust_remote_code)
DEFAULT_ENGINE = ("auto", "auto", 0, 0.2, 0, 16, False)
GREEDY = dict(system_prompt="", max_new_tokens=48, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
              seed=0)


def load(client, path: str):
    return client.predict(path, *DEFAULT_ENGINE, api_name="/load_model")


def assistant_text(chat: list[dict]) -> str:
    """The last reply's text, without the line the chat adds under it (version, tokens, speed)."""
    if not chat or chat[-1]["role"] != "assistant":
        return ""
    content = chat[-1]["content"]
    if not isinstance(content, str):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return re.sub(r'\n\n<span class="msg-meta">[^<]*</span>$', "", content)


def engine_requests(studio) -> int:
    text = httpx.get(studio.url + "/metrics", timeout=10).text
    m = re.search(r"^studio_engine_requests_total\{[^}]*\} (\d+)", text, re.M)
    assert m, text
    return int(m.group(1))


@pytest.fixture(scope="module")
def demo_loaded(client, studio):
    status, info, header = load(client, "")  # empty path: the demo model
    assert "Loaded demo-model" in status, status
    assert "random weights" in header and "LlamaForCausalLM" in info
    assert studio.manager.current is not None and studio.manager.current.is_demo
    return studio.manager.current


def test_load_demo_model_reports_what_is_loaded(demo_loaded, client):
    status, info, header = load(client, str(demo_loaded.path))
    assert "Loaded demo-model" in status
    for field in ("Architecture", "Parameters", "KV capacity", "Load time", "tokens"):
        assert field in info
    assert "demo-model" in header


def test_chat_streams_text(demo_loaded, client):
    job = client.submit({"text": "Hello there", "files": []}, **GREEDY, api_name="/chat")
    outputs = list(job)
    final_chat, _, stats = job.result()
    assert final_chat[0]["role"] == "user"
    reply = assistant_text(final_chat)
    assert reply, final_chat
    assert "generated" in stats and "tok/s" in stats
    # streamed: the user's message shows first (and the input box is cleared), then the reply grows
    assert len(outputs) >= 2
    assert outputs[0][0][-1]["role"] == "user" and outputs[0][1]["text"] == ""
    partial = [assistant_text(o[0]) for o in outputs if assistant_text(o[0])]
    assert partial and all(reply.startswith(p) for p in partial)

    # the conversation continues in the same session, and Regenerate replaces the last reply
    job = client.submit({"text": "And then?", "files": []}, **GREEDY, api_name="/chat")
    chat2 = job.result()[0]
    assert [m["role"] for m in chat2] == ["user", "assistant", "user", "assistant"]
    regen, regen_stats = client.predict(**GREEDY, api_name="/regenerate")
    assert [m["role"] for m in regen] == ["user", "assistant", "user", "assistant"]
    assert assistant_text(regen) == assistant_text(chat2)  # greedy, same seed: same reply
    cleared, _, textbox = client.predict(api_name="/clear_chat")
    assert cleared == [] and textbox == {"text": "", "files": []}


@pytest.mark.parametrize("kind", ["missing", "not_a_model", "unsupported"])
def test_bad_model_gives_readable_error_and_server_keeps_serving(demo_loaded, client, studio, tmp_path, kind):
    if kind == "missing":
        path, expect = str(tmp_path / "no-such-model"), "does not exist"
    elif kind == "not_a_model":
        (tmp_path / "notes.txt").write_text("hi")
        path, expect = str(tmp_path), "not a model folder"
    else:
        (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
        path, expect = str(tmp_path), "not supported"
    status, info, header = load(client, path)
    assert "Could not load the model" in status and expect in status, status
    assert "Traceback" not in status
    if kind == "not_a_model":  # says what a model folder needs, not what this one happens to hold
        assert "notes.txt" not in status and "tokenizer" in status and "safetensors" in status, status
    # the served model was not taken away, and both front ends still answer
    assert studio.manager.current is not None and studio.manager.current.path == demo_loaded.path
    assert "demo-model" in header
    assert httpx.get(studio.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "demo-model"
    chat = client.submit({"text": "still there?", "files": []}, **GREEDY, api_name="/chat").result()[0]
    assert assistant_text(chat)
    client.predict(api_name="/clear_chat")


def test_session_length_is_validated_with_a_sentence(demo_loaded, client, studio):
    engine = ("auto", "auto", 0, 0.2)
    status, _, _ = client.predict(str(demo_loaded.path), *engine, -5, 16, False, api_name="/load_model")
    assert "Could not load the model" in status and "Session length must be 0" in status and "-5" in status, status
    assert studio.manager.current.path == demo_loaded.path  # the served model stayed
    status, _, _ = client.predict(str(demo_loaded.path), *engine, 10**7, 16, False, api_name="/load_model")
    session_len = studio.manager.current.pipeline.session_len
    assert "Loaded demo-model" in status and "more than this model allows" in status, status
    assert f"{session_len:,} tokens" in status and session_len < 10**7


def test_ui_and_api_share_one_engine(demo_loaded, client, studio):
    engine = studio.manager.current.pipeline.engine
    before = engine_requests(studio)
    client.submit({"text": "Hi from the UI", "files": []}, **GREEDY, api_name="/chat").result()
    after_ui = engine_requests(studio)
    assert after_ui == before + 1  # the UI's chat is counted by the engine the API reports on
    r = httpx.post(studio.url + "/v1/chat/completions", timeout=60, json={
        "model": "demo-model", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi from the API"}]})
    assert r.status_code == 200, r.text
    assert engine_requests(studio) == after_ui + 1
    assert studio.manager.current.pipeline.engine is engine
    client.predict(api_name="/clear_chat")


def test_stop_aborts_the_engine_request(demo_loaded, client, studio):
    engine = studio.manager.current.pipeline.engine
    long_reply = dict(GREEDY, max_new_tokens=1500, temperature=1.0, seed=0)  # seed 0 runs ~1000 tokens

    def start_streaming():
        job = client.submit({"text": "Tell me a long story", "files": []}, **long_reply, api_name="/chat")
        deadline = time.monotonic() + 30
        while not any(assistant_text(o[0]) for o in job.outputs()):
            assert time.monotonic() < deadline and not job.done(), "no streamed text arrived"
            time.sleep(0.02)
        return job

    def wait_aborted(before: int, how: str):
        deadline = time.monotonic() + 10
        while engine.stats.num_aborted == before or engine.num_running:
            assert time.monotonic() < deadline, f"{how} did not abort the engine request"
            time.sleep(0.05)

    # Stop: the reply ends where it is, keeps its text, and says so
    aborted = engine.stats.num_aborted
    job = start_streaming()
    client.predict(api_name="/stop_chat")
    chat, _, stats = job.result(timeout=30)
    wait_aborted(aborted, "Stop")
    assert "stopped" in stats and assistant_text(chat)
    assert int(re.search(r"<b>(\d+)</b> generated", stats).group(1)) < 1500

    # cancelling the event (what Clear and a closed browser tab do) aborts the request too
    aborted = engine.stats.num_aborted
    job = start_streaming()
    job.cancel()
    wait_aborted(aborted, "cancelling the event")
    client.predict(api_name="/clear_chat")


def test_two_sessions_chat_at_once_with_their_own_history(demo_loaded, studio):
    """Two browser sessions stream at the same time (no lock, the engine batches them), each with its history."""
    from gradio_client import Client

    engine = studio.manager.current.pipeline.engine
    clients = [Client(studio.url + "/", verbose=False) for _ in range(2)]
    try:
        reply = dict(GREEDY, max_new_tokens=400, temperature=1.0, seed=0)
        jobs = [c.submit({"text": f"I am session {i}", "files": []}, **reply, api_name="/chat")
                for i, c in enumerate(clients)]
        most_running = 0
        while not all(j.done() for j in jobs):
            most_running = max(most_running, engine.num_running)
            time.sleep(0.005)
        chats = [j.result()[0] for j in jobs]
        assert most_running == 2, "the two chats never ran in one batch"
        for i, chat in enumerate(chats):
            assert [m["role"] for m in chat] == ["user", "assistant"]
            assert chat[0]["content"][0]["text"] == f"I am session {i}"
    finally:
        for c in clients:
            c.close()


def test_image_to_a_text_model_is_refused_readably(demo_loaded, client, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (8, 8), "orange").save(image)
    chat, textbox, stats = client.submit({"text": "What is this?", "files": [handle_file(str(image))]}, **GREEDY,
                                         api_name="/chat").result()
    assert chat == [] and "takes no images" in stats and "image was taken off" in stats, stats
    # the text comes back to retry, the refused image does not (it would fail every later message)
    assert textbox["text"] == "What is this?" and textbox["files"] == []
    chat, textbox, stats = client.submit(textbox, **GREEDY, api_name="/chat").result()
    assert [m["role"] for m in chat] == ["user", "assistant"] and assistant_text(chat), stats
    client.predict(api_name="/clear_chat")


def test_unload_then_chat_says_so(client, studio):
    status, info, header = client.predict(api_name="/unload_model")
    assert "Unloaded" in status and "No model loaded" in header
    chat, textbox, stats = client.submit({"text": "anyone?", "files": []}, **GREEDY, api_name="/chat").result()
    assert chat == [] and "no model is loaded" in stats
    assert textbox["text"] == "anyone?"  # given back to retry
    assert httpx.get(studio.url + "/health", timeout=10).status_code == 503
