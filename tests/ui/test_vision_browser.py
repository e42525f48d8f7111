"""Image chat in a real headless Chromium, on a tiny LLaVA-1.5 (random weights) loaded from the Model tab: the card
and header say it sees images; an uploaded image shows in the message box, then as a thumbnail in the history with
a reply; a second turn with a pasted image keeps the first; Regenerate keeps both; a garbage "image" is refused by
name and taken off the box while the chat stays usable; Clear empties the history and the box, attachments
included. What the engine was sent is recorded by wrapping the in-process pipeline's `generate`.

Waits are on page states with generous deadlines (tests/ui/test_browser.py's helpers), never fixed sleeps.
Screenshots: test-artifacts/ui/vision-*.png."""

from __future__ import annotations

import base64

import pytest

from tests.ui.test_browser import CHROMIUM, CHROMIUM_ARGS, UI_S, WORK_S, set_number, shot, wait_ui

pytestmark = pytest.mark.browser

PASTE_IMAGE = """([b64, name]) => {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, {type: 'image/png'}));
    const event = new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true});
    document.querySelector('#chat-input textarea').dispatchEvent(event);
}"""


@pytest.fixture(scope="module")
def page(studio):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium; they are not skipped")
    from playwright.sync_api import sync_playwright

    studio.manager.unload()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(UI_S * 1000)
        page.js_errors = []
        page.on("pageerror", lambda error: page.js_errors.append(str(error)))
        page.goto(studio.url + "/")
        page.wait_for_selector("#mem-panel")
        yield page
        browser.close()
    studio.manager.unload()


@pytest.fixture(scope="module")
def sent(studio):
    """Filled by test_load_llava: the messages of every request the chat sent to the engine."""
    return []


def record_requests(pipe, calls: list) -> None:
    generate = pipe.generate

    def recording(messages, *args, **kwargs):
        calls.append(messages)
        return generate(messages, *args, **kwargs)

    pipe.generate = recording  # an instance attribute: gone with the pipeline when the model is unloaded


def image_parts(messages) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list)
               for part in m["content"] if part.get("type") == "image_url")


def chat_images(page) -> int:
    return page.locator("#chatbot [data-testid=user] img").count()


def input_images(page) -> int:
    return page.locator("#chat-input img").count()


def bot_count(page) -> int:
    return page.locator("#chatbot [data-testid=bot]").count()


def reply_done(page) -> bool:
    text = page.locator("#chat-stats").inner_text()
    return "generated" in text and ("end of turn" in text or "max new tokens" in text)


def test_load_llava_from_the_model_tab(page, studio, llava_path, sent):
    page.get_by_role("tab", name="Model").click()
    page.locator("#model-path textarea, #model-path input").first.fill(str(llava_path))
    page.locator("#load-btn").click()
    wait_ui(page, lambda: "Loaded tiny-llava" in page.locator("#model-status").inner_text(), WORK_S,
            "the LLaVA to load")
    record_requests(studio.manager.current.pipeline, sent)
    info = page.locator("#model-info-panel").inner_text()
    assert "LlavaForConditionalGeneration" in info and "16 image tokens per image" in info, info
    assert "CLIP ViT/14" in info and "Vision tower" in info and "Image cache" in info, info
    wait_ui(page, lambda: "sees images" in page.locator("#studio-header-box").inner_text(), UI_S,
            "the header to say the model sees images")
    wait_ui(page, lambda: "vision tower" in page.locator("#mem-panel").inner_text()
            and "image cache" in page.locator("#mem-panel").inner_text(), UI_S, "the vision rows of the memory panel")


def test_image_chat_turns_paste_regenerate_garbage_and_clear(page, studio, sent, image_file, tmp_path):
    page.get_by_role("tab", name="Chat").click()
    wait_ui(page, lambda: "sees images" in page.locator("#chat-note").inner_text(), UI_S, "the chat's vision note")
    set_number(page, "chat-max-new", 16)
    set_number(page, "chat-temperature", 0)
    box = page.locator("#chat-input textarea")

    # turn 1: an uploaded image and a question
    page.locator("#chat-input input[type=file]").set_input_files(str(image_file("cat.png", (400, 300), seed=1)))
    wait_ui(page, lambda: input_images(page) == 1, UI_S, "the attached image in the message box")
    box.fill("What is in this picture?")
    box.press("Enter")
    wait_ui(page, lambda: bot_count(page) == 1 and reply_done(page), WORK_S, "the first reply")
    wait_ui(page, lambda: chat_images(page) == 1, UI_S, "the image's thumbnail in the history")
    assert input_images(page) == 0 and box.input_value() == ""  # the box was emptied as the message went out
    thumb = page.locator("#chatbot [data-testid=user] img").first.bounding_box()
    assert 0 < thumb["height"] <= 200 and thumb["width"] <= 260, thumb  # a thumbnail, not the 400 x 300 picture
    assert image_parts(sent[-1]) == 1

    # turn 2: an image pasted into the box (Ctrl+V of an image); the first image stays in the chat and is sent again
    pasted = image_file("pasted.png", size=(50, 30), seed=2)
    page.evaluate(PASTE_IMAGE, [base64.b64encode(pasted.read_bytes()).decode(), "pasted.png"])
    wait_ui(page, lambda: input_images(page) == 1, UI_S, "the pasted image in the message box")
    box.fill("And this one?")
    box.press("Enter")
    wait_ui(page, lambda: bot_count(page) == 2 and reply_done(page), WORK_S, "the second reply")
    wait_ui(page, lambda: chat_images(page) == 2, UI_S, "both thumbnails in the history")
    assert image_parts(sent[-1]) == 2
    shot(page, "vision-chat")

    # Regenerate: the last turn again, with its image and the earlier one
    n = len(sent)
    page.locator("#chat-regenerate").click()
    wait_ui(page, lambda: len(sent) > n and bot_count(page) == 2 and reply_done(page), WORK_S, "the regenerated reply")
    assert image_parts(sent[-1]) == 2 and chat_images(page) == 2

    # a garbage "image": refused by name, taken off the box, the text comes back, the history stays
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a picture, just bytes " * 40)
    n = len(sent)
    page.locator("#chat-input input[type=file]").set_input_files(str(garbage))
    wait_ui(page, lambda: page.locator("#chat-input").inner_text().count("garbage.png") >= 1
            or input_images(page) == 1, UI_S, "the garbage file in the message box")
    box.fill("And what is this?")
    box.press("Enter")
    stats = page.locator("#chat-stats")
    wait_ui(page, lambda: "garbage.png" in stats.inner_text() and "not an image" in stats.inner_text(), WORK_S,
            "the refusal naming the file")
    wait_ui(page, lambda: box.input_value() == "And what is this?", UI_S, "the text to come back")
    wait_ui(page, lambda: input_images(page) == 0 and "garbage.png" not in page.locator("#chat-input").inner_text(),
            UI_S, "the garbage file to leave the box")
    assert len(sent) == n and bot_count(page) == 2 and chat_images(page) == 2  # nothing sent, nothing lost
    shot(page, "vision-chat-refused")
    box.press("Enter")  # the text alone now: the chat goes on, its two images with it
    wait_ui(page, lambda: bot_count(page) == 3 and reply_done(page), WORK_S, "a reply after the refusal")
    assert image_parts(sent[-1]) == 2

    # Clear: the history and the box (text and an attached image) are emptied
    page.locator("#chat-input input[type=file]").set_input_files(str(image_file("left.png", seed=3)))
    wait_ui(page, lambda: input_images(page) == 1, UI_S, "an image left in the box")
    box.fill("left over")
    page.locator("#chat-clear").click()
    wait_ui(page, lambda: bot_count(page) == 0 and chat_images(page) == 0 and box.input_value() == ""
            and input_images(page) == 0, UI_S, "Clear to empty the chat and the box")
    # and a new chat starts from nothing: only its own image is sent
    page.locator("#chat-input input[type=file]").set_input_files(str(image_file("fresh.png", seed=4)))
    wait_ui(page, lambda: input_images(page) == 1, UI_S, "a fresh image in the box")
    box.fill("A new chat.")
    box.press("Enter")
    wait_ui(page, lambda: bot_count(page) == 1 and reply_done(page), WORK_S, "the new chat's reply")
    assert image_parts(sent[-1]) == 1 and chat_images(page) == 1
    assert not page.js_errors, page.js_errors
