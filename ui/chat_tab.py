"""Chat tab: streaming chat with the loaded model, with Stop, Regenerate, Clear, a system prompt, generation
parameters, and tokens/s per reply.

Each browser tab keeps its own history in a gr.State; replies stream from `Pipeline.generate`, an asyncio stream,
so many tabs chat at once and the engine batches them (no lock here). Stop cancels the event, which closes the
stream, which aborts the request in the engine."""

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

from engine import ImageInputError
from engine.config import GenerationConfig
from engine.manager import ModelSlot
from ui.common import friendly_error, log_failure
from ui.state import StudioState

log = logging.getLogger("ui.chat")

STREAM_EVERY_S = 0.05  # UI updates at most this often while a reply streams (the engine may be much faster)
EMPTY_INPUT = {"text": "", "files": []}


@dataclass
class ChatTab:
    chatbot: gr.Chatbot
    textbox: gr.MultimodalTextbox
    stats: gr.HTML


def to_display(history: list[dict]) -> list[dict]:
    """Our history (role, content, images) -> gr.Chatbot messages."""
    out = []
    for m in history:
        images = m.get("images") or []
        content = [{"path": p} for p in images] + ([m["content"]] if m["content"] else [])
        out.append({"role": m["role"], "content": content if images else m["content"]})
    return out


def _image_part(path: str) -> dict:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def to_engine_messages(system: str, history: list[dict]) -> list[dict]:
    """OpenAI-style messages; images become image_url parts (a text-only model refuses them with a clear error)."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in history:
        if m.get("images"):
            parts = [_image_part(p) for p in m["images"]] + [{"type": "text", "text": m["content"]}]
            messages.append({"role": m["role"], "content": parts})
        else:
            messages.append({"role": m["role"], "content": m["content"]})
    return messages


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
               finish_reason: str | None, model: str) -> str:
    decode_s = t_end - t_first if t_first is not None else 0.0
    tps = (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else None
    ttft = f"{t_first - t_start:.2f} s" if t_first is not None else "n/a"
    reason = {"stop": "end of turn", "length": "max new tokens reached", "abort": "stopped",
              "error": "error"}.get(finish_reason or "", finish_reason or "streaming")
    parts = [f"<b>{n_prompt}</b> prompt tokens", f"<b>{n_gen}</b> generated",
             f"<b>{tps:.1f}</b> tok/s" if tps else "tok/s n/a", f"first token {ttft}",
             f"total {t_end - t_start:.2f} s", html.escape(reason), html.escape(model)]
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
    try:
        pipe = models.pipeline()
        loaded = models.current
        config = gen_config(*params)
        messages = to_engine_messages(system, history)
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
                    n_prompt, n_gen, t_start, t_first, time.perf_counter(), "abort", loaded.name), None
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
                                              loaded.name), None
    except Exception as e:  # noqa: BLE001 - prompt too long, images to a text model, engine stopped ...
        log_failure(log, "chat request", e)
        message = friendly_error(e)
        if isinstance(e, ImageInputError):
            message += " (the image was taken off your message: press Enter to send the text alone)"
        yield out_history if reply["content"] else history, _error_stats(message), e
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
            chatbot = gr.Chatbot(
                label="Chat", show_label=False, height=460, elem_id="chatbot", buttons=["copy", "copy_all"],
                placeholder="<b>Say hello to the model named in the header.</b><br>Each browser tab keeps its own "
                            "conversation. (No model yet? Load one in the Model tab.)",
            )
            textbox = gr.MultimodalTextbox(
                placeholder="Message the model (Enter sends, Shift+Enter adds a line). Attach images for a "
                            "vision-language model.",
                file_types=["image"], file_count="multiple", show_label=False, autofocus=True,
                elem_id="chat-input", sources=["upload"],
            )
            with gr.Row():
                stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="chat-stop")
                regen_btn = gr.Button("Regenerate", size="sm", elem_id="chat-regenerate")
                clear_btn = gr.Button("Clear", size="sm", elem_id="chat-clear")
            stats = gr.HTML('<div class="chat-stats" id="chat-stats">&nbsp;</div>', elem_id="chat-stats-box")
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
        hist = list(hist or []) + [{"role": "user", "content": text, "images": files}]
        yield to_display(hist), hist, EMPTY_INPUT, gr.skip()
        stop_event = switch.new(request)
        try:  # aclosing: a cancelled event closes the reply stream (and aborts the request) at once, not at GC
            async with contextlib.aclosing(stream_reply(state, hist, system_prompt, p, stop_event, models)) as replies:
                async for new_hist, stats_value, failure in replies:
                    if failure is not None and new_hist is hist:  # nothing generated: give the message back
                        hist = hist[:-1]
                        # ... without the images when the model refused them, or they would fail every later send
                        keep = [] if isinstance(failure, ImageInputError) else files
                        yield to_display(hist), hist, {"text": text, "files": keep}, stats_value
                        return
                    yield to_display(new_hist), new_hist, gr.skip(), stats_value
        finally:
            switch.done(request, stop_event)

    async def regenerate(hist, system_prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                         request: gr.Request):
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
    regen = regen_btn.click(regenerate, inputs=[history, system, *params], outputs=[chatbot, history, stats],
                            api_name="regenerate", concurrency_limit=None, show_progress="hidden")

    def stop(request: gr.Request):
        switch.stop(request)

    # Stop lets the reply end itself (it keeps the partial text and says "stopped"); Clear cancels outright.
    stop_btn.click(stop, api_name="stop_chat", queue=False)
    # Clear empties the input box too (text and attachments), so nothing of the old conversation is sent again
    clear_btn.click(lambda: ([], [], '<div class="chat-stats" id="chat-stats">&nbsp;</div>', EMPTY_INPUT),
                    outputs=[chatbot, history, stats, textbox], api_name="clear_chat", queue=False,
                    cancels=[submit, regen])
    return ChatTab(chatbot, textbox, stats)
