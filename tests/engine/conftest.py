"""Engine test helpers: small-cache pipelines that close themselves, and the transformers reference."""

from __future__ import annotations

import time

import pytest
import torch

from engine import EngineConfig, GenerationConfig, pipeline

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story about a cat."}],
    "Hi",
    "In the beginning there was a long and winding road that led through the hills to the sea, and " * 3,
]


def small_config(**overrides) -> EngineConfig:
    """Blocks of 16 tokens so short prompts span several blocks; a modest CPU cache."""
    # overlap_scheduling: the GPU default, forced on here so the CPU suite runs the overlapped step loop too
    settings = dict(cache_block_seq_len=16, max_prefill_token_num=256, cpu_kv_cache_bytes=32 * 2**20,
                    overlap_scheduling=True)
    settings.update(overrides)
    return EngineConfig(**settings)


@pytest.fixture
def make_pipe():
    pipes = []

    def make(path, **overrides):
        pipe = pipeline(path, small_config(**overrides))
        pipes.append(pipe)
        return pipe

    yield make
    for pipe in pipes:
        pipe.close()


def greedy(max_new_tokens=32, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, ignore_eos=True, **kw)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos: generate exactly n tokens
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int, **kw) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ids):].tolist()


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def within(timeout, fn, *args, **kwargs):
    """fn(*args, **kwargs) on a daemon thread: its result (or its exception, raised here), or a test failure after
    `timeout` seconds, so a call that would wait forever (a lost request) fails the test instead of hanging it."""
    import queue
    import threading

    box: queue.SimpleQueue = queue.SimpleQueue()

    def run():
        try:
            box.put((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.put((False, e))

    threading.Thread(target=run, name="within", daemon=True).start()
    try:
        ok, value = box.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"{getattr(fn, '__name__', fn)} gave no answer within {timeout} s (lost, waiting forever)")
    if not ok:
        raise value
    return value


def engine_prompt_logits(pipe, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position through the engine's paged path, run on the engine thread."""
    from engine.sequence import SamplingState, Sequence

    eng = pipe.engine
    seq = Sequence(ids, SamplingState(GenerationConfig(), 0, frozenset()), len(ids) + 1, eng.block_size)

    def run():
        assert eng.block_manager.allocate_private(seq), "no free KV blocks for the prompt"  # never prefix-cached
        try:
            return eng.runner.prompt_logits(seq)
        finally:
            eng.block_manager.deallocate(seq)

    return eng.run_on_engine_thread(run)
