"""The studio in a real headless Chromium (Debian's /usr/bin/chromium through playwright's sync API), against the
app started in-process: load the demo model from the Model tab, chat with a streamed reply and Stop, a refused
image that does not stick, quantize the demo model from the Quantize tab (offline, default calibration set) watching
the progress bar, load the result, and see the memory panel update.

Robust on a loaded machine: every wait is on a state the page reaches (DOM text, an element, a counter), with
generous deadlines, never a fixed sleep; the progress bar is recorded in the page by a MutationObserver, so a fast
run cannot slip between two polls. Screenshots of every tab go to test-artifacts/ui/. These tests never skip: a
missing Chromium is a failure."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
UI_S = 60  # deadline for a UI reaction (a click's result, a refresh); generous: CI is a loaded 2-core machine
WORK_S = 240  # deadline for real work (a model load, a quantization)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_ui(page, predicate, timeout: float, what: str):
    """wait_for, plus a screenshot (test-artifacts/ui/FAILED-*.png) when it times out, for CI post-mortems."""
    try:
        return wait_for(predicate, timeout, what)
    except AssertionError:
        shot(page, "FAILED-" + "".join(c if c.isalnum() else "-" for c in what)[:60])
        raise


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def set_number(page, elem_id: str, value) -> None:
    """Set a Slider's / Number's value through its number box, as a user types it, and wait until it shows."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()
    wait_ui(page, lambda: float(box.input_value() or "nan") == float(value), UI_S, f"{elem_id} to read {value}")


RECORD_PROGRESS = """(selector) => {
    window.__progress = [];
    const record = () => {
        for (const bar of document.querySelectorAll(selector + ' [role=progressbar]')) {
            const reading = [bar.getAttribute('aria-valuenow'), bar.getAttribute('aria-label')];
            const last = window.__progress[window.__progress.length - 1];
            if (!last || last[0] !== reading[0] || last[1] !== reading[1]) window.__progress.push(reading);
        }
    };
    new MutationObserver(record).observe(document.body,
        {subtree: true, childList: true, attributes: true, characterData: true});
    record();
}"""


@pytest.fixture(scope="module")
def page(studio):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium "
                    "(apt-get update && apt-get install -y chromium); they are not skipped")
    from playwright.sync_api import sync_playwright

    studio.manager.unload()  # start from "nothing loaded", so loading from the Model tab is visible
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(UI_S * 1000)
        page.js_errors = []  # uncaught JavaScript errors, asserted empty by the tests
        page.on("pageerror", lambda error: page.js_errors.append(str(error)))
        page.goto(studio.url + "/")
        page.wait_for_selector("#mem-panel")
        yield page
        browser.close()


def test_memory_panel_updates_live(page):
    panel = page.locator("#mem-panel")
    first = panel.inner_text()
    assert "updated" in first
    assert ("GPU" in first) or ("No GPU monitoring" in first and "CPU RAM" in first)
    wait_ui(page, lambda: panel.inner_text() != first, UI_S, "the memory panel to refresh")
    assert "No model loaded" in page.locator("#studio-header-box").inner_text()
    assert not page.js_errors, page.js_errors


def test_load_demo_model_from_model_tab(page, studio, demo_model_path):
    page.get_by_role("tab", name="Model").click()
    path_box = page.locator("#model-path textarea, #model-path input").first
    path_box.fill(str(demo_model_path))
    page.locator("#load-btn").click()
    status = page.locator("#model-status")
    wait_ui(page, lambda: "Loaded demo-model" in status.inner_text(), WORK_S, "the demo model to load")
    info = page.locator("#model-info-panel").inner_text()
    assert "LlamaForCausalLM" in info and "KV capacity" in info and "on disk" in info
    header = page.locator("#studio-header-box")
    # the header follows on the next refresh (a refresh that read "Loading ..." may land after the load's reply)
    wait_ui(page, lambda: "demo-model" in header.inner_text() and "random weights" in header.inner_text()
            and "Loading" not in header.inner_text(), UI_S, "the header to show the loaded demo model")
    # the memory panel now shows the engine's breakdown
    wait_ui(page, lambda: "weights" in page.locator("#mem-panel").inner_text(), UI_S, "the engine breakdown")
    shot(page, "model-tab")


def test_chat_streams_and_stops(page, studio):
    engine = studio.manager.current.pipeline.engine
    page.get_by_role("tab", name="Chat").click()
    # sampling with seed 0 makes the demo model run on for ~1000 tokens: long enough to watch and to stop
    set_number(page, "chat-max-new", 1500)
    set_number(page, "chat-temperature", 1)
    set_number(page, "chat-top-k", 0)
    set_number(page, "chat-top-p", 1)
    set_number(page, "chat-seed", 0)
    box = page.locator("#chat-input textarea")
    box.fill("Tell me a long story")
    box.press("Enter")
    bot = page.locator("#chatbot [data-testid=bot]").last
    lengths: set[int] = set()

    def growing():
        if bot.count():
            lengths.add(len(bot.inner_text()))
        return len(lengths - {0}) >= 3

    wait_ui(page, growing, WORK_S, "a streamed reply (three successive lengths)")
    assert page.locator("#chatbot [data-testid=user]").first.inner_text().strip() == "Tell me a long story"
    shot(page, "chat-tab-streaming")
    aborted = engine.stats.num_aborted
    page.locator("#chat-stop").click()
    wait_ui(page, lambda: "stopped" in page.locator("#chat-stats").inner_text(), UI_S, "the stopped note")
    wait_ui(page, lambda: engine.stats.num_aborted > aborted and not engine.num_running, UI_S,
            "the request to abort")

    # a short greedy reply runs to its end and reports its speed
    page.locator("#chat-clear").click()
    wait_ui(page, lambda: page.locator("#chatbot [data-testid=bot]").count() == 0, UI_S, "Clear to empty the chat")
    set_number(page, "chat-max-new", 40)
    set_number(page, "chat-temperature", 0)
    box.fill("Hello!")
    box.press("Enter")
    stats = page.locator("#chat-stats")
    wait_ui(page, lambda: "tok/s" in stats.inner_text() and "generated" in stats.inner_text()
             and ("end of turn" in stats.inner_text() or "max new tokens" in stats.inner_text()), WORK_S,
             "the reply's token counts")
    assert page.locator("#chatbot [data-testid=bot]").last.inner_text().strip()
    shot(page, "chat-tab")


def test_refused_image_does_not_stick_in_the_input(page, tmp_path):
    """A text model refuses an image: the text comes back to edit, the image does not, and the next message works."""
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (16, 16), "orange").save(image)
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-clear").click()
    wait_ui(page, lambda: page.locator("#chatbot [data-testid=bot]").count() == 0, UI_S, "Clear to empty the chat")
    page.locator("#chat-input input[type=file]").set_input_files(str(image))
    wait_ui(page, lambda: page.locator("#chat-input img").count() > 0, UI_S, "the attached image's thumbnail")
    box = page.locator("#chat-input textarea")
    box.fill("What is this?")
    box.press("Enter")
    stats = page.locator("#chat-stats")
    wait_ui(page, lambda: "takes no images" in stats.inner_text(), WORK_S, "the refusal")
    wait_ui(page, lambda: box.input_value() == "What is this?", UI_S, "the text to come back")
    wait_ui(page, lambda: page.locator("#chat-input img").count() == 0, UI_S, "the image to leave the input")
    shot(page, "chat-tab-image-refused")
    box.press("Enter")  # the same text again, now without the image
    wait_ui(page, lambda: "generated" in stats.inner_text() and "tok/s" in stats.inner_text(), WORK_S,
            "a reply to the text alone")
    assert page.locator("#chatbot [data-testid=user]").last.inner_text().strip() == "What is this?"
    # and Clear empties the input too
    # (the reply's event may still be delivering its last update, which can land after a Clear clicked at once:
    # the click is repeated until the state holds, as a user would; each try waits on the page's state)
    cleared = lambda: box.input_value() == "" and page.locator("#chatbot [data-testid=bot]").count() == 0  # noqa: E731
    for attempt in range(3):
        box.fill("left over")
        page.locator("#chat-clear").click()
        try:
            wait_ui(page, cleared, UI_S, "Clear to empty the chat and the input")
            break
        except AssertionError:
            if attempt == 2:
                raise


def test_quantize_demo_model_and_load_result(page, studio, demo_model_path):
    """Offline, with the default (built-in) calibration set, as a new user on a CPU box starts it."""
    page.get_by_role("tab", name="Quantize").click()
    page.locator("#quant-model textarea, #quant-model input").first.fill(str(demo_model_path))
    assert "Built-in text" in page.locator("#quant-calib input").input_value()  # the default works offline
    assert "No GPU here" in page.locator("#quant-cpu-note").inner_text()  # smaller sizes suggested up front
    assert page.locator("#quant-samples input").input_value() == "16"
    page.locator("#quant-samples input").fill("8")
    page.locator("#quant-seqlen input").fill("128")
    output = page.locator("#quant-output textarea, #quant-output input").first
    wait_ui(page, lambda: output.input_value().startswith(str(studio.quant_root)), UI_S, "the default output folder")
    page.evaluate(RECORD_PROGRESS, "#quant-status-box")
    page.locator("#quant-start").click()

    done = page.locator("#quant-done")
    shot_taken = False

    def finished():
        nonlocal shot_taken
        if not shot_taken and any("Layer" in (label or "") for _, label in page.evaluate("window.__progress")):
            shot(page, "quantize-tab-progress")
            shot_taken = True
        return done.count() > 0

    wait_ui(page, finished, WORK_S, "the quantization to finish")
    ppl = page.locator("#quant-ppl").inner_text()  # the before/after perplexity of what was just written
    assert re.search(r"16-bit [\d.]+ → quantized [\d.]+ \([+-][\d.]+%\)", ppl), ppl
    seen = [(float(v or 0), label or "") for v, label in page.evaluate("window.__progress")]
    values = [v for v, _ in seen]
    assert seen and values == sorted(values), seen  # the bar showed, and never went back
    layer_labels = [label for _, label in seen if "Layer" in label]
    assert all(re.search(r"Layer [1-4] of 4", label) for label in layer_labels), layer_labels
    assert all("left (estimate)" in label for label in layer_labels if "left" in label), layer_labels
    # however fast the run, the job reported every layer, in order (what the bar is drawn from)
    outcome = studio.app.state.studio.quant_jobs.latest.result
    layers_done = [done for stage, done, _ in outcome.history if stage == "quantize"]
    assert layers_done == sorted(layers_done) and set(range(5)) <= set(layers_done), layers_done
    summary = page.locator("#quant-status-box").inner_text()
    assert "Quantization done" in summary and "smaller" in summary and "on disk" in summary
    assert "Built-in offline text" in summary and "8 samples × 128 tokens" in summary, summary
    page.locator("#quant-chart").wait_for(state="visible")
    page.locator("#quant-chart canvas, #quant-chart svg").first.wait_for(state="visible")
    shot(page, "quantize-tab-done")
    assert output.input_value() != outcome.report["work_dir"]  # a fresh name for the next run
    assert not page.js_errors, page.js_errors

    page.locator("#quant-load").click()
    load_status = page.locator("#quant-load-status")
    wait_ui(page, lambda: "Loaded" in load_status.inner_text(), WORK_S, "the quantized model to load")
    assert studio.manager.current.pipeline.engine.model_format == "awq"
    wait_ui(page, lambda: "AWQ W4A16" in page.locator("#studio-header-box").inner_text(), UI_S,
            "the header to show it")
    shot(page, "quantize-tab-loaded")


def test_api_tab_shows_the_endpoint(page, studio):
    page.get_by_role("tab", name="API").click()
    wait_ui(page, lambda: page.locator("#api-base-url").count(), UI_S, "the API tab")
    assert page.locator("#api-base-url").inner_text() == studio.url + "/v1"
    model = studio.manager.current.name
    wait_ui(page, lambda: model in page.locator("#tab-api").inner_text(), UI_S, "the model name in the examples")
    from ui.common import fmt_bytes

    weights = fmt_bytes(studio.manager.current.pipeline.memory()["weights_bytes"])
    wait_ui(page, lambda: f"weights {weights}" in page.locator("#mem-panel").inner_text(), UI_S,
            "the memory panel to show the loaded model")  # so the screenshot is not a reading from before the load
    shot(page, "api-tab")


def test_memory_panel_still_live_and_matches_the_loaded_model(page, studio):
    """After loads, chats and a quantization, the panel keeps refreshing and shows the model now loaded."""
    stamp = page.locator("#mem-stamp").inner_text()
    wait_ui(page, lambda: page.locator("#mem-stamp").inner_text() != stamp, UI_S, "the memory panel to refresh")
    from ui.common import fmt_bytes

    weights = fmt_bytes(studio.manager.current.pipeline.memory()["weights_bytes"])
    wait_ui(page, lambda: f"weights {weights}" in page.locator("#mem-panel").inner_text(), UI_S,
            f"the panel to show the loaded model's weights ({weights})")
    assert not page.js_errors, page.js_errors
