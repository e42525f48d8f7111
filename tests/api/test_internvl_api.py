"""The `openai` client sends a base64 image to a tiny InternVL (-hf layout) behind /v1/chat/completions: the reply
(plain and streamed) is the engine's own greedy reply to the same messages, the prompt counts the image's tokens
(its tile grid decides how many), and a bad image is a 400 with the engine's message."""

from __future__ import annotations

import openai
import pytest

from tests.api.vlm_helpers import messages, png_url, served


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    from tests.internvl_factory import make_internvl

    with served(make_internvl(tmp_path_factory.mktemp("internvl") / "internvl-hf"), "internvl") as client_and_pipe:
        yield client_and_pipe


def test_openai_client_base64_image(internvl):
    from engine import GenerationConfig
    from tests.internvl_factory import TOKENS_PER_TILE

    client, pipe = internvl
    url = png_url(100, 230, seed=0)  # 2 x 1 tiles + the thumbnail
    reply = client.chat.completions.create(model="internvl", messages=messages(url), max_tokens=8, temperature=0)
    request_input = pipe.prompt_input(messages(url))
    (item,) = request_input.mm_items
    assert reply.usage.prompt_tokens == len(request_input.token_ids) and item.length == 3 * TOKENS_PER_TILE
    assert reply.usage.completion_tokens == 8
    ours = pipe(messages(url), GenerationConfig(max_new_tokens=8, do_sample=False, ignore_eos=True))
    assert reply.choices[0].message.content == ours.text
    stream = client.chat.completions.create(model="internvl", messages=messages(url), max_tokens=8, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ours.text
    square = client.chat.completions.create(model="internvl", messages=messages(png_url(60, 60, seed=1)),
                                            max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens - square.usage.prompt_tokens == 2 * TOKENS_PER_TILE  # one tile, no thumbnail


def test_bad_image_is_a_400(internvl):
    client, _ = internvl
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="internvl", messages=messages("data:image/png;base64,AAAA"),
                                       max_tokens=4)
    assert "not an image" in str(e.value)
