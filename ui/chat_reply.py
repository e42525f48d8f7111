"""One assistant reply streamed into a conversation node (ui/chat_history.py): a new reply, a regenerated version,
or the continuation of a reply that stopped; plus the generation settings, the stats line and the per-tab Stop.

Replies stream from `Pipeline.generate`, an asyncio stream, so many tabs chat at once and the engine batches them.
Stop sets this tab's event: the stream is closed (the engine request is aborted) and the partial reply is kept."""

from __future__ import annotations

import asyncio
import html
import logging
import time

import gradio as gr

from engine.config import GenerationConfig
from studio.manager import ModelSlot
from ui import chat_history as ch
from ui.common import friendly_error, log_failure, takes_images
from ui.state import StudioState

log = logging.getLogger("ui.chat")

STREAM_EVERY_S = 0.05  # UI updates at most this often while a reply streams (the engine may be much faster)
FINISH_WORDS = {"stop": "end of turn", "length": "max new tokens reached", "abort": "stopped", "error": "error"}
# the chat's generation settings, in the order the events take them (after the system prompt)
PARAM_NAMES = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "min_p",
               "presence_penalty", "frequency_penalty", "stop")


def stop_strings(text) -> list[str]:
    """The Stop sequences field: one per line; \\n in a line stands for a newline."""
    if isinstance(text, list):
        return [s for s in text if s]
    return [line.replace("\\n", "\n") for line in (text or "").splitlines() if line.strip()]


def gen_config(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, min_p=0.0, presence_penalty=0.0,
               frequency_penalty=0.0, stop="") -> GenerationConfig:
    temperature = float(temperature)
    return GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=temperature > 0,
        temperature=temperature,
        top_p=float(top_p),
        top_k=int(top_k),
        min_p=float(min_p or 0.0),
        repetition_penalty=float(repetition_penalty),
        presence_penalty=float(presence_penalty or 0.0),
        frequency_penalty=float(frequency_penalty or 0.0),
        seed=int(seed) if seed not in (None, "") and int(seed) >= 0 else None,
        stop_words=stop_strings(stop),
    )


def settings_dict(params: tuple) -> dict:
    return dict(zip(PARAM_NAMES, params))


def reply_stats(n_prompt: int, n_gen: int, t_start: float, t_first: float | None, t_end: float,
                finish_reason: str | None) -> dict:
    decode_s = t_end - t_first if t_first is not None else 0.0
    return {"prompt": n_prompt, "generated": n_gen,
            "tps": round((n_gen - 1) / decode_s, 1) if n_gen > 1 and decode_s > 0 else None,
            "ttft": round(t_first - t_start, 3) if t_first is not None else None,
            "total": round(t_end - t_start, 3), "finish": finish_reason}


def stats_html(stats: dict, model: str, note: str = "") -> str:
    tps, ttft = stats.get("tps"), stats.get("ttft")
    reason = stats.get("finish")
    parts = [f"<b>{stats['prompt']}</b> prompt tokens", f"<b>{stats['generated']}</b> generated",
             f"<b>{tps:.1f}</b> tok/s" if tps else "tok/s n/a",
             f"first token {ttft:.2f} s" if ttft is not None else "first token n/a",
             f"total {stats['total']:.2f} s", html.escape(FINISH_WORDS.get(reason or "", reason or "streaming")),
             html.escape(model)]
    if note:
        parts.append(f'<span class="chat-stats-note">{html.escape(note)}</span>')
    return f'<div class="chat-stats" id="chat-stats">{" · ".join(parts)}</div>'


def error_stats(message: str) -> str:
    return f'<div class="chat-stats chat-error" id="chat-stats">⚠ {html.escape(message)}</div>'


def engine_messages(system: str, nodes: list[dict], images: bool = True) -> list[dict]:
    """OpenAI-style messages for the engine; images (data URLs) become image_url parts. images=False leaves every
    image out (a text-only model continuing a chat that holds some)."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in nodes:
        if m.get("images") and images:
            parts = [{"type": "image_url", "image_url": {"url": u}} for u in m["images"]]
            messages.append({"role": m["role"], "content": parts + [{"type": "text", "text": m["content"]}]})
        else:
            messages.append({"role": m["role"], "content": m["content"]})
    return messages


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


async def stream_into(conv: dict, node_id: str, system: str, params: tuple, models: ModelSlot,
                      stop: asyncio.Event | None = None):
    """Stream the reply for assistant node `node_id` of `conv` into its content, yielding (stats html, failure)
    as it grows; failure is None, or the exception that ended it. An empty node is a new reply to the messages
    before it; a node with text is continued from where it ended (no new user turn). Stats go in the node."""
    node = conv["nodes"][node_id]
    before = ch.path_to(conv, node_id)[:-1]
    note = ""
    try:
        pipe = models.pipeline()
        loaded = models.current
        config = gen_config(*params)
        send_images = takes_images(loaded)
        n_images = sum(len(m.get("images") or []) for m in before)
        if not send_images and n_images:  # a chat with images, continued on a text-only model
            plural = "s" if n_images != 1 else ""
            note = f"{n_images} image{plural} of this chat not sent: {loaded.name} takes no images"
        messages = engine_messages(system, before, images=send_images)
        if node["content"]:  # continue: the template up to the reply's start, then the reply so far
            if send_images and n_images:
                raise ValueError("Continue works on chats without images; Regenerate answers this turn again")
            text = pipe.apply_chat_template(messages) + node["content"]
            ids = pipe.tokenizer.encode(text, add_special_tokens=False)
            stream = pipe.generate(None, config, input_ids=ids)
        else:
            stream = pipe.generate(messages, config)
    except Exception as e:  # noqa: BLE001
        log_failure(log, "chat request", e)
        yield error_stats(friendly_error(e)), e
        return
    stop = stop or asyncio.Event()
    previous = node.get("stats") or {}
    t_start = time.perf_counter()
    t_first = None
    last_yield = 0.0
    n_prompt = n_gen = 0
    finish_reason = None

    def stats(now: float, reason: str | None) -> dict:
        s = reply_stats(n_prompt, n_gen, t_start, t_first, now, reason)
        if previous:  # a continued reply counts all its tokens
            s["generated"] += previous.get("generated", 0)
        return s

    try:
        while True:
            try:
                out = await _next_or_stop(stream, stop)
            except StopAsyncIteration:
                return
            if out is None:  # Stop: keep the partial reply, say so
                await stream.aclose()  # aborts the engine request
                node["stats"] = stats(time.perf_counter(), "abort")
                yield stats_html(node["stats"], loaded.name, note), None
                return
            if out.token_ids and t_first is None:
                t_first = time.perf_counter()
            node["content"] += out.text
            n_prompt, n_gen, finish_reason = out.num_prompt_tokens, out.num_generated_tokens, out.finish_reason
            if out.error:
                log.error("chat generation failed: %s", out.error)
                yield error_stats(f"generation failed: {out.error}"), RuntimeError(str(out.error))
                return
            now = time.perf_counter()
            if out.finished:
                node["stats"] = stats(now, finish_reason)
                log.info("chat reply from %s: %d prompt + %d generated tokens in %.2f s (%s)", loaded.name, n_prompt,
                         n_gen, now - t_start, finish_reason)
            if out.finished or now - last_yield >= STREAM_EVERY_S:
                last_yield = now
                yield stats_html(stats(now, finish_reason), loaded.name, note), None
    except Exception as e:  # noqa: BLE001 - prompt too long, a refused image, engine stopped ...
        log_failure(log, "chat request", e)
        yield error_stats(friendly_error(e)), e
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
