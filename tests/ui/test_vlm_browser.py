"""Image chat with tiny Qwen2.5-VL and InternVL (-hf layout) checkpoints (random weights) in a real headless Chromium,
through the same Model tab and Chat tab as LLaVA: the card names the tower and the family's token range, an attached
image goes out as an image_url part and a streamed reply comes back with the image's thumbnail in the history.

Screenshots: test-artifacts/ui/qwen-vl-chat.png, test-artifacts/ui/internvl-chat.png."""

from __future__ import annotations

import pytest

from tests.ui.test_browser import UI_S, WORK_S, set_number, shot, wait_ui
from tests.ui.test_vision_browser import (  # noqa: F401 - page and sent are fixtures
    bot_count,
    chat_images,
    image_parts,
    input_images,
    page,
    record_requests,
    reply_done,
    sent,
)

pytestmark = pytest.mark.browser


def _qwen(folder):
    from tests.qwen_vl_factory import make_qwen_vl

    return make_qwen_vl(folder / "tiny-qwen2.5-vl")


def _internvl(folder):
    from tests.internvl_factory import make_internvl

    return make_internvl(folder / "tiny-internvl3-hf")


# (family, builder, folder name, words the model card must show, screenshot)
FAMILIES = [
    ("qwen2.5-vl", _qwen, "tiny-qwen2.5-vl",
     ["Qwen2_5_VLForConditionalGeneration", "Qwen2.5-VL ViT/14", "4–20 image tokens per image (native resolution"],
     "qwen-vl-chat"),
    ("internvl", _internvl, "tiny-internvl3-hf",
     ["InternVLForConditionalGeneration", "InternViT/14", "112-px tiles",
      "16–112 image tokens per image (dynamic tiling"],
     "internvl-chat"),
]


@pytest.mark.parametrize("family, build, name, card_words, screenshot", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_vlm_image_chat_in_the_browser(page, studio, sent, image_file, tmp_path_factory,  # noqa: F811
                                       family, build, name, card_words, screenshot):
    path = build(tmp_path_factory.mktemp(family))
    page.get_by_role("tab", name="Model").click()
    page.locator("#model-path textarea, #model-path input").first.fill(str(path))
    page.locator("#load-btn").click()
    wait_ui(page, lambda: f"Loaded {name}" in page.locator("#model-status").inner_text(), WORK_S,
            f"the {family} model to load")
    record_requests(studio.manager.current.pipeline, sent)
    info = page.locator("#model-info-panel").inner_text()
    for words in card_words:
        assert words in info, (words, info)

    page.get_by_role("tab", name="Chat").click()
    wait_ui(page, lambda: "sees images" in page.locator("#chat-note").inner_text(), UI_S, "the chat's vision note")
    set_number(page, "chat-max-new", 16)
    set_number(page, "chat-temperature", 0)
    box = page.locator("#chat-input textarea")
    page.locator("#chat-input input[type=file]").set_input_files(str(image_file("cat.png", (300, 200), seed=1)))
    wait_ui(page, lambda: input_images(page) == 1, UI_S, "the attached image in the message box")
    box.fill("What is in this picture?")
    box.press("Enter")
    wait_ui(page, lambda: bot_count(page) == 1 and reply_done(page), WORK_S, "the reply")
    wait_ui(page, lambda: chat_images(page) == 1, UI_S, "the image's thumbnail in the history")
    assert image_parts(sent[-1]) == 1
    reply = page.locator("#chatbot [data-testid=bot]").first.inner_text()
    assert reply.strip(), "an empty reply"
    assert "16 generated" in page.locator("#chat-stats").inner_text()  # max new tokens, streamed in
    wait_ui(page, lambda: "vision tower" in page.locator("#mem-panel").inner_text(), WORK_S,
            "the vision tower's row in the memory panel")
    shot(page, screenshot)
