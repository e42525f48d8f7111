"""The studio in a real headless Chromium (Debian's /usr/bin/chromium through playwright's sync API), against the
app started in-process: load the demo model from the Model tab, chat with a streamed reply and Stop, quantize the
demo model from the Quantize tab watching the progress bar, load the result, and see the memory panel update.

Screenshots of every tab go to test-artifacts/ui/. These tests never skip: a missing Chromium is a failure."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
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
    """Set a Slider's / Number's value through its number box, as a user types it."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()


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
        page.set_default_timeout(30_000)
        page.goto(studio.url + "/")
        page.wait_for_selector("#mem-panel")
        yield page
        browser.close()


def test_memory_panel_updates_live(page):
    panel = page.locator("#mem-panel")
    first = panel.inner_text()
    assert "updated" in first
    assert ("GPU" in first) or ("No GPU monitoring" in first and "CPU RAM" in first)
    wait_ui(page, lambda: panel.inner_text() != first, 10, "the memory panel to refresh")
    assert "No model loaded" in page.locator("#studio-header-box").inner_text()


def test_load_demo_model_from_model_tab(page, studio, demo_model_path):
    page.get_by_role("tab", name="Model").click()
    path_box = page.locator("#model-path textarea, #model-path input").first
    path_box.fill(str(demo_model_path))
    page.locator("#load-btn").click()
    status = page.locator("#model-status")
    wait_ui(page, lambda: "Loaded demo-model" in status.inner_text(), 60, "the demo model to load")
    info = page.locator("#model-info-panel").inner_text()
    assert "LlamaForCausalLM" in info and "KV capacity" in info
    header = page.locator("#studio-header-box").inner_text()
    assert "demo-model" in header and "random weights" in header
    # the memory panel now shows the engine's breakdown
    wait_ui(page, lambda: "weights" in page.locator("#mem-panel").inner_text(), 10, "the engine breakdown")
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

    wait_ui(page, growing, 30, "a streamed reply (three successive lengths)")
    assert page.locator("#chatbot [data-testid=user]").first.inner_text().strip() == "Tell me a long story"
    shot(page, "chat-tab-streaming")
    aborted = engine.stats.num_aborted
    page.locator("#chat-stop").click()
    wait_ui(page, lambda: "stopped" in page.locator("#chat-stats").inner_text(), 10, "the stopped note")
    wait_ui(page, lambda: engine.stats.num_aborted > aborted and not engine.num_running, 10, "the request to abort")

    # a short greedy reply runs to its end and reports its speed
    page.locator("#chat-clear").click()
    wait_ui(page, lambda: page.locator("#chatbot [data-testid=bot]").count() == 0, 10, "Clear to empty the chat")
    set_number(page, "chat-max-new", 40)
    set_number(page, "chat-temperature", 0)
    box.fill("Hello!")
    box.press("Enter")
    stats = page.locator("#chat-stats")
    wait_ui(page, lambda: "tok/s" in stats.inner_text() and "generated" in stats.inner_text()
             and ("end of turn" in stats.inner_text() or "max new tokens" in stats.inner_text()), 30,
             "the reply's token counts")
    assert page.locator("#chatbot [data-testid=bot]").last.inner_text().strip()
    shot(page, "chat-tab")


def test_quantize_demo_model_and_load_result(page, studio, demo_model_path, tmp_path):
    from engine.demo_model import TRAINING_CORPUS

    calib = tmp_path / "calib.txt"
    calib.write_text(TRAINING_CORPUS * 8)
    page.get_by_role("tab", name="Quantize").click()
    page.locator("#quant-model textarea, #quant-model input").first.fill(str(demo_model_path))
    page.locator("#quant-calib input").click()
    page.get_by_role("option", name="local path").click()
    page.locator("#quant-calib-path textarea, #quant-calib-path input").first.fill(str(calib))
    page.locator("#quant-samples input").fill("16")
    page.locator("#quant-seqlen input").fill("128")
    output = page.locator("#quant-output textarea, #quant-output input").first
    wait_ui(page, lambda: output.input_value().startswith(str(studio.quant_root)), 5, "the default output folder")
    page.locator("#quant-start").click()

    bar = page.locator("#quant-status-box [role=progressbar]")
    seen: list[tuple[float, str]] = []
    shot_taken = False
    done = page.locator("#quant-done")

    def progress_or_done():
        nonlocal shot_taken
        if bar.count():
            try:
                value, label = float(bar.get_attribute("aria-valuenow", timeout=500) or 0), \
                    bar.get_attribute("aria-label", timeout=500) or ""
            except Exception:  # noqa: BLE001 - the bar went away between count() and the read
                return done.count() > 0
            if not seen or seen[-1] != (value, label):
                seen.append((value, label))
            if "Layer" in label and not shot_taken:
                shot(page, "quantize-tab-progress")
                shot_taken = True
        return done.count() > 0

    wait_ui(page, progress_or_done, 180, "the quantization to finish")
    values = [v for v, _ in seen]
    labels = " | ".join(label for _, label in seen)
    assert len(set(values)) >= 2 and values == sorted(values), seen  # the bar advanced, never back
    assert "Layer" in labels and "of 4" in labels, labels  # layer x of N was shown
    summary = page.locator("#quant-status-box").inner_text()
    assert "Quantization done" in summary and "smaller" in summary
    page.locator("#quant-chart").wait_for(state="visible")
    time.sleep(0.5)  # let the chart draw before the screenshot
    shot(page, "quantize-tab-done")

    page.locator("#quant-load").click()
    load_status = page.locator("#quant-load-status")
    wait_ui(page, lambda: "Loaded" in load_status.inner_text(), 60, "the quantized model to load")
    assert studio.manager.current.pipeline.engine.model_format == "awq"
    wait_ui(page, lambda: "AWQ W4A16" in page.locator("#studio-header-box").inner_text(), 10, "the header to show it")
    shot(page, "quantize-tab-loaded")


def test_api_tab_shows_the_endpoint(page, studio):
    page.get_by_role("tab", name="API").click()
    wait_ui(page, lambda: page.locator("#api-base-url").count(), 10, "the API tab")
    assert page.locator("#api-base-url").inner_text() == studio.url + "/v1"
    model = studio.manager.current.name
    wait_ui(page, lambda: model in page.locator("#tab-api").inner_text(), 10, "the model name in the examples")
    from ui.common import fmt_bytes

    weights = fmt_bytes(studio.manager.current.pipeline.memory()["weights_bytes"])
    wait_ui(page, lambda: f"weights {weights}" in page.locator("#mem-panel").inner_text(), 10,
            "the memory panel to show the loaded model")  # so the screenshot is not a reading from before the load
    shot(page, "api-tab")


def test_memory_panel_still_live_and_matches_the_loaded_model(page, studio):
    """After loads, chats and a quantization, the panel keeps refreshing and shows the model now loaded."""
    stamp = page.locator("#mem-stamp").inner_text()
    wait_ui(page, lambda: page.locator("#mem-stamp").inner_text() != stamp, 10, "the memory panel to refresh")
    from ui.common import fmt_bytes

    weights = fmt_bytes(studio.manager.current.pipeline.memory()["weights_bytes"])
    wait_ui(page, lambda: f"weights {weights}" in page.locator("#mem-panel").inner_text(), 10,
            f"the panel to show the loaded model's weights ({weights})")
