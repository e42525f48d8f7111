"""Chat tab: streaming chat with the loaded model, with Stop, Regenerate, Clear, a system prompt, generation
parameters, and tokens/s per reply; image chat with a vision-language model (LLaVA).

Each browser tab keeps its own history in a gr.State; replies stream from `Pipeline.generate`, an asyncio stream,
so many tabs chat at once and the engine batches them (no lock here). Stop cancels the event, which closes the
stream, which aborts the request in the engine.

Images: attached (upload, paste or drop) in the message box, shown as thumbnails in the history, and kept there:
every turn sends the whole chat with its images as image_url data URLs (the engine's encoder cache keeps encoded
images, so earlier ones are not encoded again). New attachments are checked before anything is sent, under the
engine's own media policy (readable, size, pixels, images per prompt); a refused one is taken off the message with a
sentence naming it, the rest of the message (and the whole history) stays. A text-only model refuses new images,
and skips (with a note) the images already in a chat it takes over."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import logging
import mimetypes
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from engine.config import GenerationConfig
from engine.errors import ImageInputError, InvalidImageError
from engine.media import IMAGE_MIME_TYPES, load_image
from studio.manager import LoadedModel, ModelSlot
from ui.common import (
    fmt_bytes,
    friendly_error,
    image_limit,
    image_tokens_text,
    log_failure,
    takes_images,
    tower_name,
    vision_spec,
)
from ui.state import StudioState

log = logging.getLogger("ui.chat")

STREAM_EVERY_S = 0.05  # UI updates at most this often while a reply streams (the engine may be much faster)
EMPTY_INPUT = {"text": "", "files": []}
EMPTY_STATS = '<div class="chat-stats" id="chat-stats">&nbsp;</div>'
IMAGE_ERRORS = (ImageInputError, InvalidImageError)
# what the first bytes of a file say it is: the data URL's type comes from the content, not the file's name
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


@dataclass
class ChatTab:
    chatbot: gr.Chatbot
    textbox: gr.MultimodalTextbox
    stats: gr.HTML
    note: gr.HTML
    refresh_note: object  # () -> the note's html for the model loaded now (the Chat tab's select / page load)


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


def to_display(history: list[dict]) -> list[dict]:
    """Our history (role, content, images) -> gr.Chatbot messages."""
    out = []
    for m in history:
        images = m.get("images") or []
        content = [{"path": p} for p in images] + ([m["content"]] if m["content"] else [])
        out.append({"role": m["role"], "content": content if images else m["content"]})
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


def _image_part(path: str) -> dict:
    return {"type": "image_url", "image_url": {"url": image_url(path)}}


def to_engine_messages(system: str, history: list[dict], images: bool = True) -> list[dict]:
    """OpenAI-style messages; images become image_url parts (a text-only model refuses them with a clear error).
    images=False leaves every image out (a text-only model continuing a chat that holds some)."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in history:
        if m.get("images") and images:
            parts = [_image_part(p) for p in m["images"]] + [{"type": "text", "text": m["content"]}]
            messages.append({"role": m["role"], "content": parts})
        else:
            messages.append({"role": m["role"], "content": m["content"]})
    return messages


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


def gen_config(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) -> GenerationConfig:
    temperature = float(temperature)
    return GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=temperature > 0,
        temperature=temperature,
        top_p=float(top_p),
        top_k=int(top_k),
        repetition_penalty=float(repetition_penalty),
        seed=int(seed) if seed not in (None, "") and int(seed) >= 0 else None,
    )


def stats_html(n_prompt: int, n_gen: int, t_start: float, t_first: float | None, t_end: float,
               finish_reason: str | None, model: str, note: str = "") -> str:
    decode_s = t_end - t_first if t_first is not None else 0.0
    tps = (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else None
    ttft = f"{t_first - t_start:.2f} s" if t_first is not None else "n/a"
    reason = {"stop": "end of turn", "length": "max new tokens reached", "abort": "stopped",
              "error": "error"}.get(finish_reason or "", finish_reason or "streaming")
    parts = [f"<b>{n_prompt}</b> prompt tokens", f"<b>{n_gen}</b> generated",
             f"<b>{tps:.1f}</b> tok/s" if tps else "tok/s n/a", f"first token {ttft}",
             f"total {t_end - t_start:.2f} s", html.escape(reason), html.escape(model)]
    if note:
        parts.append(f'<span class="chat-stats-note">{html.escape(note)}</span>')
    return f'<div class="chat-stats" id="chat-stats">{" · ".join(parts)}</div>'


def _error_stats(message: str) -> str:
    return f'<div class="chat-stats chat-error" id="chat-stats">⚠ {html.escape(message)}</div>'


async def _next_or_stop(stream, stop: asyncio.Event):
    """The stream's next output, or None once `stop` is set. The read runs in its own task; whenever this returns
    or raises (a cancelled Gradio event included) without its result, that task is cancelled and awaited, so the
    stream is left closed (its cleanup aborts the engine request), never running on its own."""
    if stop.is_set():
        return None
    read = asyncio.ensure_future(anext(stream))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        read.cancel()
        await asyncio.wait({read})
        raise
    finally:
        stopped.cancel()
    if read in done:
        return read.result()  # StopAsyncIteration propagates
    read.cancel()
    await asyncio.wait({read})
    return None


async def stream_reply(state: StudioState, history: list[dict], system: str, params: tuple,
                       stop: asyncio.Event | None = None, models: ModelSlot | None = None):
    """Yield (history, stats html, failure) as the assistant's reply to `history` streams in; failure is None, or
    the exception that ended it. The reply message is appended to a copy of history; on failure the last yield
    carries history without the reply (when nothing was generated) and an error. Setting `stop` ends the reply
    where it is (the engine request is aborted) and keeps what was generated."""
    models = models or state.manager.main  # the slot this chat serves from (the API's too)
    note = ""
    try:
        pipe = models.pipeline()
        loaded = models.current
        config = gen_config(*params)
        send_images = takes_images(loaded)
        # the files' bytes read off the event loop; pipe.generate then builds the request once, on the image workers
        messages = await asyncio.to_thread(to_engine_messages, system, history, send_images)
        if not send_images and count_images(history):  # a chat with images, continued on a text-only model
            n = count_images(history)
            note = (f"{n} image{'s' if n != 1 else ''} of this chat not sent: {loaded.name} takes no images")
    except Exception as e:  # noqa: BLE001
        log_failure(log, "chat request", e)
        yield history, _error_stats(friendly_error(e)), e
        return
    stop = stop or asyncio.Event()
    reply = {"role": "assistant", "content": ""}
    out_history = history + [reply]
    t_start = time.perf_counter()
    t_first = None
    last_yield = 0.0
    n_prompt = n_gen = 0
    finish_reason = None
    stream = pipe.generate(messages, config)
    try:
        while True:
            try:
                out = await _next_or_stop(stream, stop)
            except StopAsyncIteration:
                return
            if out is None:  # Stop: keep the partial reply, say so
                await stream.aclose()  # aborts the engine request
                yield out_history if reply["content"] else history, stats_html(
                    n_prompt, n_gen, t_start, t_first, time.perf_counter(), "abort", loaded.name, note), None
                return
            if out.token_ids and t_first is None:
                t_first = time.perf_counter()
            reply["content"] += out.text
            n_prompt, n_gen, finish_reason = out.num_prompt_tokens, out.num_generated_tokens, out.finish_reason
            if out.error:
                log.error("chat generation failed: %s", out.error)
                yield out_history if reply["content"] else history, _error_stats(f"generation failed: {out.error}"), \
                    RuntimeError(str(out.error))
                return
            now = time.perf_counter()
            if out.finished:
                log.info("chat reply from %s: %d prompt + %d generated tokens in %.2f s (%s)", loaded.name, n_prompt,
                         n_gen, now - t_start, finish_reason)
            if out.finished or now - last_yield >= STREAM_EVERY_S:
                last_yield = now
                yield out_history, stats_html(n_prompt, n_gen, t_start, t_first, now, finish_reason,
                                              loaded.name, note), None
    except Exception as e:  # noqa: BLE001 - prompt too long, a refused image, engine stopped ...
        log_failure(log, "chat request", e)
        yield out_history if reply["content"] else history, _error_stats(friendly_error(e)), e
    finally:
        await stream.aclose()


class StopSwitch:
    """Per browser session stop events, so Stop ends that tab's replies and no other tab's. An event is set through
    its own loop (call_soon_threadsafe): Gradio may run the Stop handler on another thread or loop."""

    def __init__(self, state: StudioState):
        self.events, self.lock = state.chat_stop_events, state.lock

    def new(self, request: gr.Request | None) -> asyncio.Event:
        event = asyncio.Event()
        with self.lock:
            self.events.setdefault(_session(request), {})[event] = asyncio.get_running_loop()
        return event

    def done(self, request: gr.Request | None, event: asyncio.Event) -> None:
        with self.lock:
            events = self.events.get(_session(request))
            if events is not None:
                events.pop(event, None)
                if not events:
                    self.events.pop(_session(request), None)

    def stop(self, request: gr.Request | None) -> int:
        with self.lock:
            events = list(self.events.get(_session(request), {}).items())
        for event, loop in events:
            loop.call_soon_threadsafe(event.set)
        return len(events)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def build_chat_tab(state: StudioState, models: ModelSlot | None = None) -> ChatTab:
    """`models`: the model slot the chat serves from (default: the manager's main slot, the one the API serves)."""
    models = models or state.manager.main
    history = gr.State([])
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            note = gr.HTML(chat_note_html(models.current), elem_id="chat-note-box")
            chatbot = gr.Chatbot(
                label="Chat", show_label=False, height=460, elem_id="chatbot", buttons=["copy", "copy_all"],
                placeholder="<b>Say hello to the model named in the header.</b><br>Each browser tab keeps its own "
                            "conversation. (No model yet? Load one in the Model tab.)",
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
                clear_btn = gr.Button("Clear", size="sm", elem_id="chat-clear")
            stats = gr.HTML(EMPTY_STATS, elem_id="chat-stats-box")
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
    params = [max_new, temperature, top_p, top_k, rep, seed]

    switch = StopSwitch(state)

    async def respond(message, hist, system_prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                      seed, request: gr.Request):
        p = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        message = message or EMPTY_INPUT
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        if not text and not files:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        hist = list(hist or [])
        # the attachments are checked first (decoding is work: off the event loop); a refused image is taken off the
        # message, which comes back to the box with the rest, and the history is left as it was
        loaded = models.current
        kept, refused = await asyncio.to_thread(check_attachments, loaded, hist, files)
        if refused:
            message_text = refusal_message(loaded, refused, kept, text)
            log.info("chat: images refused before sending: %s", "; ".join(f"{n}: {r}" for n, r in refused))
            yield to_display(hist), hist, {"text": text, "files": kept}, _error_stats(message_text)
            return
        hist = hist + [{"role": "user", "content": text, "images": files}]
        yield to_display(hist), hist, EMPTY_INPUT, gr.skip()
        stop_event = switch.new(request)
        try:  # aclosing: a cancelled event closes the reply stream (and aborts the request) at once, not at GC
            async with contextlib.aclosing(stream_reply(state, hist, system_prompt, p, stop_event, models)) as replies:
                async for new_hist, stats_value, failure in replies:
                    if failure is not None and new_hist is hist:  # nothing generated: give the message back
                        hist = hist[:-1]
                        keep = files
                        if isinstance(failure, IMAGE_ERRORS):  # the engine refused an image the check let through
                            if files:  # ... this message's, most likely: without them, or every later send fails
                                keep = []
                                what = "the image was" if len(files) == 1 else f"the {len(files)} images were"
                                stats_value = _error_stats(f"{friendly_error(failure)} ({what} taken off your "
                                                           "message: press Enter to send the text alone)")
                            else:
                                stats_value = _error_stats(f"{friendly_error(failure)} (an image earlier in this "
                                                           "chat: Clear starts a new chat)")
                        yield to_display(hist), hist, {"text": text, "files": keep}, stats_value
                        return
                    yield to_display(new_hist), new_hist, gr.skip(), stats_value
        finally:
            switch.done(request, stop_event)

    async def regenerate(hist, system_prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                         request: gr.Request):
        """The last user turn (its images included) answered again: its old reply is dropped first."""
        p = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        hist = list(hist or [])
        while hist and hist[-1]["role"] == "assistant":
            hist.pop()
        if not hist:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        yield to_display(hist), hist, gr.skip()
        stop_event = switch.new(request)
        try:
            async with contextlib.aclosing(stream_reply(state, hist, system_prompt, p, stop_event, models)) as replies:
                async for new_hist, stats_value, _failure in replies:
                    yield to_display(new_hist), new_hist, stats_value
        finally:
            switch.done(request, stop_event)

    chat_inputs = [textbox, history, system, *params]
    submit = textbox.submit(respond, inputs=chat_inputs, outputs=[chatbot, history, textbox, stats], api_name="chat",
                            concurrency_limit=None, show_progress="hidden")
    # Regenerate while a reply streams replaces that reply (the running one is cancelled, which aborts it)
    regen = regen_btn.click(regenerate, inputs=[history, system, *params], outputs=[chatbot, history, stats],
                            api_name="regenerate", concurrency_limit=None, show_progress="hidden", cancels=[submit])

    def stop(request: gr.Request):
        switch.stop(request)

    # Stop lets the reply end itself (it keeps the partial text and says "stopped"); Clear cancels outright.
    stop_btn.click(stop, api_name="stop_chat", queue=False)
    # Clear empties the input box too (text and attachments), so nothing of the old conversation is sent again
    clear_btn.click(lambda: ([], [], EMPTY_STATS, EMPTY_INPUT),
                    outputs=[chatbot, history, stats, textbox], api_name="clear_chat", queue=False,
                    cancels=[submit, regen])
    return ChatTab(chatbot, textbox, stats, note, lambda: chat_note_html(models.current))
