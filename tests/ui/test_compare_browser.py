"""The Compare tab in headless Chromium against the in-process app: the predicted table is there before anything
runs, two settings on the demo model run (each in its own child process) with per-setting progress, a W4A16
setting without an AWQ folder fails in its row, and the results table, chart, downloads, the per-text quality and
the verdict line appear (the planner's fit shows before the run). The chat tab's model is untouched (nothing is
loaded by the comparison). Screenshot: test-artifacts/ui/compare-tab.png."""

from __future__ import annotations

import time

import pytest

from tests.ui.test_browser import CHROMIUM, CHROMIUM_ARGS, shot, wait_ui

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def table_rows(page, elem_id: str) -> tuple[list[str], list[list[str]]]:
    """(column names, rows of cell texts) of a Gradio Dataframe, read from its ARIA grid."""
    grid = page.locator(f"#{elem_id} [role=grid]").first
    header = [c.get_attribute("title") or "" for c in grid.locator("[role=columnheader]").all()]
    rows = [[c.inner_text().strip() for c in row.locator("[role=gridcell]").all()]
            for row in grid.locator("div[role=row]").all()]
    return header, [r for r in rows if any(r)]


@pytest.fixture(scope="module")
def page(studio):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium; they are not skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(30_000)
        page.goto(studio.url + "/")
        page.wait_for_selector("#mem-panel")
        yield page
        browser.close()


def test_compare_two_settings_and_a_failing_one(page, studio):
    loaded_before = studio.manager.current
    page.get_by_role("tab", name="Compare").click()
    # predicted before anything runs: the default CPU settings (fp16, fp16-kv4)
    wait_ui(page, lambda: len(table_rows(page, "compare-predicted")[1]) == 2, 30, "the predicted table")
    header, rows = table_rows(page, "compare-predicted")
    assert "pred_kv_capacity_tokens" in header and "pred_weights_GiB" in header
    cap = header.index("pred_kv_capacity_tokens")
    fp16_cap, kv4_cap = (int(float(r[cap])) for r in rows)
    assert kv4_cap > 2 * fp16_cap
    fit = page.locator("#compare-plan-fit")
    wait_ui(page, lambda: fit.count() > 0 and "fp16-kv4 @ 256 / 0.8: fits" in fit.inner_text(), 30, "the plan fit")
    # tick w4a16 (no AWQ folder given): its row says what is missing
    page.locator("#compare-settings label", has_text="w4a16").first.click()
    wait_ui(page, lambda: len(table_rows(page, "compare-predicted")[1]) == 3, 15, "the predicted table to update")
    for elem_id, value in (("compare-prompt-len", 8), ("compare-new-tokens", 4), ("compare-concurrency", 2)):
        box = page.locator(f"#{elem_id} input").first
        box.fill(str(value))
        box.press("Enter")
    for elem_id, value in (("compare-sessions", 2), ("compare-max-kld", 0.05)):
        box = page.locator(f"#{elem_id} input").first
        box.fill(str(value))
        box.press("Enter")
    sessions = page.locator("#compare-session-lens textarea, #compare-session-lens input").first
    sessions.fill("128")
    sessions.press("Tab")
    slot = studio.app.state.studio.compare_jobs
    before = slot.latest  # an earlier test's comparison (its results show until this one starts)
    page.locator("#compare-run").click()
    bar = page.locator("#compare-status-box [role=progressbar]")
    labels: list[str] = []
    done = page.locator("#compare-done")

    def progress_or_done():
        if bar.count():
            try:
                label = bar.get_attribute("aria-label", timeout=500) or ""
            except Exception:  # noqa: BLE001 - the bar went away between count() and the read
                return finished()
            if label and (not labels or labels[-1] != label):
                labels.append(label)
        return finished()

    def finished():
        job = slot.latest
        return (job is not before and job.finished.is_set() and done.count() > 0
                and done.get_attribute("data-job") == str(job.id))

    wait_ui(page, progress_or_done, 300, "the comparison to finish")
    seen = " | ".join(labels)
    assert "fp16 @ 128" in seen and "fp16-kv4 @ 128" in seen, seen  # progress per setting
    status = page.locator("#compare-status-box").inner_text()
    assert "2 of 3 settings measured" in status and "CPU memory" in status and "meaningless" in status
    header, rows = table_rows(page, "compare-results")
    for col in ("setting", "status", "pred_weights_GiB", "weights_GiB", "kv_capacity_tokens",
                "pred_kv_capacity_tokens", "max_sessions", "memory_peak_GiB", "decode_tok_s", "throughput_tok_s",
                "ttft_ms", "perplexity", "greedy_match", "error"):
        assert col in header, header
    by = {r[header.index("setting")]: dict(zip(header, r)) for r in rows}
    assert set(by) == {"fp16", "fp16-kv4", "w4a16"}
    assert by["fp16"]["status"] == by["fp16-kv4"]["status"] == "ok"
    assert by["w4a16"]["status"] == "error" and "AWQ folder" in by["w4a16"]["error"]
    for s in ("fp16", "fp16-kv4"):
        assert by[s]["weights_GiB"] == by[s]["pred_weights_GiB"]
        assert by[s]["kv_capacity_tokens"] == by[s]["pred_kv_capacity_tokens"]
    assert int(float(by["fp16-kv4"]["kv_capacity_tokens"])) == kv4_cap
    assert int(float(by["fp16"]["kv_capacity_tokens"])) == fp16_cap
    wait_ui(page, lambda: "w4a16 @ 128 / 0.8: cannot run" in fit.inner_text(), 15, "the plan fit of w4a16")
    for col in ("kld_mean", "kld_p99", "top1"):
        assert col in header, header
    assert float(by["fp16"]["kld_mean"]) == 0 and float(by["fp16-kv4"]["kld_mean"]) > 0
    # the verdict line: the run's own verdict, shown under the status
    verdict = slot.latest.snapshot().result.result["verdict"]["line"]
    assert verdict.startswith("Verdict: ") and "2 session(s)" in verdict and "<= 0.05" in verdict
    shown = page.locator("#compare-verdict").inner_text()
    assert shown.strip() == verdict, (shown, verdict)
    page.locator("#compare-quality summary").click()  # the per-text quality, folded until asked for
    wait_ui(page, lambda: "chinese" in page.locator("#compare-quality").inner_text(), 10, "the per-text quality")
    page.locator("#compare-chart img").wait_for(state="visible")
    files = page.locator("#compare-files").inner_text().replace("\n", "")
    assert "compare.json" in files and "compare.md" in files and "compare.png" in files, files
    assert studio.manager.current is loaded_before  # the chat tab's model is untouched
    time.sleep(0.5)  # let the chart image paint before the screenshot
    page.locator("#compare-verdict").scroll_into_view_if_needed()
    shot(page, "compare-tab")
    # kept while the app runs: a fresh page shows the same results
    page.reload()
    page.wait_for_selector("#mem-panel")
    page.get_by_role("tab", name="Compare").click()
    wait_ui(page, lambda: len(table_rows(page, "compare-results")[1]) == 3, 30, "the kept results after a reload")
