"""The `openai` client sends a base64 image to a tiny Qwen2.5-VL behind /v1/chat/completions: the reply (plain and
streamed) is the engine's own greedy reply to the same messages, the prompt counts the image's tokens (its size
decides how many), and a bad image is a 400 with the engine's message."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from api import build_api
    from api.background import BackgroundServer
    from engine import EngineConfig
    from studio.manager import ModelManager
    from tests.qwen_vl_factory import make_qwen_vl

    mgr = ModelManager()
    mgr.load(make_qwen_vl(tmp_path_factory.mktemp("qwen") / "qwen2.5-vl"),
             EngineConfig(cache_block_seq_len=16, cpu_kv_cache_bytes=32 * 2**20), name="qwen-vl")
    try:
        with BackgroundServer(build_api(mgr)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            yield client, mgr.pipeline()
    finally:
        mgr.unload()


def png_url(h: int, w: int, seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in this picture?"}]}]


def test_openai_client_base64_image(qwen):
    from engine import GenerationConfig

    client, pipe = qwen
    url = png_url(90, 140, seed=0)
    reply = client.chat.completions.create(model="qwen-vl", messages=messages(url), max_tokens=8, temperature=0)
    request_input = pipe.prompt_input(messages(url))
    (item,) = request_input.mm_items
    assert reply.usage.prompt_tokens == len(request_input.token_ids) and item.length == (84 // 28) * (140 // 28)
    assert reply.usage.completion_tokens == 8
    ours = pipe(messages(url), GenerationConfig(max_new_tokens=8, do_sample=False, ignore_eos=True))
    assert reply.choices[0].message.content == ours.text
    stream = client.chat.completions.create(model="qwen-vl", messages=messages(url), max_tokens=8, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ours.text
    smaller = client.chat.completions.create(model="qwen-vl", messages=messages(png_url(56, 84, seed=1)),
                                             max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens - smaller.usage.prompt_tokens == 15 - 6  # dynamic resolution: 3x5 vs 2x3


def test_bad_image_is_a_400(qwen):
    client, _ = qwen
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-vl", messages=messages("data:image/png;base64,AAAA"),
                                       max_tokens=4)
    assert "not an image" in str(e.value)
