"""Image chat through the UI's named events (gradio_client) on a tiny LLaVA-1.5 loaded from the Model tab's event:
the model card and header say it sees images, a message with an image gets a reply and keeps the image in the
history, later turns and Regenerate send the earlier images again (without encoding them again), Clear empties
everything, refused images (not an image, too big, too many for the chat) are taken off the message with a
sentence and the history stays, and a text-only model taking over a chat with images skips them with a note.

What the engine was sent is recorded by wrapping the loaded pipeline's `generate` (the server runs in-process)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tests.ui.test_event_api import DEFAULT_ENGINE, GREEDY, assistant_text

EMPTY = {"text": "", "files": []}


def image_parts(messages) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list)
               for part in m["content"] if part.get("type") == "image_url")


def names(files) -> list[str]:
    """File names of a MultimodalTextbox value's files (gradio_client gives paths it downloaded, or dicts)."""
    return [Path(f if isinstance(f, str) else f["path"]).name for f in files]


def files_in(chat_message) -> list[dict]:
    content = chat_message["content"]
    return [part for part in content if isinstance(part, dict) and part.get("type") == "file"] \
        if isinstance(content, list) else []


@pytest.fixture(scope="module")
def vclient(studio):
    """Its own gradio_client session: a chat history of its own, apart from the other modules' client."""
    from gradio_client import Client

    client = Client(studio.url + "/", verbose=False)
    yield client
    client.close()


@pytest.fixture(scope="module")
def llava(vclient, studio, llava_path):
    status, info, header = vclient.predict(str(llava_path), *DEFAULT_ENGINE, api_name="/load_model")
    assert "Loaded tiny-llava" in status, status
    yield studio.manager.current
    studio.manager.unload()  # the next modules start from nothing loaded, as they expect


@pytest.fixture
def sent(llava, monkeypatch):
    """The messages of every request the chat sends to the engine, in order."""
    calls = []
    pipe = llava.pipeline
    generate = pipe.generate

    def recording(messages, *args, **kwargs):
        calls.append(messages)
        return generate(messages, *args, **kwargs)

    monkeypatch.setattr(pipe, "generate", recording)
    return calls


def chat(client, text: str, *files, **params):
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    return send(client, message, **params)


def send(client, message: dict, **params):
    """(history, input box, stats) as the page ends up: the box is the last value the event set (later updates
    leave it as it is)."""
    job = client.submit(message, **dict(GREEDY, max_new_tokens=12, **params), api_name="/chat")
    history, _, stats = job.result(timeout=120)
    boxes = [o[1] for o in job.outputs() if isinstance(o[1], dict) and "text" in o[1]]
    return history, boxes[-1] if boxes else None, stats


def test_card_header_and_memory_say_the_model_sees_images(llava, studio):
    from ui.common import describe, header_html
    from ui.memory_panel import refresh

    card = describe(llava)
    assert card["Vision"].startswith("CLIP ViT/14 (3 layers, width 32), 56 px · 16 image tokens per image"), card
    assert "up to 4 images per chat" in card["Vision"] and "LLaVA-1.5" in card["Vision"]
    assert "tower + projector" in card["Vision tower"] and "Image cache" in card
    header = header_html(llava)
    assert "sees images" in header and "16 tokens/image" in header
    _, panel, _ = refresh(studio.app.state.studio)
    assert "vision tower" in panel and "image cache" in panel, panel


def test_image_chat_keeps_images_across_turns_regenerate_and_clear(llava, vclient, sent, image_file):
    vclient.predict(api_name="/clear_chat")
    cache = llava.pipeline.engine.runner.encoder_cache
    cat = image_file("cat.png", seed=1)
    history, textbox, stats = chat(vclient, "What is in this picture?", cat)
    assert [m["role"] for m in history] == ["user", "assistant"] and assistant_text(history), stats
    assert len(files_in(history[0])) == 1 and history[0]["content"][-1]["text"] == "What is in this picture?"
    assert files_in(history[0])[0]["file"].endswith("cat.png")  # the thumbnail's file (downloaded here)
    assert textbox == EMPTY and "generated" in stats
    assert image_parts(sent[-1]) == 1
    misses = cache.num_misses

    # a second turn, text only: the whole chat goes again, the earlier image with it, not encoded again
    history, _, stats = chat(vclient, "And its colours?")
    assert [m["role"] for m in history] == ["user", "assistant"] * 2, stats
    assert len(files_in(history[0])) == 1 and image_parts(sent[-1]) == 1
    assert cache.num_misses == misses  # no image went through the tower again (a cache hit, or prefix-cached)

    # a third turn with a second image: both are sent
    dog = image_file("dog.png", size=(30, 50), seed=2)
    history, _, stats = chat(vclient, "Compare it with this one.", dog)
    assert len(history) == 6 and [len(files_in(m)) for m in history[::2]] == [1, 0, 1], stats
    assert image_parts(sent[-1]) == 2
    reply = assistant_text(history)

    # Regenerate re-runs the last user turn with its image (and the earlier one): greedy, so the same reply
    regen, stats = vclient.predict(**dict(GREEDY, max_new_tokens=12), api_name="/regenerate")
    assert len(regen) == 6 and [len(files_in(m)) for m in regen[::2]] == [1, 0, 1], stats
    assert image_parts(sent[-1]) == 2 and assistant_text(regen) == reply

    # Clear empties the history and the input box (text and attachments)
    cleared, _, textbox = vclient.predict(api_name="/clear_chat")
    assert cleared == [] and textbox == EMPTY
    history, _, _ = chat(vclient, "A new chat.")
    assert len(history) == 2 and image_parts(sent[-1]) == 0  # nothing of the old chat was sent


def test_garbage_image_is_taken_off_and_the_chat_stays(llava, vclient, sent, image_file, tmp_path):
    vclient.predict(api_name="/clear_chat")
    history, _, _ = chat(vclient, "First, this.", image_file("first.png", seed=3))
    assert len(history) == 2
    n_sent = len(sent)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is no image at all" * 20)
    good = image_file("good.png", seed=4)
    chat_after, textbox, stats = chat(vclient, "What about these?", garbage, good)
    assert "garbage.png" in stats and "not an image" in stats and "taken off your message" in stats, stats
    assert "good.png" not in stats and "press Enter to send the rest" in stats, stats
    assert chat_after == history  # nothing of the history is lost
    assert len(sent) == n_sent  # nothing was sent to the engine
    # the text and the good image come back to the box; the bad one does not
    assert textbox["text"] == "What about these?"
    assert names(textbox["files"]) == ["good.png"], textbox
    # sent again as it came back: the chat goes on, both images in it
    from gradio_client import handle_file

    message = {"text": textbox["text"], "files": [handle_file(f if isinstance(f, str) else f["path"])
                                                  for f in textbox["files"]]}
    history, textbox, stats = send(vclient, message)
    assert len(history) == 4 and assistant_text(history) and textbox == EMPTY, stats
    assert image_parts(sent[-1]) == 2


def test_an_image_the_engine_refuses_after_the_check_is_taken_off_too(llava, vclient, sent, image_file, tmp_path,
                                                                      monkeypatch):
    """Belt and braces: should the UI's check let a bad image through, the engine's InvalidImageError still takes
    the message's images off (or every later send would fail on them) and keeps the history."""
    import ui.chat_tab

    vclient.predict(api_name="/clear_chat")
    history, _, _ = chat(vclient, "Hello.", image_file("hello.png", seed=40))
    monkeypatch.setattr(ui.chat_tab, "check_image", lambda path, policy: None)  # the check passes everything
    garbage = tmp_path / "junk.png"
    garbage.write_bytes(b"\x00junk" * 50)
    n = len(sent)
    after, textbox, stats = chat(vclient, "And this?", garbage)
    assert len(sent) == n + 1  # it reached the engine this time
    assert after == history and "not an image" in stats and "image was taken off" in stats, stats
    assert textbox == {"text": "And this?", "files": []}
    history, _, stats = chat(vclient, "And this?")
    assert len(history) == 4 and assistant_text(history), stats


def test_too_many_and_too_big_images_are_refused_by_name(llava, vclient, sent, image_file, monkeypatch):
    vclient.predict(api_name="/clear_chat")
    images = [image_file(f"img{i}.png", seed=10 + i) for i in range(5)]
    history, _, stats = chat(vclient, "", *images[:2])  # images alone, no text: a message too
    assert len(history) == 2 and len(files_in(history[0])) == 2 and assistant_text(history), stats
    assert image_parts(sent[-1]) == 2
    # the chat holds 2; the model takes 4 per prompt (the whole chat): of 3 more, the last one does not fit
    after, textbox, stats = chat(vclient, "Three more.", *images[2:])
    assert after == history
    assert "img4.png: too many images: this chat already holds 2" in stats and "at most 4" in stats, stats
    assert names(textbox["files"]) == ["img2.png", "img3.png"]

    # an image over the byte limit (the server's --max-image-bytes; lowered here) is refused, named, with sizes
    vision = llava.pipeline.vision
    monkeypatch.setattr(vision, "policy", dataclasses.replace(vision.policy, max_bytes=1000))
    big = image_file("big.png", size=(64, 64), seed=20)
    after, textbox, stats = chat(vclient, "And a big one.", big)
    assert after == history and "big.png: the file is" in stats and "more than the 1000 B" in stats, stats
    assert textbox == {"text": "And a big one.", "files": []}
    assert "press Enter to send the text alone" in stats


def test_a_text_model_taking_over_an_image_chat_skips_its_images(llava, vclient, studio, demo_model_path,
                                                                  image_file):
    """Last in the module: it swaps the LLaVA out (the module's teardown unloads whatever is loaded)."""
    vclient.predict(api_name="/clear_chat")
    history, _, _ = chat(vclient, "Look at this.", image_file("look.png", seed=30))
    assert len(history) == 2
    status, info, header = vclient.predict(str(demo_model_path), *DEFAULT_ENGINE, api_name="/load_model")
    assert "Loaded demo-model" in status and "sees images" not in header
    assert "a text-only model (images are refused)" in info
    # the chat goes on in text; its earlier image is not sent, and the stats line says so
    history, _, stats = chat(vclient, "Go on.")
    assert len(history) == 4 and assistant_text(history), stats
    assert "1 image of this chat not sent: demo-model takes no images" in stats, stats
    assert len(files_in(history[0])) == 1  # still shown in the history
    # a new image is refused with the model's name, taken off, and the history stays
    after, textbox, stats = chat(vclient, "And this?", image_file("new.png", seed=31))
    assert after == history and "demo-model takes no images" in stats and "image was taken off" in stats, stats
    assert textbox == {"text": "And this?", "files": []}


def test_vision_words_for_real_towers_and_anyres():
    """The card's words at real shapes, no weights: LLaVA-1.5-7B (ViT-L/14-336, 576 tokens) and 1.6 (anyres)."""
    from engine.models.clip import CLIPVisionSpec
    from engine.models.llava import LlavaVision
    from ui.common import image_tokens_text, tower_name

    clip = CLIPVisionSpec(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                          patch_size=14)
    common = dict(layout="hf", clip=clip, feature_layers=[-2], select_strategy="default", projector_layers=2,
                  projector_act="gelu", projector_bias=True, text_hidden=4096)
    v15 = LlavaVision(anyres=False, **common)
    assert tower_name(v15) == "CLIP ViT-L/14, 336 px" and image_tokens_text(v15) == "576 image tokens per image"
    pinpoints = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    v16 = LlavaVision(anyres=True, grid_pinpoints=pinpoints, **common)
    assert image_tokens_text(v16).startswith("576–2,928 image tokens per image (anyres"), image_tokens_text(v16)


def test_memory_panel_draws_the_image_cache_out_of_activations_on_a_gpu():
    from ui.memory_panel import _engine_rows

    mib = 2**20
    eng = {"device": "cuda:0", "weights_bytes": 100 * mib, "kv_cache_bytes": 200 * mib, "kv_usage": 0.5,
           "used_kv_blocks": 5, "num_kv_blocks": 10, "vision_bytes": 30 * mib, "activations_other_bytes": 50 * mib,
           "encoder_cache_bytes": 20 * mib, "encoder_cache_capacity_bytes": 256 * mib, "encoder_cache_entries": 3,
           "encoder_cache_hits": 7}
    text = re.sub(r"<[^>]+>", "", _engine_rows(eng, 1000 * mib))
    assert "vision tower 30.0 MiB" in text and "image cache 20.0 MiB / 256.0 MiB (3 images, 7 hits)" in text, text
    assert "activations/other 30.0 MiB" in text  # 50 MiB less the cache's 20
    assert "cuda:0 · 380.0 MiB" in text  # the total counts each byte once (the cache is not added on top)
    assert "seg-encoder" in _engine_rows(eng, 1000 * mib)
    text_model = {k: v for k, v in eng.items() if not k.startswith(("encoder", "vision"))}
    html = _engine_rows(text_model, 1000 * mib)
    assert "vision" not in html and "image cache" not in html
