"""The Chat tab's keep-open-all-day features in a real headless Chromium against the app on the demo model: the
model library (a model folder, an AWQ folder, a broken one with its reason), a chat saved in the browser that comes
back after a reload and goes on, reply versions stepped through, an edit that makes a branch and switching back,
Continue after `length`, a stop sequence honoured, export then import giving the same conversation. The time from
Enter to the first streamed token is measured in the page and printed (reported, not asserted).

Texts are compared as the model wrote them: the message editor (click a message) shows its raw text, where the
chat shows it rendered as Markdown. Every wait is on a page state with a generous deadline; screenshots go to
test-artifacts/ui/; the JavaScript console must stay free of errors."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from tests.ui.test_browser import CHROMIUM, CHROMIUM_ARGS, UI_S, WORK_S, set_number, shot, wait_ui

pytestmark = pytest.mark.browser

# records, in the page, when Enter was pressed in the chat box and when the next reply first showed text
TIME_FIRST_TOKEN = """() => {
    window.__ttft = null;
    const box = document.querySelector('#chat-input textarea');
    const before = document.querySelectorAll('#chatbot [data-testid=bot]').length;
    let t0 = null;
    box.addEventListener('keydown', (e) => { if (e.key === 'Enter' && !e.shiftKey && t0 === null)
        t0 = performance.now(); }, {once: false});
    const observer = new MutationObserver(() => {
        const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
        if (t0 !== null && bots.length > before && bots[bots.length - 1].innerText.trim()) {
            window.__ttft = performance.now() - t0;
            observer.disconnect();
        }
    });
    observer.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def page(studio):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium; they are not skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(UI_S * 1000)
        page.js_errors = []  # uncaught errors and console.error lines, asserted empty
        page.on("pageerror", lambda error: page.js_errors.append(str(error)))
        page.on("console", lambda msg: page.js_errors.append(msg.text) if msg.type == "error" else None)
        page.goto(studio.url + "/")
        page.wait_for_selector("#mem-panel")
        yield page
        browser.close()


def bots(page):
    return page.locator("#chatbot [data-testid=bot]")


def users(page):
    return page.locator("#chatbot [data-testid=user]")


def stats_text(page) -> str:
    return page.locator("#chat-stats").inner_text()


def reply_done(page) -> bool:
    """The reply on screen has finished: the stats line says how it ended, and the last reply carries its token
    count (set when it finished, so a stats line left from the reply before cannot pass for it)."""
    text = stats_text(page)
    last = bots(page).last.inner_text() if bots(page).count() else ""
    return ("generated" in text and any(w in text for w in ("end of turn", "max new tokens", "stopped"))
            and re.search(r"\d+ tokens", last) is not None)


def send(page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    n = bots(page).count()
    box.press("Enter")
    wait_ui(page, lambda: bots(page).count() > n and reply_done(page), WORK_S, f"the reply to {text!r}")


SENTINEL = "\u2063(not selected yet)"


def raw_text(page, message) -> str:
    """A message's text as the model wrote it: click it, read the message editor. `message` is a user or bot
    locator with its index (`users(page).nth(i)`); the chat alternates user, assistant."""
    role = "User" if "user" in str(message) else "Assistant"
    locator = users(page) if role == "User" else bots(page)
    count = locator.count()
    index = next(i for i in range(count) if locator.nth(i).evaluate("(a, b) => a === b", message.element_handle()))
    position = 2 * index + (1 if role == "User" else 2)
    edit = page.locator("#msg-edit textarea")
    edit.fill(SENTINEL)  # so a selection left from before cannot pass for this one
    message.click()
    want = f"{role} message {position} of {users(page).count() + bots(page).count()}"
    wait_ui(page, lambda: want in page.locator("#msg-info").inner_text() and edit.input_value() != SENTINEL, UI_S,
            f"'{want}' to be selected")
    return edit.input_value()


def version(page) -> str:
    return page.locator("#msg-version").inner_text()


def click_and_wait(page, elem: str, done, what: str, timeout: float = UI_S):
    page.locator(elem).click()
    wait_ui(page, done, timeout, what)


def greedy(page, max_new: int) -> None:
    set_number(page, "chat-max-new", max_new)
    set_number(page, "chat-temperature", 0)


def new_chat(page) -> None:
    click_and_wait(page, "#chat-clear", lambda: bots(page).count() == 0 and users(page).count() == 0, "a new chat")


def row(page, name: str):
    """The library table's first cell on the row of `name`."""
    return page.locator("#library-table div[role=row]", has_text=name).first.locator("[role=gridcell]").first


def test_library_lists_a_model_an_awq_and_a_broken_folder(page, studio, demo_model_path):
    root = studio.quant_root
    plain = shutil.copytree(demo_model_path, root / "lib-plain")
    awq = shutil.copytree(demo_model_path, root / "lib-awq")
    cfg = json.loads((awq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}
    (awq / "config.json").write_text(json.dumps(cfg))
    (root / "lib-broken").mkdir()
    (root / "lib-broken" / "config.json").write_text("{ not json")
    try:
        page.get_by_role("tab", name="Model").click()
        table = page.locator("#library-table")
        click_and_wait(page, "#library-refresh", lambda: "lib-broken" in table.inner_text(), "the library scan",
                       WORK_S)
        text = table.inner_text()
        assert "lib-plain" in text and "lib-awq" in text and "AWQ W4, group 64" in text, text
        assert "cannot load: config.json is not valid JSON" in text, text
        assert "LlamaForCausalLM" in text and "ready" in text
        assert "ready" in page.locator("#library-summary").inner_text()
        shot(page, "model-library")
        # one click on a ready row fills the Model field; a broken row says why instead
        row(page, "lib-plain").click()
        path_box = page.locator("#model-path textarea, #model-path input").first
        wait_ui(page, lambda: path_box.input_value() == str(plain), UI_S, "the Model field to be filled")
        row(page, "lib-broken").click()
        wait_ui(page, lambda: "cannot be loaded" in page.locator("#library-picked").inner_text(), UI_S,
                "the broken folder's reason")
        assert path_box.input_value() == str(plain)  # a broken row does not fill the form
    finally:
        for name in ("lib-plain", "lib-awq", "lib-broken"):
            shutil.rmtree(root / name, ignore_errors=True)
    # the demo model, loaded from the Model tab, serves the chats below
    path_box.fill(str(demo_model_path))
    page.locator("#load-btn").click()
    wait_ui(page, lambda: "Loaded demo-model" in page.locator("#model-status").inner_text(), WORK_S,
            "the demo model to load")
    assert not page.js_errors, page.js_errors


def test_chat_is_saved_in_the_browser_reopened_after_reload_and_continued(page, studio):
    page.get_by_role("tab", name="Chat").click()
    # a model is loaded: the empty chat says hello (not "No model yet?")
    wait_ui(page, lambda: "Say hello" in page.locator("#chatbot").inner_text(), UI_S, "the empty chat's text")
    assert "No model yet" not in page.locator("#chatbot").inner_text()
    greedy(page, 24)
    page.evaluate(TIME_FIRST_TOKEN)
    send(page, "Hello saved chat")
    ttft_ms = page.evaluate("window.__ttft")
    assert ttft_ms is not None and ttft_ms > 0
    print(f"\nChat: Enter to first streamed token on the demo model (CPU, in the browser): {ttft_ms:.0f} ms")
    first_prompt = int(re.search(r"(\d+) prompt tokens", stats_text(page)).group(1))
    chat_list = page.locator("#chat-list")
    wait_ui(page, lambda: "Hello saved chat" in chat_list.inner_text(), UI_S, "the chat in the saved list")
    first_reply = raw_text(page, bots(page).last)
    assert first_reply

    page.reload()
    page.wait_for_selector("#mem-panel")
    page.get_by_role("tab", name="Chat").click()
    wait_ui(page, lambda: "Hello saved chat" in page.locator("#chat-list").inner_text(), UI_S,
            "the saved chat after the reload")
    assert bots(page).count() == 0  # a fresh page starts on a new chat
    # ... with the settings last used with this model (its preset), not the defaults (256, 0.7)
    max_new = page.locator("#chat-max-new input[type=number]")
    wait_ui(page, lambda: max_new.input_value() == "24", UI_S, "the model's preset")
    assert float(page.locator("#chat-temperature input[type=number]").input_value()) == 0
    page.locator("#chat-list label", has_text="Hello saved chat").first.click()
    wait_ui(page, lambda: bots(page).count() == 1 and users(page).count() == 1, UI_S, "the chat to reopen")
    assert users(page).first.inner_text().strip() == "Hello saved chat"
    assert raw_text(page, bots(page).last) == first_reply
    assert page.locator("#chat-title input").input_value() == "Hello saved chat"
    shot(page, "chat-reopened")
    send(page, "And then?")  # the reply continues the reopened chat: the whole of it is the prompt
    assert users(page).count() == 2 and bots(page).count() == 2
    prompt = int(re.search(r"(\d+) prompt tokens", stats_text(page)).group(1))
    assert prompt > first_prompt + 3, (prompt, first_prompt)
    assert not page.js_errors, page.js_errors


def test_reply_versions_and_an_edit_branch(page):
    new_chat(page)
    set_number(page, "chat-max-new", 12)
    set_number(page, "chat-temperature", 1)
    set_number(page, "chat-top-k", 0)
    set_number(page, "chat-top-p", 1)
    set_number(page, "chat-seed", -1)
    send(page, "Pick a word")
    replies = [raw_text(page, bots(page).last)]
    for n in (2, 3):  # Regenerate keeps the earlier replies: versions 2/2, then 3/3
        page.locator("#chat-regenerate").click()
        wait_ui(page, lambda n=n: f"version {n}/{n}" in bots(page).last.inner_text() and reply_done(page), WORK_S,
                f"reply version {n}")
        replies.append(raw_text(page, bots(page).last))
    assert bots(page).count() == 1 and version(page) == "version 3/3"
    shot(page, "chat-versions")
    edit = page.locator("#msg-edit textarea")
    for expected, index in ((2, 1), (1, 0)):
        click_and_wait(page, "#msg-prev", lambda e=expected, i=index: version(page) == f"version {e}/3"
                       and edit.input_value() == replies[i], f"a step back to version {expected}")
        wait_ui(page, lambda e=expected: f"version {e}/3" in bots(page).last.inner_text(), UI_S, "the chat to follow")
    click_and_wait(page, "#msg-next", lambda: version(page) == "version 2/3" and edit.input_value() == replies[1],
                   "a step forward")

    # edit the user message: resent as a new branch; the old branch (with its version 2 showing) stays
    raw_text(page, users(page).first)
    assert version(page) == "branch 1/1"
    page.locator("#msg-edit textarea").fill("Pick a number")
    page.locator("#msg-save").click()
    wait_ui(page, lambda: users(page).first.inner_text().startswith("Pick a number") and reply_done(page)
            and bots(page).count() == 1, WORK_S, "the edited message's reply")
    assert "branch 2/2" in users(page).first.inner_text()
    shot(page, "chat-branch")
    raw_text(page, users(page).first)
    click_and_wait(page, "#msg-prev", lambda: version(page) == "branch 1/2", "back to the first branch")
    wait_ui(page, lambda: users(page).first.inner_text().startswith("Pick a word"), UI_S, "the old branch")
    assert raw_text(page, bots(page).last) == replies[1] and version(page) == "version 2/3"

    # delete the version shown: the one before it takes its place, the other stays
    page.locator("#msg-delete").click()
    wait_ui(page, lambda: "version 1/2" in bots(page).last.inner_text(), UI_S, "the deleted version to go")
    assert raw_text(page, bots(page).last) == replies[0]
    # an assistant message edited in place (steering): no new message, no new version
    page.locator("#msg-edit textarea").fill("An edited reply.")
    page.locator("#msg-save").click()
    wait_ui(page, lambda: bots(page).last.inner_text().startswith("An edited reply."), UI_S, "the edit in place")
    assert "version 1/2" in bots(page).last.inner_text() and users(page).count() == 1
    assert not page.js_errors, page.js_errors


def test_continue_after_length_and_a_stop_sequence(page):
    new_chat(page)
    greedy(page, 6)
    send(page, "Tell a long story")
    assert "max new tokens reached" in stats_text(page)
    short = raw_text(page, bots(page).last)
    page.locator("#chat-continue").click()
    wait_ui(page, lambda: "12 tokens" in bots(page).last.inner_text() and reply_done(page), WORK_S,
            "the reply to go on")
    longer = raw_text(page, bots(page).last)
    assert longer.startswith(short) and len(longer) > len(short), (short, longer)
    assert users(page).count() == 1 and bots(page).count() == 1  # no new user turn
    shot(page, "chat-continued")

    # a stop sequence: the same greedy reply, ended before the first place the string shows up
    new_chat(page)
    greedy(page, 40)
    send(page, "Stop test")
    full = raw_text(page, bots(page).last)
    middle = len(full) // 2
    stop = next(full[i:i + 3] for i in range(middle, len(full) - 3)
                if full[i:i + 3].strip() and "\n" not in full[i:i + 3] and "\\" not in full[i:i + 3])
    page.locator("#chat-stop-seq textarea").fill(stop)
    page.locator("#chat-stop-seq textarea").blur()
    page.locator("#chat-regenerate").click()
    wait_ui(page, lambda: "version 2/2" in bots(page).last.inner_text() and reply_done(page), WORK_S,
            "the reply with a stop sequence")
    stopped = raw_text(page, bots(page).last)
    assert stopped == full[:full.index(stop)], (stop, full, stopped)
    assert "end of turn" in stats_text(page)
    page.locator("#chat-stop-seq textarea").fill("")
    assert not page.js_errors, page.js_errors


def test_export_then_import_gives_the_same_conversation(page, tmp_path):
    page.get_by_role("tab", name="Chat").click()
    new_chat(page)
    greedy(page, 16)
    page.locator("#chat-system textarea").fill("You are terse.")
    send(page, "Export me: $x^2$ and `code`")
    send(page, "Once more")
    exported = export(page, tmp_path / "first")
    n_chats = page.locator("#chat-list label").count()
    with page.expect_file_chooser() as chooser:
        page.locator("#chat-import").click()
    chooser.value.set_files(str(exported["json"]))
    wait_ui(page, lambda: page.locator("#chat-list label").count() == n_chats + 1, UI_S, "the imported chat")
    again = export(page, tmp_path / "again")
    first, second = json.loads(exported["json"].read_text()), json.loads(again["json"].read_text())
    assert second["messages"] == first["messages"] and second["settings"] == first["settings"]
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert first["messages"][0]["content"] == "You are terse."
    assert "**User**" in exported["md"].read_text() and first["messages"][1]["content"] in exported["md"].read_text()
    wait_ui(page, lambda: users(page).count() == 2 and bots(page).count() == 2, UI_S, "the imported chat on screen")
    shot(page, "chat-imported")
    assert not page.js_errors, page.js_errors


def export(page, folder) -> dict:
    """Click Export and download the two files (Markdown, JSON) it offers."""
    files = page.locator("#chat-export-files a")
    click_and_wait(page, "#chat-export", lambda: "Exported" in stats_text(page) and files.count() == 2,
                   "the exported files")
    folder.mkdir(parents=True)
    out = {}
    for i in range(2):
        href = files.nth(i).get_attribute("href")
        body = page.request.get(href).body()
        kind = "json" if href.split("?")[0].endswith(".json") else "md"
        out[kind] = folder / f"chat.{kind}"
        out[kind].write_bytes(body)
    assert set(out) == {"json", "md"}, out
    return out


def test_small_things_a_new_user_saw(page, studio):
    """The Quantize tab times this setting on this machine and offers a quick one; Compare's plan and label read
    right on a CPU box; the memory history was recorded while no page looked (it spans more than this page)."""
    page.get_by_role("tab", name="Quantize").click()
    page.locator("#quant-estimate-btn").wait_for(state="visible")
    for elem, value in (("quant-samples", 4), ("quant-seqlen", 64)):
        box = page.locator(f"#{elem} input")
        for _ in range(3):  # a fill that lands while the tab first renders can be reset: fill again, as a user would
            box.fill(str(value))
            box.blur()
            try:
                wait_ui(page, lambda b=box, v=value: b.input_value() == str(v), 10, f"{elem} to read {value}")
                break
            except AssertionError:
                continue
        assert box.input_value() == str(value)
    page.locator("#quant-estimate-btn").click()
    estimate = page.locator("#quant-estimate-box")
    wait_ui(page, lambda: "on this machine" in estimate.inner_text() or "Could not" in estimate.inner_text(), WORK_S,
            "the time estimate")
    text = estimate.inner_text()
    assert "This setting (4 × 64): about" in text and "4 layers ×" in text and "quick setting (8 × 256)" in text, text
    shot(page, "quantize-estimate")
    page.locator("#quant-quick").click()
    wait_ui(page, lambda: page.locator("#quant-samples input").input_value() == "8"
            and page.locator("#quant-seqlen input").input_value() == "256", UI_S, "the quick setting")

    page.get_by_role("tab", name="Compare").click()
    # no GPU here: the settings run and are planned on the CPU, so no card size is offered (it used to say 80 GB)
    assert "runs on the CPU" in page.locator("#compare-gpu input").input_value()
    label = page.locator("#compare-fractions").get_by_text("Cache fraction", exact=True)
    assert label.is_visible() and label.evaluate("e => e.scrollWidth <= e.clientWidth + 1")  # not cut off

    # the memory history goes on with no page open (it was recorded only while a page polled)
    assert not page.js_errors, page.js_errors
    state = studio.app.state.studio
    page.goto("about:blank")
    left = time.time()
    wait_ui(page, lambda: sum(r["time"] > left for r in list(state.memory_history)) >= 3, UI_S,
            "three readings with no page open")
    page.goto(studio.url + "/")
    page.wait_for_selector("#mem-panel")
