"""Quantize and Compare jobs outlive the browser tab (users reach the box through SSH tunnels that drop), in a real
headless Chromium against the in-process app: start a job, close the tab, open a new one (a new browser context,
as after a reload or a new login): it shows the same job's live progress and ETA and cancels it; a job that
finishes with no tab open is written in full, and the next tab shows its summary (the Quantize before/after
perplexity, the Compare results). Screenshots: test-artifacts/ui/job-*.png."""

from __future__ import annotations

import pytest

from tests.ui.test_browser import CHROMIUM, CHROMIUM_ARGS, UI_S, WORK_S, shot, wait_for, wait_ui

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium; they are not skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_tab(browser, studio, tab: str):
    """A fresh browser context (no cookies, no state: as a new login) on the studio, with `tab` selected."""
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = context.new_page()
    page.js_errors = []  # uncaught JavaScript errors, asserted empty
    page.on("pageerror", lambda error: page.js_errors.append(str(error)))
    page.set_default_timeout(30_000)
    page.goto(studio.url + "/")
    page.wait_for_selector("#mem-panel")
    page.get_by_role("tab", name=tab).click()
    return context, page


def card_reading(page, elem_id: str) -> tuple[str | None, str]:
    """(the job id the card shows, its text) of a running job's card, or (None, "") when there is none."""
    card = page.locator(f"#{elem_id}")
    if not card.count():
        return None, ""
    try:
        return card.get_attribute("data-job", timeout=1000), card.inner_text(timeout=1000)
    except Exception:  # noqa: BLE001 - redrawn between the count and the read: the next poll reads it
        return None, ""


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def test_a_quantization_outlives_its_tab(browser, studio, demo_model_path):
    slot = studio.app.state.studio.quant_jobs
    # tab 1 starts a long run (AutoAWQ's 128 x 2048 calibration: minutes on a CPU even for the demo model)
    context, page = open_tab(browser, studio, "Quantize")
    fill(page, "quant-model", demo_model_path)
    fill(page, "quant-samples", 128)
    fill(page, "quant-seqlen", 2048)
    output = studio.quant_root / "outlives-its-tab"
    fill(page, "quant-output", output)
    page.locator("#quant-start").click()
    job_id, _ = wait_ui(page, lambda: card_reading(page, "quant-job")[0] and card_reading(page, "quant-job"), UI_S,
                        "the job's card in the tab that started it")
    context.close()  # the tab goes away (an SSH tunnel dropping looks the same to the server)

    job = slot.latest
    assert str(job.id) == job_id and job.snapshot().is_running  # still running, nobody watching
    context, page = open_tab(browser, studio, "Quantize")
    first = wait_ui(page, lambda: card_reading(page, "quant-job")[0] == job_id and card_reading(page, "quant-job"),
                    UI_S, "a new tab to show the same running job")
    text = first[1]
    assert "running for" in text and ("left (estimate)" in text or "ETA" in text), text
    wait_ui(page, lambda: card_reading(page, "quant-job")[1] not in ("", text), UI_S, "its progress to move on")
    shot(page, "job-quantize-new-tab")
    page.locator("#quant-cancel").click()
    wait_ui(page, lambda: page.locator("#quant-cancelled").count() > 0, WORK_S, "the cancelled job's outcome")
    assert job.state == "cancelled" and not output.exists()  # nothing half-written
    context.close()

    # a short run that ends while no tab is open: the next tab shows its summary and perplexity
    context, page = open_tab(browser, studio, "Quantize")
    fill(page, "quant-model", demo_model_path)
    fill(page, "quant-samples", 6)
    fill(page, "quant-seqlen", 64)
    output = studio.quant_root / "finished-unwatched"
    fill(page, "quant-output", output)
    page.locator("#quant-start").click()
    wait_ui(page, lambda: slot.latest is not job, UI_S, "the second job to start")
    second = slot.latest
    context.close()
    assert wait_for(lambda: second.finished.is_set(), WORK_S, "the unwatched job to finish")
    assert second.state == "done", second.snapshot().error
    assert (output / "config.json").is_file() and studio.app.state.studio.quantized_models[0] == str(output)
    context, page = open_tab(browser, studio, "Quantize")
    wait_ui(page, lambda: page.locator("#quant-done").count() > 0, UI_S, "the finished job's summary in a new tab")
    summary = page.locator("#quant-status-box").inner_text()
    assert str(output) in summary and "6 samples × 64 tokens" in summary, summary
    quality = second.result.quality
    ppl = page.locator("#quant-ppl").inner_text()
    assert f"16-bit {quality['before']:.2f} → quantized {quality['after']:.2f}" in ppl, ppl
    page.locator("#quant-load").wait_for(state="visible")
    shot(page, "job-quantize-summary")
    assert not page.js_errors, page.js_errors
    context.close()


def test_a_comparison_outlives_its_tab(browser, studio, demo_model_path):
    slot = studio.app.state.studio.compare_jobs
    context, page = open_tab(browser, studio, "Compare")
    fill(page, "compare-model", demo_model_path)
    for name in ("fp16-kv8", "bf16", "fp32", "fp32-kv4"):  # with the default fp16, fp16-kv4: six child processes
        page.locator("#compare-settings label", has_text=name).first.click()
    for elem_id, value in (("compare-session-lens", 128), ("compare-prompt-len", 8), ("compare-new-tokens", 4)):
        fill(page, elem_id, value)
    page.locator("#compare-run").click()
    job_id, _ = wait_ui(page, lambda: card_reading(page, "compare-job")[0] and card_reading(page, "compare-job"),
                        UI_S, "the comparison's card in the tab that started it")
    context.close()

    job = slot.latest
    assert str(job.id) == job_id and job.snapshot().is_running
    context, page = open_tab(browser, studio, "Compare")
    first = wait_ui(page, lambda: card_reading(page, "compare-job")[0] == job_id and card_reading(page, "compare-job"),
                    UI_S, "a new tab to show the same running comparison")
    assert "@ 128" in first[1] and "running for" in first[1], first[1]
    wait_ui(page, lambda: card_reading(page, "compare-job")[1] not in ("", first[1]), UI_S, "its progress to move on")
    shot(page, "job-compare-new-tab")
    page.locator("#compare-cancel").click()
    wait_ui(page, lambda: page.locator("#compare-cancelled").count() > 0, WORK_S, "the cancelled comparison")
    assert job.state == "cancelled"
    rows = job.result.result["rows"]
    assert rows and rows[-1]["status"] == "cancelled" and len(rows) < 6, rows
    context.close()

    # one setting, finished with no tab open: the next tab shows its results
    context, page = open_tab(browser, studio, "Compare")
    fill(page, "compare-model", demo_model_path)
    page.locator("#compare-settings label", has_text="fp16-kv4").first.click()  # leaves fp16 alone
    for elem_id, value in (("compare-session-lens", 128), ("compare-prompt-len", 8), ("compare-new-tokens", 4)):
        fill(page, elem_id, value)
    page.locator("#compare-run").click()
    wait_ui(page, lambda: slot.latest is not job, UI_S, "the second comparison to start")
    second = slot.latest
    context.close()
    assert wait_for(lambda: second.finished.is_set(), WORK_S, "the unwatched comparison to finish")
    assert second.state == "done", second.snapshot().error
    context, page = open_tab(browser, studio, "Compare")
    wait_ui(page, lambda: page.locator("#compare-done").count() > 0, UI_S, "the finished comparison in a new tab")
    status = page.locator("#compare-status-box").inner_text()
    assert "1 of 1 settings measured" in status, status
    assert second.result.result["rows"][0]["perplexity"] > 1
    wait_ui(page, lambda: "fp16" in page.locator("#compare-results").inner_text(), UI_S, "the results table")
    assert not page.js_errors, page.js_errors
    shot(page, "job-compare-results")
    context.close()
