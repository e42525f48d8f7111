"""The `openai` client sends a base64 image to a tiny Qwen2.5-VL behind /v1/chat/completions: the reply (plain and
streamed) is the engine's own greedy reply to the same messages, the prompt counts the image's tokens (its size
decides how many), and a bad image is a 400 with the engine's message."""

from __future__ import annotations

import openai
import pytest

from tests.api.vlm_helpers import messages, png_url, served


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from tests.qwen_vl_factory import make_qwen_vl

    with served(make_qwen_vl(tmp_path_factory.mktemp("qwen") / "qwen2.5-vl"), "qwen-vl") as client_and_pipe:
        yield client_and_pipe


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
