"""The engine: accepts requests from any thread and runs the step loop (schedule -> run -> sample -> stream) on one
background thread.

Requests, aborts and calls are handed to the loop as small command objects on a queue, so callers never touch
scheduler state. Each request's updates go to its own callback (engine/output_processor.py turns tokens into them).
A step that fails ends only the requests in that step (finish_reason "error"); the engine keeps serving the rest.
A fatal failure (a tensor-parallel rank gone or hung, or a bug in the loop itself) stops the engine: every request it
holds or that is queued ends with finish_reason "error" and the reason, and later ones are refused with it. Once the
loop has exited, nothing can be queued any more (add_request and run_on_engine_thread raise), so no caller waits on a
command that nobody will run.
`build_engine_parts` assembles what the loop runs on (checkpoint, tokenizer, model runner, block manager,
scheduler).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import loader
from engine import output_processor as outputs
from engine.block_manager import BlockManager
from engine.config import MAX_LOGPROBS, EngineConfig, GenerationConfig
from engine.errors import (  # noqa: F401 - re-exported
    BadInputError,
    EngineStoppedError,
    EngineUnavailableError,
    ImageInputError,
    PromptTooLongError,
    UnsupportedModelError,
)
from engine.inputs import RequestInput
from engine.memory import engine_memory_report
from engine.model_runner import ModelRunner
from engine.models.spec import ModelSpec
from engine.output_processor import RequestOutput, RequestState
from engine.parallel.launcher import start_tensor_parallel
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import PENDING, SamplingState, Sequence, SequenceStatus
from engine.tokenizer import IncrementalDetokenizer, chat_template_for, load_tokenizer, stop_token_ids_for

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005
SCORE_CHUNK_TOKENS = 512  # prompt-scoring chunk: bounds the [chunk, vocab] float32 logits it holds at once

__all__ = ["EngineStats", "EngineStoppedError", "LLMEngine", "PromptTooLongError", "RequestOutput",
           "build_engine_parts"]


@dataclass
class EngineStats:
    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_errors: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_steps: int = 0


# ---- commands: what other threads hand to the loop ------------------------------------------------------------
@dataclass
class AddRequest:
    request: RequestState


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class CallOnEngine:
    fn: Callable[[], Any]
    done: queue.SimpleQueue  # gets (True, result) or (False, exception)


@dataclass
class StopEngine:
    pass


# ---- assembly -------------------------------------------------------------------------------------------------
@dataclass
class EngineParts:
    """Everything the loop runs on, built from a checkpoint folder and an EngineConfig."""

    model_path: Path
    spec: ModelSpec
    model_format: str
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    chat_template: str | None
    eos_token_ids: frozenset[int]
    runner: ModelRunner
    block_manager: BlockManager
    scheduler: Scheduler
    session_len: int
    image_processor: Any = None  # vision-language models: images -> pixels and placeholder counts (models/llava.py)


def build_engine_parts(model_path: str | Path, config: EngineConfig) -> EngineParts:
    """Resolve and check the checkpoint, load tokenizer and model, size the KV cache, make block manager and
    scheduler. Cheap checks (path, config, architecture, format, weights present) come before anything heavy."""
    path = loader.resolve_model_path(model_path)
    spec = loader.read_model_spec(path, config.vision_tower)
    model_format = loader.detect_model_format(spec, config.model_format)
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    dtype = loader.resolve_dtype(config.dtype, spec, device, model_format)
    if config.load_format != "dummy":
        loader.check_weights_present(path)
    tokenizer = load_tokenizer(path, spec, config.trust_remote_code)
    chat_template = chat_template_for(tokenizer, spec, path)
    eos_token_ids = stop_token_ids_for(tokenizer, spec)
    multimodal = loader.entry_for(spec.architecture).multimodal
    image_processor = multimodal.image_processor(spec) if multimodal is not None else None
    if config.tp > 1 and multimodal is not None:
        raise UnsupportedModelError(f"{spec.architecture}: tensor parallelism (tp > 1) is not supported for "
                                    "vision-language models yet; load it with tp = 1")
    if config.tp > 1:  # TP hook: rank 0's shard and runner here, ranks 1..N-1 in worker processes
        runner = start_tensor_parallel(path, spec, config, device, dtype, model_format)
    else:
        model = loader.load_model(path, spec, dtype, device, model_format, config.load_format)
        runner = ModelRunner(model, spec, config, device, dtype)
    block_manager = BlockManager(runner.num_blocks, config.cache_block_seq_len, config.enable_prefix_caching)
    scheduler = Scheduler(block_manager, config.max_batch_size, config.max_prefill_token_num)
    max_len = spec.max_position_embeddings
    if spec.sliding_window:
        max_len = min(max_len, spec.sliding_window)
    session_len = min(config.session_len or max_len, max_len)
    return EngineParts(path, spec, model_format, device, dtype, tokenizer, chat_template, eos_token_ids, runner,
                       block_manager, scheduler, session_len, image_processor)


class LLMEngine:
    def __init__(self, model_path: str | Path, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        parts = build_engine_parts(model_path, config)
        self.model_path, self.spec, self.model_format = parts.model_path, parts.spec, parts.model_format
        self.device, self.dtype = parts.device, parts.dtype
        self.tokenizer, self.chat_template = parts.tokenizer, parts.chat_template
        self.image_processor = parts.image_processor
        self.eos_token_ids = parts.eos_token_ids
        self.runner, self.block_manager, self.scheduler = parts.runner, parts.block_manager, parts.scheduler
        self.block_size = config.cache_block_seq_len
        self.session_len = parts.session_len
        self.capacity_tokens = self.runner.num_blocks * self.block_size
        self.stats = EngineStats()
        self._seed_rng = random.Random(config.seed)
        self._ids = itertools.count()
        self._requests: dict[str, RequestState] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopped = False  # no new requests (shutting down, or a fatal error)
        self._closed = False  # the loop has exited: nothing queued from now on would ever run
        self._queue_lock = threading.Lock()  # orders "queue a command" against "the loop takes its last commands"
        self.fatal_error: str | None = None
        self._pending = None  # the launched step whose tokens are not read back yet
        self.overlap = config.overlap_scheduling if config.overlap_scheduling is not None else (
            self.device.type == "cuda")
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()
        tp_group = getattr(self.runner, "tp_group", None)
        if tp_group is not None:  # TP hook: a worker that dies stops the engine at once, even while it is idle
            tp_group.on_failure = self._fatal
            if tp_group.failure is not None:
                self._fatal(RuntimeError(tp_group.failure))

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

    def add_request(self, prompt_token_ids: list[int] | RequestInput, gen_config: GenerationConfig,
                    callback: Callable[[RequestOutput], None], request_id: str | None = None,
                    group: str | None = None) -> str:
        """Queue a request; `callback` gets its updates on the engine thread. Raises on a prompt that can't fit.
        A RequestInput carries images (engine/inputs.py) besides the token ids. Requests of one `group` (an API
        request's choices) share one fair share of the batch (scheduler.py); by default each request is its own."""
        if self._stopped:
            raise EngineStoppedError(self.fatal_error or "the engine is shut down")
        mm_items = ()
        if isinstance(prompt_token_ids, RequestInput):
            prompt_token_ids, mm_items = prompt_token_ids.token_ids, prompt_token_ids.mm_items
            if mm_items and not getattr(self.runner.model, "is_multimodal", False):
                raise ImageInputError("this model takes no images: send text only, or load a vision-language model")
            if mm_items and hasattr(self.runner.model, "check_items"):  # e.g. Qwen2-VL: sizes, tokens, patches agree
                self.runner.model.check_items(mm_items)
        self.check_prompt_ids(prompt_token_ids)
        gen_config.check_for_model(self.spec.vocab_size)
        request_id = request_id or self.new_request_id()
        seed = gen_config.seed if gen_config.seed is not None else self._seed_rng.getrandbits(63)
        eos = frozenset() if gen_config.ignore_eos else self.eos_token_ids
        max_tokens = min(self.session_len, len(prompt_token_ids) + gen_config.max_new_tokens, self.capacity_tokens)
        seq = Sequence(prompt_token_ids, SamplingState(gen_config, seed, eos), max_tokens, self.block_size, mm_items,
                       group=group or request_id)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, gen_config.skip_special_tokens)
        request = RequestState(request_id, seq, detok, callback, list(gen_config.stop_words))
        self._put(AddRequest(request))
        return request_id

    def _put(self, cmd, refuse: bool = True) -> bool:
        """Queue a command for the loop. Once the loop has taken its last commands this raises (refuse) or returns
        False: the check and the put are one step against the loop's close, so nothing lands in a queue that
        nobody reads any more."""
        with self._queue_lock:
            if self._closed:
                if refuse:
                    raise EngineStoppedError(self.fatal_error or "the engine is shut down")
                return False
            self._commands.put(cmd)
        self._wakeup.set()
        return True

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed before the next step runs (after the loop has exited, every
        request has ended already)."""
        self._put(AbortRequest(request_id), refuse=False)

    def _fatal(self, e: BaseException) -> None:
        """Any thread: the engine cannot run steps any more. Stop taking requests; the loop then ends every request
        it holds with finish_reason "error" and this reason."""
        if self.fatal_error is None:
            self.fatal_error = f"the engine stopped: {e}"
        self._stopped = True
        self._put(StopEngine(), refuse=False)

    def shutdown(self) -> None:
        self._stopped = True
        self._put(StopEngine(), refuse=False)
        self._thread.join(timeout=30)
        if getattr(self.runner, "tp_group", None) is not None:  # TP hook: stop and reap the workers
            self.runner.tp_group.shutdown()

    # ---- the loop (engine thread) ---------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug in the loop: the engine is dead, and must say so to every caller
            log.error("engine loop failed:\n%s", traceback.format_exc())
            if self.fatal_error is None:
                self.fatal_error = f"the engine stopped: {type(e).__name__}: {e}"
            self._stopped = True
        finally:
            self._close()

    def _close(self) -> None:
        """The loop's last act: after this, commands are refused; the ones queued before it and every request
        still held end here (with the fatal error if there is one, else as aborted)."""
        try:
            self._resolve_pending()
        except Exception:  # noqa: BLE001 - a broken step must not keep the requests below waiting
            log.error("engine close:\n%s", traceback.format_exc())
            self._pending = None
        with self._queue_lock:
            self._closed = True
        self._drain_commands(stopping=True)
        reason, error = ("error", self.fatal_error) if self.fatal_error else ("abort", None)
        for request in list(self._requests.values()):
            try:
                if reason == "error":
                    self.stats.num_errors += 1
                self._finish(request, reason, error=error)
            except Exception:  # noqa: BLE001 - the others must still hear; this one too, if _finish did not tell it
                log.error("engine close:\n%s", traceback.format_exc())
                if self._requests.pop(request.request_id, None) is not None:
                    outputs.emit(request, finished=True, finish_reason=reason, error=error)

    def _serve(self) -> None:
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

    def _drain_commands(self, stopping: bool = False) -> bool:
        """Run the queued commands; False once a StopEngine is met. While stopping, requests are kept only to be
        aborted and calls fail."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            if isinstance(cmd, StopEngine):
                if not stopping:
                    return False
            elif isinstance(cmd, AddRequest):
                request = cmd.request
                self._requests[request.request_id] = request
                request.seq.request = request
                if not stopping:
                    self.scheduler.add(request.seq)
                    self.stats.num_requests += 1
                    self.stats.num_prompt_tokens += request.seq.num_prompt_tokens
            elif isinstance(cmd, AbortRequest):
                request = self._requests.get(cmd.request_id)
                if request is not None and not stopping:
                    self.stats.num_aborted += 1
                    self._finish(request, "abort")
            elif isinstance(cmd, CallOnEngine):
                if stopping:
                    cmd.done.put((False, EngineStoppedError(self.fatal_error or "the engine is shut down")))
                    continue
                try:
                    cmd.done.put((True, cmd.fn()))
                except Exception as e:  # noqa: BLE001 - handed back to the caller
                    cmd.done.put((False, e))

    def run_on_engine_thread(self, fn):
        """Run fn between steps on the engine thread (for state that only the loop may touch)."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._put(CallOnEngine(fn, done))  # raises once the loop has exited; before that, the loop answers it
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def score(self, token_ids: list[int], top_logprobs: int = 0) -> list[dict]:
        """Each token's log-probability given the ones before it, as this engine computes it (weights format and
        KV-cache policy included): entries shaped like sampled logprobs, {"token_id", "logprob", "top": [(id,
        logprob), ...]}; the first token has logprob None. Perplexity (studio/quality.py) and `echo` + `logprobs`
        on /v1/completions read it.

        The ids are prefilled in chunks of at most `SCORE_CHUNK_TOKENS`, each a call between other requests' steps
        (so serving goes on), into blocks of their own that the prefix cache neither gives nor keeps; later chunks
        read the earlier ones' KV from the (possibly quantized) cache, as generation does."""
        ids = list(token_ids)
        if len(ids) > self.session_len:
            raise PromptTooLongError(f"the text has {len(ids)} tokens but session_len is {self.session_len}")
        if len(ids) > self.capacity_tokens:
            raise PromptTooLongError(f"the text has {len(ids)} tokens but the KV cache holds {self.capacity_tokens}")
        if not ids:
            raise BadInputError("the text to score is empty")
        if any(not 0 <= t < self.spec.vocab_size for t in ids):
            raise BadInputError(f"token ids must be in [0, {self.spec.vocab_size})")
        if not 0 <= top_logprobs <= MAX_LOGPROBS:
            raise BadInputError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top_logprobs}")
        if self._stopped:
            raise EngineStoppedError(getattr(self, "fatal_error", None) or "the engine is shut down")
        seq = Sequence(ids, SamplingState(GenerationConfig(), 0, frozenset()), len(ids), self.block_size)
        if not self.run_on_engine_thread(lambda: self.block_manager.allocate_private(seq)):
            raise EngineUnavailableError(
                f"the KV cache has no room for {len(ids)} more tokens right now; retry when other requests finish")
        entries = [{"token_id": ids[0], "logprob": None, "top": []}]
        chunk = max(self.block_size, min(self.config.max_prefill_token_num, SCORE_CHUNK_TOKENS))

        def run_chunk(start: int, n: int) -> list[dict]:
            seq.num_computed_tokens = start
            logprobs = torch.log_softmax(self.runner.prompt_logits(seq, n).float(), dim=-1)
            seq.num_computed_tokens = start + n
            rows = min(n, len(ids) - 1 - start)  # the last position predicts past the text
            if rows <= 0:
                return []
            targets = torch.tensor(ids[start + 1 : start + 1 + rows], device=logprobs.device)
            chosen = logprobs[:rows].gather(1, targets[:, None])[:, 0].cpu().tolist()
            top = [[] for _ in range(rows)]
            if top_logprobs:
                vals, top_ids = logprobs[:rows].topk(top_logprobs, dim=-1)
                top = [list(zip(i, v)) for i, v in zip(top_ids.cpu().tolist(), vals.cpu().tolist())]
            return [{"token_id": t, "logprob": lp, "top": tp} for t, lp, tp in zip(ids[start + 1 :], chosen, top)]

        try:
            for start in range(0, len(ids), chunk):
                n = min(chunk, len(ids) - start)
                entries += self.run_on_engine_thread(lambda start=start, n=n: run_chunk(start, n))
        finally:
            try:
                self.run_on_engine_thread(lambda: self.block_manager.deallocate(seq))
            except EngineStoppedError:
                pass  # the engine is gone, and its blocks with it
        return entries

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
            if getattr(e, "is_fatal", False):  # TP hook: a rank is gone: end this step, stop, refuse new requests
                self._fatal(e)
                self._fail(batch.seqs, e)
                return
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
                if getattr(alone, "is_fatal", False):  # TP hook: no step can run any more
                    self._fatal(alone)
                    self._fail(batch.seqs, alone)
                    return
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
                seq.logprobs.append(outputs.logprob_entry(info, i, token, seq.sampling.gen_config.logprobs))
            self._on_token(request, token, index + 1)

    def _fail(self, seqs, e: Exception) -> None:
        for seq in seqs:
            if seq.request is not None and not seq.is_finished:
                self.stats.num_errors += 1
                self._finish(seq.request, "error", error=f"{type(e).__name__}: {e}")

    def _on_token(self, request: RequestState, token: int, length: int) -> None:
        """A sampled token is in place; `length` is the sequence's length up to and including it."""
        self.stats.num_generated_tokens += 1
        finish_reason = outputs.process_token(request, token, length)
        if finish_reason is not None:
            self._finish(request, finish_reason)
        else:
            outputs.emit(request, finished=False)

    def _finish(self, request: RequestState, reason: str, error: str | None = None) -> None:
        seq = request.seq
        self.scheduler.remove(seq)
        while seq.token_ids and seq.token_ids[-1] == PENDING:  # a step launched before we knew it had ended
            seq.token_ids.pop()
        outputs.end_text(request, reason)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._requests.pop(request.request_id, None)
        if reason in ("stop", "length"):
            self.stats.num_finished += 1
        outputs.emit(request, finished=True, finish_reason=reason, error=error)

    # ---- introspection --------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def memory(self) -> dict:
        return engine_memory_report(self)
