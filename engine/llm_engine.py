"""The engine: loads a model, accepts requests from any thread, and runs the step loop
(schedule -> run -> sample -> detokenize -> stream) on one background thread.

Requests and aborts are handed to the loop through a queue, so callers never touch scheduler state.
Each request's updates go to its own callback. A step that fails ends only the requests in that step
(finish_reason "error"); the engine keeps serving the rest.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import loader
from engine.block_manager import BlockManager
from engine.config import EngineConfig, GenerationConfig
from engine.errors import EngineStoppedError, PromptTooLongError  # noqa: F401 - re-exported
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import PENDING, SamplingState, Sequence, SequenceStatus
from engine.tokenizer import IncrementalDetokenizer, chat_template_for, load_tokenizer, stop_token_ids_for

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005


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
class _Request:
    request_id: str
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    callback: Callable[[RequestOutput], None]
    stop_words: list[str]
    sent_chars: int = 0
    sent_tokens: int = 0
    sent_logprobs: int = 0
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class EngineStats:
    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_errors: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_steps: int = 0


class LLMEngine:
    def __init__(self, model_path: str | Path, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model_path = loader.resolve_model_path(model_path)
        self.spec = loader.read_model_spec(self.model_path)
        self.model_format = loader.detect_model_format(self.spec, config.model_format)
        if config.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
        self.dtype = loader.resolve_dtype(config.dtype, self.spec, self.device, self.model_format)
        if config.load_format != "dummy":
            loader.check_weights_present(self.model_path)
        self.tokenizer = load_tokenizer(self.model_path, self.spec, config.trust_remote_code)
        self.chat_template = chat_template_for(self.tokenizer, self.spec)
        self.eos_token_ids = stop_token_ids_for(self.tokenizer, self.spec)
        model = loader.load_model(self.model_path, self.spec, self.dtype, self.device, self.model_format,
                                  config.load_format)
        self.runner = ModelRunner(model, self.spec, config, self.device, self.dtype)
        self.block_size = config.cache_block_seq_len
        self.block_manager = BlockManager(self.runner.num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_batch_size, config.max_prefill_token_num)
        max_len = self.spec.max_position_embeddings
        if self.spec.sliding_window:
            max_len = min(max_len, self.spec.sliding_window)
        self.session_len = min(config.session_len or max_len, max_len)
        self.capacity_tokens = self.runner.num_blocks * self.block_size
        self.stats = EngineStats()
        self._seed_rng = random.Random(config.seed)
        self._ids = itertools.count()
        self._requests: dict[str, _Request] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopped = False
        self._pending = None  # the launched step whose tokens are not read back yet
        self.overlap = config.overlap_scheduling if config.overlap_scheduling is not None else (
            self.device.type == "cuda")
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- requests (any thread) ------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def check_prompt_ids(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError (PromptTooLongError for length) if these ids cannot be served."""
        self.check_prompt(len(prompt_token_ids))
        vocab = self.spec.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def check_prompt(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens >= self.session_len:
            raise PromptTooLongError(
                f"the prompt has {num_prompt_tokens} tokens but session_len is {self.session_len}: it must be at "
                f"most {self.session_len - 1} tokens to leave room for a reply"
            )
        if num_prompt_tokens >= self.capacity_tokens:
            raise PromptTooLongError(
                f"the prompt has {num_prompt_tokens} tokens but the KV cache holds {self.capacity_tokens} in all; "
                "raise cache_max_entry_count or shorten the prompt"
            )
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")

    def add_request(self, prompt_token_ids: list[int], gen_config: GenerationConfig,
                    callback: Callable[[RequestOutput], None], request_id: str | None = None) -> str:
        """Queue a request; `callback` gets its updates on the engine thread. Raises on a prompt that can't fit."""
        if self._stopped:
            raise EngineStoppedError("the engine is shut down")
        self.check_prompt_ids(prompt_token_ids)
        gen_config.check_for_model(self.spec.vocab_size)
        request_id = request_id or self.new_request_id()
        seed = gen_config.seed if gen_config.seed is not None else self._seed_rng.getrandbits(63)
        eos = frozenset() if gen_config.ignore_eos else self.eos_token_ids
        max_tokens = min(self.session_len, len(prompt_token_ids) + gen_config.max_new_tokens, self.capacity_tokens)
        seq = Sequence(prompt_token_ids, SamplingState(gen_config, seed, eos), max_tokens, self.block_size)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, gen_config.skip_special_tokens)
        request = _Request(request_id, seq, detok, callback, list(gen_config.stop_words))
        self._commands.put(("add", request))
        self._wakeup.set()
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed before the next step runs."""
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop", None))
        self._wakeup.set()
        self._thread.join(timeout=30)

    # ---- the loop (engine thread) ---------------------------------------------------------------------
    def _loop(self) -> None:
        # The step loop is Python that rarely blocks once steps overlap the GPU, so it would hold the GIL for
        # whole switch intervals (5 ms by default) while the API's and the UI's event loops wait to stream the
        # tokens it produced. A shorter interval, plus an explicit release after each step, keeps them served.
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        while True:
            if not self.scheduler.has_work and self._pending is None:
                self._wakeup.wait(timeout=0.5)
            self._wakeup.clear()
            if not self._drain_commands():
                break
            if self.scheduler.has_work:
                self.step()
                time.sleep(0)  # let the threads that stream our output run
            else:
                self._resolve_pending()
        self._resolve_pending()
        while True:  # requests queued while shutting down: end them instead of leaving callers waiting
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._requests[payload.request_id] = payload
                payload.seq.request = payload
            elif kind == "call":
                payload[1].put((False, EngineStoppedError("the engine is shut down")))
        for request in list(self._requests.values()):
            self._finish(request, "abort")

    def _drain_commands(self) -> bool:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return True
            if kind == "stop":
                return False
            if kind == "add":
                self._requests[payload.request_id] = payload
                payload.seq.request = payload
                self.scheduler.add(payload.seq)
                self.stats.num_requests += 1
                self.stats.num_prompt_tokens += payload.seq.num_prompt_tokens
            elif kind == "abort":
                request = self._requests.get(payload)
                if request is not None:
                    self.stats.num_aborted += 1
                    self._finish(request, "abort")
            elif kind == "call":
                fn, done = payload
                try:
                    done.put((True, fn()))
                except Exception as e:  # noqa: BLE001 - handed back to the caller
                    done.put((False, e))

    def run_on_engine_thread(self, fn):
        """Run fn between steps on the engine thread (for state that only the loop may touch)."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._commands.put(("call", (fn, done)))
        self._wakeup.set()
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def step(self) -> None:
        """Schedule and launch one step. On CUDA the step's tokens are read back only after the next step has
        been launched, so the host's scheduling, detokenizing and streaming overlap with the GPU's work."""
        batch = self.scheduler.schedule()
        if batch is None:
            self._resolve_pending()
            return
        self.stats.num_steps += 1
        # penalties and logprobs read the newest tokens on the host: those steps run without overlap
        overlap = self.overlap and all(seq.sampling.gen_config.needs_only_logits for seq in batch.seqs)
        if not overlap:
            self._resolve_pending()
        try:
            handle = self.runner.launch(batch, self._pending)
        except Exception as e:  # noqa: BLE001 - fail only the requests that fail alone, keep serving
            log.error("engine step failed:\n%s", traceback.format_exc())
            self._resolve_pending()
            self._retry_alone(batch, e)
            return
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        for row, seq in enumerate(handle.sampled_seqs):
            seq.token_ids.append(PENDING)
            seq.pending_row = row
        previous, self._pending = self._pending, handle
        if previous is not None:
            self._resolve(previous)
        if not overlap:
            self._resolve_pending()

    def _retry_alone(self, batch: ScheduledBatch, e: Exception) -> None:
        """A step that failed is run again one sequence at a time, so one bad request (a value that slipped past
        validation) ends with finish_reason "error" and the others in its step carry on."""
        if len(batch.seqs) == 1:
            self._fail(batch.seqs, e)
            return
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.request is None or seq.is_finished:
                continue
            try:
                handle = self.runner.launch(ScheduledBatch([seq], [n], batch.is_prefill), None)
            except Exception as alone:  # noqa: BLE001
                self._fail([seq], alone)
                continue
            seq.num_computed_tokens += n
            for row, sampled in enumerate(handle.sampled_seqs):
                sampled.token_ids.append(PENDING)
                sampled.pending_row = row
            self._resolve(handle)

    def _resolve_pending(self) -> None:
        if self._pending is not None:
            handle, self._pending = self._pending, None
            self._resolve(handle)

    def _resolve(self, handle) -> None:
        """Read a launched step's tokens, put them in place of their PENDING slots, and stream them."""
        try:
            tokens = self.runner.resolve(handle)
        except Exception as e:  # noqa: BLE001
            log.error("engine step failed:\n%s", traceback.format_exc())
            self._fail(handle.batch.seqs, e)
            return
        for seq in handle.batch.seqs:
            if not seq.is_finished and seq.block_table:
                self.block_manager.register_computed_blocks(seq)
        info = handle.logprob_info
        for i, (seq, token) in enumerate(zip(handle.sampled_seqs, tokens)):
            request = seq.request
            if request is None or seq.is_finished:
                continue
            ids = seq.token_ids
            index = len(ids) - 2 if len(ids) >= 2 and ids[-2] == PENDING else len(ids) - 1
            ids[index] = token
            if info is not None and seq.sampling.gen_config.logprobs is not None:
                seq.logprobs.append(self._logprob_entry(info, i, token, seq.sampling.gen_config.logprobs))
            self._on_token(request, token, index + 1)

    def _fail(self, seqs, e: Exception) -> None:
        for seq in seqs:
            if seq.request is not None and not seq.is_finished:
                self.stats.num_errors += 1
                self._finish(seq.request, "error", error=f"{type(e).__name__}: {e}")

    def _logprob_entry(self, info, row: int, token: int, k: int) -> dict:
        chosen, top_vals, top_ids = info
        entry = {"token_id": token, "logprob": float(chosen[row])}
        entry["top"] = [] if k == 0 else list(zip(top_ids[row, :k].tolist(), top_vals[row, :k].tolist()))
        return entry

    def _on_token(self, request: _Request, token: int, length: int) -> None:
        """A sampled token is in place; `length` is the sequence's length up to and including it."""
        seq, gc = request.seq, request.seq.sampling.gen_config
        num_generated = length - seq.num_prompt_tokens
        self.stats.num_generated_tokens += 1
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
        if finish_reason is not None:
            self._finish(request, finish_reason)
        else:
            self._emit(request, finished=False)

    def _emit(self, request: _Request, finished: bool, finish_reason: str | None = None, error: str | None = None):
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

    def _finish(self, request: _Request, reason: str, error: str | None = None) -> None:
        seq = request.seq
        self.scheduler.remove(seq)
        while seq.token_ids and seq.token_ids[-1] == PENDING:  # a step launched before we knew it had ended
            seq.token_ids.pop()
        if reason == "length" or reason == "abort":
            request.detokenizer.flush()  # a character cut in half by the end is emitted as U+FFFD, not lost
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._requests.pop(request.request_id, None)
        if reason in ("stop", "length"):
            self.stats.num_finished += 1
        self._emit(request, finished=True, finish_reason=reason, error=error)

    # ---- introspection --------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def memory(self) -> dict:
        from engine.memory import engine_memory_report

        return engine_memory_report(self)
