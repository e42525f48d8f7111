"""Sampled tokens -> what a request's consumer sees: stop tokens and stop strings, detokenization, the text / token /
logprob deltas since the previous update, and the callback that delivers them (as vLLM's output processor).

Runs on the engine thread; the engine calls `process_token` for each token put in place, `emit` to stream, and
`end_text` when a request ends, and keeps scheduling and bookkeeping to itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.sequence import PENDING, Sequence
from engine.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """One streaming update of one request: the new text and tokens since the previous update."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # stop | length | abort | error
    num_prompt_tokens: int
    num_generated_tokens: int
    num_cached_tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)
    error: str | None = None


@dataclass
class RequestState:
    """A request's output side: its detokenizer, its stop strings and how much of it was already sent."""

    request_id: str
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    callback: Callable[[RequestOutput], None]
    stop_words: list[str]
    sent_chars: int = 0
    sent_tokens: int = 0
    sent_logprobs: int = 0
    arrival_time: float = field(default_factory=time.monotonic)


def logprob_entry(info, row: int, token: int, k: int) -> dict:
    """The sampled token's logprob and the top k of row `row` of a step's logprob info (chosen, top_vals, top_ids)."""
    chosen, top_vals, top_ids = info
    entry = {"token_id": token, "logprob": float(chosen[row])}
    entry["top"] = [] if k == 0 else list(zip(top_ids[row, :k].tolist(), top_vals[row, :k].tolist()))
    return entry


def process_token(request: RequestState, token: int, length: int) -> str | None:
    """A sampled token is in place; `length` is the sequence's length up to and including it. Detokenizes it and
    returns the finish reason it causes ("stop" for a stop token or string, "length"), or None."""
    seq, gc = request.seq, request.seq.sampling.gen_config
    num_generated = length - seq.num_prompt_tokens
    finish_reason = None
    is_stop_token = token in seq.sampling.eos_token_ids or token in gc.stop_token_ids
    if is_stop_token and num_generated >= gc.min_new_tokens:
        finish_reason = "stop"
        request.detokenizer.flush()
    else:
        request.detokenizer.add([token])
        if request.stop_words:
            text = request.detokenizer.text
            window = max(len(s) for s in request.stop_words) + 8
            start = max(0, request.sent_chars - window)
            hits = [(text.find(s, start), s) for s in request.stop_words]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits and num_generated >= gc.min_new_tokens:
                cut = min(i for i, _ in hits)
                request.detokenizer.text = text[:cut]
                finish_reason = "stop"
    if finish_reason is None and (length >= seq.max_tokens or num_generated >= gc.max_new_tokens):
        finish_reason = "length"
    return finish_reason


def end_text(request: RequestState, reason: str) -> None:
    """A request ends: a character cut in half by a length limit or an abort is emitted as U+FFFD, not lost."""
    if reason == "length" or reason == "abort":
        request.detokenizer.flush()


def emit(request: RequestState, finished: bool, finish_reason: str | None = None, error: str | None = None) -> None:
    """Send what is new since the previous update (nothing when nothing is, unless the request finished). While
    it runs, text that could still become the start of a stop string is held back."""
    seq = request.seq
    text = request.detokenizer.text
    end = len(text)
    if not finished and request.stop_words:
        end = max(request.sent_chars, end - (max(len(s) for s in request.stop_words) - 1))
    delta_text = text[request.sent_chars : end]
    delta_ids = seq.token_ids[seq.num_prompt_tokens + request.sent_tokens :]
    while delta_ids and delta_ids[-1] == PENDING:
        delta_ids.pop()
    num_generated = request.sent_tokens + len(delta_ids)
    delta_logprobs = seq.logprobs[request.sent_logprobs :] if seq.logprobs else []
    if not (delta_text or delta_ids or finished):
        return
    request.sent_chars, request.sent_logprobs = end, len(seq.logprobs)
    request.sent_tokens = num_generated
    out = RequestOutput(request.request_id, delta_text, delta_ids, finished, finish_reason,
                        seq.num_prompt_tokens, num_generated, seq.num_cached_tokens,
                        delta_logprobs, error)
    try:
        request.callback(out)
    except Exception:  # noqa: BLE001 - a broken consumer must not stop the loop
        log.exception("request %s: output callback failed", request.request_id)
