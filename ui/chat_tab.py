"""Chat tab: streaming chat with the loaded model, kept as saved conversations in the user's browser.

- Conversations (ui/chat_history.py trees) live in gr.BrowserState (localStorage, never on the server, so users of
  one server with --api-keys do not see each other's chats): a sidebar lists them (new, rename, delete, search);
  each keeps its model name, system prompt, generation settings and images (data URLs within a budget, thumbnails
  beyond), and reopening one restores it: the next message continues it.
- Edit and branch: click a message to select it. An edited user message is resent as a new branch (the old one
  stays, switch with the arrows); an assistant message is edited in place; Delete takes a message and what followed.
- Regenerate adds a reply version (the arrows step through 1/3, 2/3 ...); Continue goes on with a reply that
  stopped (max new tokens or Stop) without a new user turn.
- Settings: the API's sampling settings, stop sequences and a seed; the last ones used with a model are its preset.
- Export the chat on screen as Markdown or JSON (OpenAI messages, images as data URLs); import JSON back.
- Replies render Markdown, code (highlighted, with copy buttons) and LaTeX; each shows its tokens and speed.

Images are attached (upload, paste or drop) in the message box and checked before anything is sent, under the
engine's own media policy; a refused one is taken off the message with a sentence naming it, the rest stays. A
text-only model refuses new images and skips (with a note) the images already in a chat it takes over. Replies
stream through ui/chat_reply.py; Stop ends this tab's reply and keeps the partial text."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import logging
import mimetypes
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from engine.errors import ImageInputError, InvalidImageError
from engine.media import IMAGE_MIME_TYPES, load_image
from studio.manager import LoadedModel, ModelSlot
from ui import chat_history as ch
from ui.chat_reply import FINISH_WORDS, PARAM_NAMES, StopSwitch, error_stats, settings_dict, stream_into
from ui.common import (
    fmt_bytes,
    friendly_error,
    image_limit,
    image_tokens_text,
    takes_images,
    tower_name,
    vision_spec,
)
from ui.state import StudioState

log = logging.getLogger("ui.chat")

EMPTY_INPUT = {"text": "", "files": []}
EMPTY_STATS = '<div class="chat-stats" id="chat-stats">&nbsp;</div>'
NO_SELECTION = '<div class="msg-info" id="msg-info">Click a message to edit, delete or switch its versions.</div>'
IMAGE_ERRORS = (ImageInputError, InvalidImageError)
STORE_KEY = "quant-studio-chats"
# BrowserState encrypts what it stores with this key; a fixed one keeps saved chats readable after a server restart
# (the key is sent to every page, so it hides nothing from the browser's owner: the chats never leave the browser)
STORE_SECRET = "quant-studio-saved-chats-v1"
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]
PLACEHOLDER_LOADED = ("<b>Say hello to the model named in the header.</b><br>Chats are saved in this browser: "
                      "the list on the left reopens them.")
PLACEHOLDER_EMPTY = "<b>No model yet? Load one in the Model tab.</b>"
DISPLAY_DIR = Path(tempfile.gettempdir()) / "quant-studio-chat-images"  # saved images as files the chatbot shows
# what the first bytes of a file say it is: the data URL's type comes from the content, not the file's name
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


@dataclass
class ChatTab:
    chatbot: gr.Chatbot
    textbox: gr.MultimodalTextbox
    stats: gr.HTML
    note: gr.HTML
    refresh: object  # () -> (note html, chatbot update) for the model loaded now (the Chat tab's select / page load)
    refresh_outputs: list


def chat_note_html(loaded: LoadedModel | None) -> str:
    """The line above the chat: whether the loaded model sees images, and how to give it some."""
    if loaded is None:
        body = "No model is loaded: load one in the <b>Model</b> tab."
    elif takes_images(loaded):
        vision = vision_spec(loaded)
        limit = image_limit(loaded)
        body = (f"<b>{html.escape(loaded.name)}</b> sees images ({html.escape(tower_name(vision))}, "
                f"{html.escape(image_tokens_text(vision))}). Attach them with the paperclip button, paste or drop "
                f"them on the message box; up to {limit} in a chat. Every turn sends the whole chat, its images "
                "included (encoded images are cached, not encoded again).")
    else:
        body = (f"<b>{html.escape(loaded.name)}</b> reads text only: an attached image is refused. Load a "
                "vision-language model (LLaVA) to chat about images.")
    kind = "vision" if takes_images(loaded) else "text"
    return f'<div class="chat-note chat-note-{kind}" id="chat-note">{body}</div>'


def display_file(url: str, name: str) -> str:
    """A saved image (data URL) as a file the chatbot can show, named by its content (written once)."""
    digest = hashlib.sha1(url.encode()).hexdigest()[:16]
    path = DISPLAY_DIR / digest / (Path(name).name or "image.png")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    return str(path)


def meta_text(conv: dict, node: dict) -> str:
    """The line under a message: its place among its alternatives, and a reply's tokens and speed."""
    bits = []
    index, count = ch.siblings(conv, node["id"])
    if count > 1:
        bits.append(f"{'branch' if node['role'] == 'user' else 'version'} {index}/{count}")
    stats = node.get("stats")
    if node["role"] == "assistant" and stats:
        bits.append(f"{stats['generated']} tokens")
        if stats.get("tps"):
            bits.append(f"{stats['tps']:.1f} tok/s")
        bits.append(FINISH_WORDS.get(stats.get("finish") or "", stats.get("finish") or ""))
    return " · ".join(b for b in bits if b)


def to_display(conv: dict | None) -> list[dict]:
    """The chat on screen as gr.Chatbot messages (images as files, the meta line below each message)."""
    if not conv:
        return []
    out = []
    for node in ch.path(conv):
        if node["role"] == "assistant" and not node["content"] and not node.get("stats"):
            continue  # a reply that has not started yet
        meta = meta_text(conv, node)
        text = node["content"] + (f'\n\n<span class="msg-meta">{html.escape(meta)}</span>' if meta else "")
        images = node.get("images") or []
        names = node.get("image_names") or []
        files = [{"path": display_file(u, names[i] if i < len(names) else f"image{i + 1}.png")}
                 for i, u in enumerate(images)]
        out.append({"role": node["role"], "content": files + ([text] if text else []) if images else text})
    return out


def image_mime(data: bytes, path: str) -> str:
    """An image's MIME type from its first bytes, else from its file name (the engine refuses types it cannot read,
    saying which ones it takes)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed = mimetypes.guess_type(path)[0]
    return guessed if guessed and guessed.startswith("image/") else "image/png"


def image_url(path: str) -> str:
    data = Path(path).read_bytes()
    return f"data:{image_mime(data, path)};base64,{base64.b64encode(data).decode()}"


def count_images(history: list[dict]) -> int:
    return sum(len(m.get("images") or []) for m in history)


def check_image(path: str, policy) -> str | None:
    """None when the engine will take the image at `path`, else the reason it will not (one readable clause). The
    check is the engine's own: the same data URL through the same media policy (bytes, type, pixels, decoding)."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        return "the uploaded file is gone (upload it again)"
    if size > policy.max_bytes:  # refused before reading it
        return f"the file is {fmt_bytes(size)}, more than the {fmt_bytes(policy.max_bytes)} an image may be"
    try:
        url = image_url(path)
        mime = url[len("data:"):url.index(";")]
        if mime not in IMAGE_MIME_TYPES:
            return f"it is {mime}, a type this model does not read (PNG, JPEG, WebP, GIF or BMP)"
        load_image(url, policy)
    except InvalidImageError as e:
        return str(e)
    except OSError as e:
        return f"the file could not be read ({e})"
    return None


def check_attachments(loaded: LoadedModel | None, history: list[dict], files: list[str]):
    """Split a message's attached images into (kept, refused [(file name, reason)]) for the loaded model, before
    anything is sent: a text-only model refuses all; a vision model refuses unreadable or oversized ones, and those
    beyond its images per prompt, counting the images already in the chat (every turn sends them all again)."""
    if loaded is None or not files:
        return list(files), []  # nothing loaded: the send fails with "no model is loaded" and keeps the images
    if not takes_images(loaded):
        return [], [(Path(f).name, "this model takes no images") for f in files]
    policy = loaded.pipeline.vision.policy
    kept, refused = [], []
    for f in files:
        reason = check_image(f, policy)
        if reason is None:
            kept.append(f)
        else:
            refused.append((Path(f).name, reason))
    limit, already = image_limit(loaded), count_images(history)
    room = max(0, limit - already)
    if len(kept) > room:
        held = f"this chat already holds {already} and " if already else ""
        reason = (f"too many images: {held}the model takes at most {limit} per chat (every turn sends the whole "
                  "chat, its images included)" + ("; Clear starts a new chat" if not room else ""))
        refused += [(Path(f).name, reason) for f in kept[room:]]
        kept = kept[:room]
    return kept, refused


def refusal_message(loaded: LoadedModel, refused: list[tuple[str, str]], kept: list[str], text: str) -> str:
    """The stats line after images were taken off a message: what was refused and why, and what Enter sends now."""
    n = len(refused)
    what = "the image was" if n == 1 else f"the {n} images were"
    if not takes_images(loaded):
        head = f"{loaded.name} takes no images: send text only, or load a vision-language model"
    else:
        reasons: dict[str, list[str]] = {}
        for name, reason in refused:
            reasons.setdefault(reason, []).append(name)
        head = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in reasons.items())
    then = ("press Enter to send the rest" if kept else "press Enter to send the text alone" if text
            else "attach another image or type a message")
    return f"{head} ({what} taken off your message: {then})"




def keep_images(conv: dict, files: list[str]) -> tuple[list[str], list[str]]:
    """Attached files as the conversation keeps them: (data URLs, file names), whole within the chat's budget."""
    used, urls = ch.image_bytes(conv), []
    for f in files:
        url = ch.image_to_keep(image_url(f), used)
        used += ch.data_url_bytes(url)
        urls.append(url)
    return urls, [Path(f).name for f in files]


def selection_html(conv: dict | None, node_id: str | None) -> str:
    if not conv or not node_id or node_id not in conv["nodes"]:
        return NO_SELECTION
    node = conv["nodes"][node_id]
    shown = [n["id"] for n in ch.path(conv)]
    where = f"message {shown.index(node_id) + 1} of {len(shown)}" if node_id in shown else "message"
    index, count = ch.siblings(conv, node_id)
    kind = "branch" if node["role"] == "user" else "version"
    how = ("Save edit resends it as a new branch (the old one stays)" if node["role"] == "user"
           else "Save edit rewrites it in place")
    return (f'<div class="msg-info" id="msg-info"><b>{node["role"].capitalize()}</b> {where} · '
            f'<span id="msg-version">{kind} {index}/{count}</span> · {how}.</div>')


def settings_values(settings: dict, defaults: tuple) -> list:
    """The settings components' values from a saved chat or preset (a missing one keeps the component's default)."""
    out = []
    for name, default in zip(PARAM_NAMES, defaults):
        value = settings.get(name, default)
        if name == "stop" and isinstance(value, list):
            value = "\n".join(s.replace("\n", "\\n") for s in value)
        out.append(value)
    return out


def build_chat_tab(state: StudioState, models: ModelSlot | None = None) -> ChatTab:
    """`models`: the model slot the chat serves from (default: the manager's main slot, the one the API serves)."""
    models = models or state.manager.main
    store = gr.BrowserState(ch.empty_store(), storage_key=STORE_KEY, secret=STORE_SECRET)
    conv_state = gr.State(None)  # the conversation on screen (a chat_history dict), saved to `store` after each change
    selected = gr.State(None)  # the id of the message clicked
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=220, elem_id="chat-sidebar"):
            new_btn = gr.Button("New chat", variant="primary", size="sm", elem_id="chat-clear")
            search = gr.Textbox(show_label=False, placeholder="Search chats", elem_id="chat-search", max_lines=1)
            chat_list = gr.Radio(choices=[], value=None, label="Saved in this browser", elem_id="chat-list",
                                 info=f"never on the server; images whole up to "
                                      f"{ch.IMAGE_BUDGET_BYTES // 2**20} MiB a chat, thumbnails beyond")
            title_box = gr.Textbox(label="Title", max_lines=1, elem_id="chat-title")
            with gr.Row():
                rename_btn = gr.Button("Rename", size="sm", elem_id="chat-rename")
                delete_chat_btn = gr.Button("Delete chat", size="sm", variant="stop", elem_id="chat-delete")
            with gr.Row():
                export_btn = gr.Button("Export", size="sm", elem_id="chat-export")
                import_btn = gr.UploadButton("Import JSON", file_types=[".json"], size="sm", elem_id="chat-import")
            export_files = gr.File(label="Markdown and JSON", file_count="multiple", interactive=False,
                                   elem_id="chat-export-files", height=90, visible=False)
        with gr.Column(scale=4):
            note = gr.HTML(chat_note_html(models.current), elem_id="chat-note-box")
            chatbot = gr.Chatbot(
                label="Chat", show_label=False, height=460, elem_id="chatbot", buttons=["copy", "copy_all"],
                placeholder=PLACEHOLDER_LOADED if models.current else PLACEHOLDER_EMPTY, latex_delimiters=LATEX,
                feedback_options=None,
            )
            textbox = gr.MultimodalTextbox(
                placeholder="Message the model (Enter sends, Shift+Enter adds a line). Attach, paste or drop images "
                            "for a vision-language model.",
                file_types=["image"], file_count="multiple", show_label=False, autofocus=True,
                elem_id="chat-input", sources=["upload"],
                max_plain_text_length=10**7,  # a long pasted prompt stays text (not a .txt "attachment")
            )
            with gr.Row():
                stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="chat-stop")
                regen_btn = gr.Button("Regenerate", size="sm", elem_id="chat-regenerate")
                continue_btn = gr.Button("Continue", size="sm", elem_id="chat-continue")
            stats = gr.HTML(EMPTY_STATS, elem_id="chat-stats-box")
            with gr.Group(elem_id="msg-panel"):
                msg_info = gr.HTML(NO_SELECTION, elem_id="msg-info-box")
                edit_box = gr.Textbox(show_label=False, lines=2, placeholder="the selected message",
                                      elem_id="msg-edit")
                with gr.Row():
                    prev_btn = gr.Button("← previous", size="sm", elem_id="msg-prev")
                    next_btn = gr.Button("next →", size="sm", elem_id="msg-next")
                    save_btn = gr.Button("Save edit", size="sm", variant="primary", elem_id="msg-save")
                    delete_msg_btn = gr.Button("Delete message", size="sm", elem_id="msg-delete")
        with gr.Column(scale=2, min_width=280):
            system = gr.Textbox(label="System prompt", lines=3, placeholder="You are a helpful assistant.",
                                elem_id="chat-system")
            with gr.Accordion("Generation", open=True):
                max_new = gr.Slider(1, 4096, value=256, step=1, label="Max new tokens", elem_id="chat-max-new")
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="chat-temperature",
                                        info="0 = greedy (deterministic)")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.01, label="Top-p", elem_id="chat-top-p")
                top_k = gr.Slider(0, 200, value=40, step=1, label="Top-k", info="0 = off", elem_id="chat-top-k")
                rep = gr.Slider(1.0, 2.0, value=1.0, step=0.01, label="Repetition penalty", elem_id="chat-rep")
                seed = gr.Number(value=-1, precision=0, label="Seed", info="-1 = random; fixed = reproducible",
                                 elem_id="chat-seed")
                stop_seq = gr.Textbox("", label="Stop sequences", lines=2, elem_id="chat-stop-seq",
                                      info="one per line (\\n for a newline); the reply ends before one")
                with gr.Accordion("More sampling", open=False):
                    min_p = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Min-p", elem_id="chat-min-p")
                    presence = gr.Slider(-2.0, 2.0, value=0.0, step=0.1, label="Presence penalty",
                                         elem_id="chat-presence")
                    frequency = gr.Slider(-2.0, 2.0, value=0.0, step=0.1, label="Frequency penalty",
                                          elem_id="chat-frequency")
    # the order the events take them in (ui/chat_reply.PARAM_NAMES); the first six keep the event API's old order
    params = [max_new, temperature, top_p, top_k, rep, seed, min_p, presence, frequency, stop_seq]
    defaults = tuple(c.value for c in params)
    switch = StopSwitch(state)

    def model_name() -> str:
        return models.current.name if models.current else ""

    def fresh(system_prompt: str, p: tuple) -> dict:
        return ch.new_conversation(model_name(), system_prompt or "", settings_dict(p))

    async def reply(conv: dict, node_id: str, system_prompt: str, p: tuple, request):
        """Stream into node `node_id`: yields (stats html, failure) as it grows."""
        conv["system"], conv["settings"] = system_prompt or "", settings_dict(p)
        if models.current:
            conv["model"] = models.current.name
        stop_event = switch.new(request)
        try:  # aclosing: a cancelled event closes the reply stream (and aborts the request) at once, not at GC
            async with contextlib.aclosing(stream_into(conv, node_id, system_prompt, p, models, stop_event)) as it:
                async for stats_value, failure in it:
                    yield stats_value, failure
        finally:
            switch.done(request, stop_event)

    async def respond(message, conv, system_prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                      seed, min_p, presence_penalty, frequency_penalty, stop_sequences, request: gr.Request):
        p = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, min_p, presence_penalty,
             frequency_penalty, stop_sequences)
        message = message or EMPTY_INPUT
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        if not text and not files:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        conv = conv or fresh(system_prompt, p)
        # the attachments are checked first (decoding is work: off the event loop); a refused image is taken off the
        # message, which comes back to the box with the rest, and the chat is left as it was
        loaded = models.current
        kept, refused = await asyncio.to_thread(check_attachments, loaded, ch.path(conv), files)
        if refused:
            message_text = refusal_message(loaded, refused, kept, text)
            log.info("chat: images refused before sending: %s", "; ".join(f"{n}: {r}" for n, r in refused))
            yield to_display(conv), conv, {"text": text, "files": kept}, error_stats(message_text)
            return
        urls, names = await asyncio.to_thread(keep_images, conv, files) if files else ([], [])
        user_id = ch.append(conv, "user", text, urls)
        conv["nodes"][user_id]["image_names"] = names
        node_id = ch.append(conv, "assistant", "")
        yield to_display(conv), conv, EMPTY_INPUT, gr.skip()
        async for stats_value, failure in reply(conv, node_id, system_prompt, p, request):
            if failure is not None and not conv["nodes"][node_id]["content"]:  # nothing generated: message back
                ch.delete(conv, user_id)
                keep = files
                if isinstance(failure, IMAGE_ERRORS):  # the engine refused an image the check let through
                    if files:  # ... this message's, most likely: without them, or every later send fails
                        keep = []
                        what = "the image was" if len(files) == 1 else f"the {len(files)} images were"
                        stats_value = error_stats(f"{friendly_error(failure)} ({what} taken off your message: "
                                                  "press Enter to send the text alone)")
                    else:
                        stats_value = error_stats(f"{friendly_error(failure)} (an image earlier in this chat: "
                                                  "New chat starts another)")
                yield to_display(conv), conv, {"text": text, "files": keep}, stats_value
                return
            yield to_display(conv), conv, gr.skip(), stats_value

    def drop_if_empty(conv: dict, node_id: str) -> None:
        if node_id in conv["nodes"] and not conv["nodes"][node_id]["content"]:
            ch.delete(conv, node_id)

    async def regenerate(conv, system_prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                         min_p, presence_penalty, frequency_penalty, stop_sequences, request: gr.Request):
        """The last user turn answered again: a new version of its reply (the earlier ones are kept)."""
        p = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, min_p, presence_penalty,
             frequency_penalty, stop_sequences)
        if not conv or not ch.path(conv):
            yield gr.skip(), gr.skip(), gr.skip()
            return
        for node in ch.path(conv):  # a reply left empty (a cancelled one) is no version worth keeping
            if node["role"] == "assistant":
                drop_if_empty(conv, node["id"])
        parent = ch.drop_trailing_assistant(conv)
        node_id = ch.add_child(conv, parent, "assistant", "")
        yield to_display(conv), conv, gr.skip()
        async for stats_value, failure in reply(conv, node_id, system_prompt, p, request):
            if failure is not None:
                drop_if_empty(conv, node_id)
            yield to_display(conv), conv, stats_value

    async def continue_reply(conv, system_prompt, *p_and_request):
        *p, request = p_and_request
        shown = ch.path(conv) if conv else []
        if not shown or shown[-1]["role"] != "assistant" or not shown[-1]["content"]:
            yield gr.skip(), gr.skip(), error_stats("Continue goes on with the last reply: there is none to go on with")
            return
        async for stats_value, _failure in reply(conv, shown[-1]["id"], system_prompt, tuple(p), request):
            yield to_display(conv), conv, stats_value

    def persist(conv, store, query):
        """The chat on screen into the browser's store (and its settings as the model's preset); the list follows."""
        if not conv or not ch.path(conv):  # nothing said yet: nothing to keep
            return gr.skip(), gr.skip(), gr.skip()
        store = ch.save(store, conv)
        if conv.get("model"):
            store["presets"][conv["model"]] = conv.get("settings") or {}
        choices = ch.search(store, query)
        value = conv["id"] if any(i == conv["id"] for _, i in choices) else None
        return store, gr.update(choices=choices, value=value), conv.get("title") or ""

    persist_io = dict(fn=persist, inputs=[conv_state, store, search], outputs=[store, chat_list, title_box],
                      api_visibility="private", queue=False)

    form = [textbox, conv_state, system, *params]
    submit = textbox.submit(respond, inputs=form, outputs=[chatbot, conv_state, textbox, stats], api_name="chat",
                            concurrency_limit=None, show_progress="hidden")
    submit.then(**persist_io)
    # Regenerate while a reply streams cancels it (which aborts it; its partial text stays as a version)
    regen = regen_btn.click(regenerate, inputs=[conv_state, system, *params], outputs=[chatbot, conv_state, stats],
                            api_name="regenerate", concurrency_limit=None, show_progress="hidden", cancels=[submit])
    regen.then(**persist_io)
    cont = continue_btn.click(continue_reply, inputs=[conv_state, system, *params],
                              outputs=[chatbot, conv_state, stats], api_name="continue_chat", concurrency_limit=None,
                              show_progress="hidden")
    cont.then(**persist_io)

    def stop(request: gr.Request):
        switch.stop(request)

    # opening another chat (or importing one, deleting this one, New chat) ends a reply still streaming into this one
    running: list = [submit, regen, cont]

    # Stop lets the reply end itself (it keeps the partial text and says "stopped"); New chat cancels outright.
    stop_btn.click(stop, api_name="stop_chat", queue=False)

    # ---- one message: select, switch versions / branches, edit, delete -----------------------------------------
    def on_select(conv, evt: gr.SelectData):
        shown = ch.path(conv) if conv else []
        index = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        if not isinstance(index, int) or not 0 <= index < len(shown):
            return None, NO_SELECTION, ""
        node = shown[index]
        return node["id"], selection_html(conv, node["id"]), node["content"]

    chatbot.select(on_select, inputs=conv_state, outputs=[selected, msg_info, edit_box], api_visibility="private",
                   queue=False)

    def step(conv, node_id, by: int):
        if not conv or not node_id or node_id not in conv["nodes"]:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        shown_id = ch.switch(conv, node_id, by)
        ch.touch(conv)
        return conv, to_display(conv), shown_id, selection_html(conv, shown_id), conv["nodes"][shown_id]["content"]

    step_outputs = [conv_state, chatbot, selected, msg_info, edit_box]
    prev_btn.click(lambda c, n: step(c, n, -1), inputs=[conv_state, selected], outputs=step_outputs,
                   api_visibility="private", queue=False).then(**persist_io)
    next_btn.click(lambda c, n: step(c, n, +1), inputs=[conv_state, selected], outputs=step_outputs,
                   api_visibility="private", queue=False).then(**persist_io)

    async def save_edit(conv, node_id, text, system_prompt, *p_and_request):
        *p, request = p_and_request
        if not conv or not node_id or node_id not in conv["nodes"]:
            yield (gr.skip(),) * 6
            return
        node = conv["nodes"][node_id]
        if node["role"] == "assistant":
            ch.edit_in_place(conv, node_id, text or "")
            yield conv, to_display(conv), gr.skip(), node_id, selection_html(conv, node_id), gr.skip()
            return
        new_id = ch.edit_branch(conv, node_id, (text or "").strip())
        conv["nodes"][new_id]["image_names"] = node.get("image_names") or []
        reply_id = ch.append(conv, "assistant", "")
        yield conv, to_display(conv), gr.skip(), new_id, selection_html(conv, new_id), gr.skip()
        async for stats_value, _failure in reply(conv, reply_id, system_prompt, tuple(p), request):
            yield conv, to_display(conv), stats_value, new_id, selection_html(conv, new_id), gr.skip()

    edit = save_btn.click(save_edit, inputs=[conv_state, selected, edit_box, system, *params],
                          outputs=[conv_state, chatbot, stats, selected, msg_info, edit_box], api_visibility="private",
                          concurrency_limit=None, show_progress="hidden")
    edit.then(**persist_io)
    running.append(edit)

    def delete_message(conv, node_id):
        if not conv or not node_id or node_id not in conv["nodes"]:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        ch.delete(conv, node_id)
        return conv, to_display(conv), None, NO_SELECTION, ""

    delete_msg_btn.click(delete_message, inputs=[conv_state, selected], outputs=step_outputs,
                         api_visibility="private", queue=False).then(**persist_io)

    # ---- the sidebar: new, open, search, rename, delete, export, import ----------------------------------------
    def open_values(conv: dict | None, note_html: str = EMPTY_STATS):
        settings = settings_values((conv or {}).get("settings") or {}, defaults) if conv else [gr.skip()] * len(params)
        return (conv, to_display(conv), (conv or {}).get("system", "") if conv else gr.skip(), *settings, note_html,
                (conv or {}).get("title", ""), None, NO_SELECTION, "")

    open_outputs = [conv_state, chatbot, system, *params, stats, title_box, selected, msg_info, edit_box]

    def open_chat(conv_id, store):
        conv = (store or ch.empty_store())["chats"].get(conv_id)
        if conv is None:
            return (gr.skip(),) * len(open_outputs)
        loaded = model_name()
        note = EMPTY_STATS
        if conv.get("model") and loaded and conv["model"] != loaded:
            note = (f'<div class="chat-stats" id="chat-stats">This chat was with {html.escape(conv["model"])}; '
                    f"{html.escape(loaded)} answers from here on.</div>")
        return open_values(conv, note)

    chat_list.input(open_chat, inputs=[chat_list, store], outputs=open_outputs, api_visibility="private", queue=False,
                    cancels=running)

    def new_chat():
        return [], None, EMPTY_STATS, EMPTY_INPUT

    # New chat empties the input box too (text and attachments), so nothing of the old conversation is sent again;
    # the old chat stays saved. The event API's name is the old one (the button was Clear).
    new_btn.click(new_chat, outputs=[chatbot, conv_state, stats, textbox], api_name="clear_chat", queue=False,
                  cancels=running).then(
        lambda store, query: (gr.update(choices=ch.search(store, query), value=None), "", None, NO_SELECTION, ""),
        inputs=[store, search], outputs=[chat_list, title_box, selected, msg_info, edit_box],
        api_visibility="private", queue=False)

    search.change(lambda store, query, conv: gr.update(
        choices=ch.search(store, query),
        value=conv["id"] if conv and any(i == conv["id"] for _, i in ch.search(store, query)) else None),
        inputs=[store, search, conv_state], outputs=chat_list, api_visibility="private", queue=False)

    def rename(title, conv):
        if not conv or not (title or "").strip():
            return gr.skip()
        conv["title"] = title.strip()
        return conv

    rename_btn.click(rename, inputs=[title_box, conv_state], outputs=conv_state, api_visibility="private",
                     queue=False).then(**persist_io)
    title_box.submit(rename, inputs=[title_box, conv_state], outputs=conv_state, api_visibility="private",
                     queue=False).then(**persist_io)

    def delete_chat(conv, store, query):
        if conv:
            store = ch.remove(store, conv["id"])
        return store, gr.update(choices=ch.search(store, query), value=None), None, [], "", EMPTY_STATS

    delete_chat_btn.click(delete_chat, inputs=[conv_state, store, search],
                          outputs=[store, chat_list, conv_state, chatbot, title_box, stats], api_visibility="private",
                          queue=False, cancels=running)

    def export(conv):
        if not conv or not ch.path(conv):
            return None, error_stats("Nothing to export: the chat is empty")
        folder = Path(tempfile.mkdtemp(prefix="chat-export-"))
        stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in (conv.get("title") or "chat"))[:40] or "chat"
        md, js = folder / f"{stem}.md", folder / f"{stem}.json"
        md.write_text(ch.export_markdown(conv), encoding="utf-8")
        js.write_text(ch.export_json(conv), encoding="utf-8")
        n = len(ch.path(conv))
        done = (f'<div class="chat-stats" id="chat-stats">Exported “{html.escape(conv.get("title") or "chat")}”: '
                f"{n} message{'s' if n != 1 else ''} as Markdown and JSON (download them on the left)</div>")
        return gr.update(value=[str(md), str(js)], visible=True), done

    export_btn.click(export, inputs=conv_state, outputs=[export_files, stats], api_visibility="private")

    def import_chat(file, store, query):
        path = file if isinstance(file, str) else getattr(file, "name", None) or (file or {}).get("path")
        try:
            conv = ch.import_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            skips = [gr.skip()] * (2 + len(open_outputs))
            skips[open_outputs.index(stats) + 2] = error_stats(f"Could not import: {e}")
            return tuple(skips)
        if not conv.get("title"):
            conv["title"] = "Imported chat"
        store = ch.save(store, conv)
        return (store, gr.update(choices=ch.search(store, query), value=conv["id"]), *open_values(conv))

    import_btn.upload(import_chat, inputs=[import_btn, store, search], outputs=[store, chat_list, *open_outputs],
                      api_visibility="private", cancels=running)

    # ---- on page load / tab select: the note, the empty chat's text, the saved list, the model's preset --------
    preset_for = gr.State(None)  # the model whose preset this page applied (once: later changes stay the user's)

    def refresh(store, query, conv, applied):
        loaded = models.current
        placeholder = gr.update(placeholder=PLACEHOLDER_LOADED if loaded else PLACEHOLDER_EMPTY)
        choices = ch.search(store, query)
        value = conv["id"] if conv and any(i == conv["id"] for _, i in choices) else None
        fresh_model = loaded is not None and loaded.name != applied and not conv
        preset = (store or {}).get("presets", {}).get(loaded.name) if fresh_model else None
        settings = settings_values(preset, defaults) if preset else [gr.skip()] * len(params)
        return (chat_note_html(loaded), placeholder, gr.update(choices=choices, value=value), *settings,
                loaded.name if preset else gr.skip())

    refresh_outputs = [note, chatbot, chat_list, *params, preset_for]
    return ChatTab(chatbot, textbox, stats, note, (refresh, [store, search, conv_state, preset_for]), refresh_outputs)
