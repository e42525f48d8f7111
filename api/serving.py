"""From a validated OpenAI request to engine requests and back: generation settings, prompt token ids, one engine
request per choice, the merged stream of their outputs, and OpenAI's two logprobs shapes.

Every choice is its own engine request. `stream_choices` drives them concurrently and yields their deltas as they
come; closing it (the client went away, or the response finished) cancels the drivers, which closes each
`Pipeline.generate` stream, which aborts its request in the engine and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from api.schemas import ChatTokenLogprob, CompletionLogprobs, SamplingRequest, TopLogprob
from engine import GenerationConfig
from engine.inputs import RequestInput
from engine.llm_engine import RequestOutput

SEED_MASK = 2**63 - 1  # the sampler hashes int64 seeds
DISCONNECT_POLL_S = 0.5  # how often a request checks that its client is still there


@dataclass
class Job:
    """One choice: one engine request."""

    index: int  # the choice index in the response
    prompt_index: int
    input_ids: list[int] | RequestInput  # a RequestInput (images prepared once) is shared by every choice
    gen_config: GenerationConfig
    request_id: str
    prompt: str | list[dict] | None = None  # given instead of input_ids only when the prompt holds images
    group: str | None = None  # the API request it belongs to: the engine shares the batch fairly between them


@dataclass
class ChoiceResult:
    """A choice's outputs, accumulated."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_generated_tokens = out.num_generated_tokens
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error


def generation_config(req: SamplingRequest, max_new_tokens: int, choice: int, logprobs: int | None) -> GenerationConfig:
    """OpenAI semantics: temperature defaults to 1.0 (sampling), 0 means greedy; choice i of a seeded request uses
    seed + i, so n > 1 gives n different, each reproducible, answers. Raises ValueError on inconsistent values."""
    temperature = 1.0 if req.temperature is None else req.temperature
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    seed = None if req.seed is None else (req.seed + choice) & SEED_MASK
    min_tokens = req.min_tokens or 0
    if min_tokens > max_new_tokens:
        raise ValueError(f"min_tokens ({min_tokens}) must be at most max_tokens ({max_new_tokens})")
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_tokens,
        do_sample=temperature > 0,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0),
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=seed,
        stop_words=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=bool(req.ignore_eos),
        skip_special_tokens=req.skip_special_tokens is not False,
        logprobs=logprobs,
    )


class ClientDisconnected(Exception):
    pass


class ModelUnloaded(Exception):
    pass


class ServerStopping(Exception):
    """The server is shutting down: running requests end now, with an error the client can see."""


async def stream_choices(pipe, jobs: list[Job], is_disconnected: Callable[[], Awaitable[bool]] | None = None,
                         is_current: Callable[[], bool] | None = None, poll_s: float = DISCONNECT_POLL_S,
                         is_stopping: Callable[[], bool] | None = None) -> AsyncIterator[tuple[Job, RequestOutput]]:
    """Run every job as an engine request; yield (job, delta) in arrival order until all have finished.

    An exception from the engine (e.g. it shut down) is raised here. `is_disconnected` is asked at least every
    `poll_s` seconds, also while nothing arrives (a request still queued, a long prefill); when it says True,
    ClientDisconnected is raised. Closing the iterator, or that, aborts every request still running.
    `is_current` (is `pipe` still the loaded model?) is asked when nothing arrived for `poll_s`: a request the
    engine dropped while shutting down for a model swap then ends with ModelUnloaded instead of waiting forever.
    `is_stopping` (is the server shutting down?) is asked at least every `poll_s`: then ServerStopping is raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def drive(job: Job) -> None:
        try:
            stream = pipe.generate(job.prompt, job.gen_config, request_id=job.request_id,
                                   input_ids=None if job.prompt is not None else job.input_ids, group=job.group)
            async for out in stream:
                queue.put_nowait((job, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((job, e))

    tasks = [asyncio.create_task(drive(job)) for job in jobs]
    loop = asyncio.get_running_loop()
    last_check = loop.time()
    try:
        remaining = len(jobs)
        while remaining:
            try:
                job, out = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), poll_s)
            except asyncio.TimeoutError:
                job = out = None
            if out is None or loop.time() - last_check >= poll_s:
                last_check = loop.time()
                if is_stopping is not None and is_stopping():
                    raise ServerStopping()
                if is_disconnected is not None and await is_disconnected():
                    raise ClientDisconnected()
            if out is None:
                if is_current is not None and queue.empty() and not is_current():
                    raise ModelUnloaded()
                continue
            if isinstance(out, Exception):
                raise out
            remaining -= out.finished
            yield job, out
    finally:
        for task in tasks:  # synchronous: each driver's generate() aborts its request as it unwinds
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:  # noqa: BLE001 - we are being cancelled ourselves; the drivers still unwind
            pass


def prompt_chars(prompt) -> int:
    """The characters of a prompt's text (a string, or messages' string / text-part contents)."""
    if isinstance(prompt, str):
        return len(prompt)
    total = 0
    for message in prompt or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return total


# ---- logprobs -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in character -> its byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """A token id -> (its text, its exact UTF-8 bytes), for byte-level BPE and sentencepiece vocabularies."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.is_byte_level = backend is not None and "ByteLevel" in str(getattr(backend, "decoder", ""))
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._max_token_chars: int | None = None

    @property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: the longest vocabulary entry. A piece is never shorter
        than the text it decodes to (byte-level pieces are a character per byte, "\u2581" a space, "<0x41>" one
        byte), so a text of C characters has at least C / max_token_chars tokens."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab()
            self._max_token_chars = max([len(piece) for piece in vocab] or [1]) or 1
        return self._max_token_chars

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def _lookup(self, token_id: int) -> tuple[str, bytes]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return "", b""
        if token_id in self.special_ids:
            data = piece.encode()
        elif (m := _BYTE_PIECE.fullmatch(piece)) is not None:
            data = bytes([int(m.group(1), 16)])
        elif self.is_byte_level and all(c in _byte_decoder() for c in piece):
            data = bytes(_byte_decoder()[c] for c in piece)
        else:
            data = piece.replace("\u2581", " ").encode()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # part of a multi-byte character: OpenAI writes these as escaped bytes
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        return text, data


def chat_logprobs(entries: list[dict], texts: TokenTexts) -> list[ChatTokenLogprob]:
    out = []
    for entry in entries:
        text, data = texts(entry["token_id"])
        top = []
        for token_id, logprob in entry.get("top", []):
            top_text, top_data = texts(token_id)
            top.append(TopLogprob(token=top_text, logprob=logprob, bytes=list(top_data)))
        out.append(ChatTokenLogprob(token=text, logprob=entry["logprob"], bytes=list(data), top_logprobs=top))
    return out


def completion_logprobs(entries: list[dict], texts: TokenTexts, offset: int,
                        zero_width: frozenset[int] = frozenset()) -> CompletionLogprobs:
    """Completions' column shape; `offset` is the character offset of the first token in the choice's text.
    Each top_logprobs dict holds the chosen token too, as vLLM does (so logprobs=0 still names it)."""
    result = CompletionLogprobs()
    for entry in entries:
        text = texts(entry["token_id"])[0]
        result.tokens.append(text)
        result.token_logprobs.append(entry["logprob"])
        result.text_offset.append(offset)
        if entry["token_id"] not in zero_width:  # an echoed prompt's special tokens (BOS) are not in its text
            offset += len(text)
        if entry["logprob"] is None:  # an echoed prompt's first token: nothing before it to predict it from
            result.top_logprobs.append(None)
            continue
        top = {texts(token_id)[0]: logprob for token_id, logprob in entry.get("top", [])}
        top.setdefault(text, entry["logprob"])
        result.top_logprobs.append(top)
    return result


def merge_logprobs(a: CompletionLogprobs | None, b: CompletionLogprobs | None) -> CompletionLogprobs | None:
    """An echoed prompt's logprobs followed by the completion's (each with its own text offsets)."""
    if a is None or b is None:
        return a or b
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)

