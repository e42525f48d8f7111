"""Image chat with a tiny InternVL (-hf layout, random weights) in a real headless Chromium, through the same Model tab
and Chat tab as LLaVA: the card names InternViT, its tiles and the dynamic-tiling token range, an attached image goes
out as an image_url part and a streamed reply comes back with the image's thumbnail in the history.

Screenshot: test-artifacts/ui/internvl-chat.png."""

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


@pytest.fixture(scope="module")
def internvl_path(tmp_path_factory):
    from tests.internvl_factory import make_internvl

    return make_internvl(tmp_path_factory.mktemp("internvl") / "tiny-internvl3-hf")


def test_internvl_image_chat_in_the_browser(page, studio, internvl_path, sent, image_file):  # noqa: F811
    page.get_by_role("tab", name="Model").click()
    page.locator("#model-path textarea, #model-path input").first.fill(str(internvl_path))
    page.locator("#load-btn").click()
    wait_ui(page, lambda: "Loaded tiny-internvl3-hf" in page.locator("#model-status").inner_text(), WORK_S,
            "the InternVL to load")
    record_requests(studio.manager.current.pipeline, sent)
    info = page.locator("#model-info-panel").inner_text()
    assert "InternVLForConditionalGeneration" in info and "InternViT/14" in info and "112-px tiles" in info, info
    assert "16–112 image tokens per image (dynamic tiling" in info, info

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
    shot(page, "internvl-chat")
