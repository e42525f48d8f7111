"""Per-request numbers are validated at the door, and a step that fails anyway ends only the request that fails:
GenerationConfig fuzzed with hypothesis (whatever it accepts, the real sampler runs), ids outside the vocabulary,
one bad request among innocent ones in the same step, and a batch with one bad prompt submitting nothing."""

from __future__ import annotations

import math
import queue

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import GenerationConfig, PromptTooLongError
from engine.errors import BadInputError
from engine.layers.sampler import sample
from engine.sequence import SamplingState, Sequence
from tests.engine.conftest import small_config, wait_until

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

wild_ints = st.integers(-(2**70), 2**70) | st.integers(-2, 70) | st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1])
wild_floats = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-3, 3) | wild_ints
wild = st.none() | st.booleans() | wild_ints | wild_floats | st.text(max_size=3) | st.lists(wild_ints, max_size=3)
FIELDS = {
    "max_new_tokens": wild_ints, "min_new_tokens": wild_ints, "top_k": wild_ints, "seed": st.none() | wild_ints,
    "temperature": wild_floats, "top_p": wild_floats, "min_p": wild_floats, "repetition_penalty": wild_floats,
    "presence_penalty": wild_floats, "frequency_penalty": wild_floats, "logprobs": st.none() | wild_ints,
    "stop_token_ids": st.lists(wild_ints, max_size=4), "do_sample": st.booleans(),
    "stop_words": st.lists(st.text(max_size=3), max_size=2),
}
kwargs = st.fixed_dictionaries({}, optional={name: st.one_of(strategy, wild) if name != "do_sample" else strategy
                                             for name, strategy in FIELDS.items()})


@pytest.fixture(scope="module")
def pipe(demo_model_path):
    from engine import pipeline

    p = pipeline(demo_model_path, small_config(session_len=256))
    yield p
    p.close()


@FUZZ
@given(kw=kwargs)
def test_fuzzed_generation_config_is_refused_at_the_door_or_samples(pipe, kw):
    """Either the config is refused with BadInputError (a ValueError: a 400 in the API), or the real sampler runs
    it on the engine's vocabulary without an exception: no value can fail a step."""
    try:
        gc = GenerationConfig(**kw)
        gc.check_for_model(pipe.engine.spec.vocab_size)
    except BadInputError:
        return
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert math.isfinite(getattr(gc, name))
    vocab = pipe.engine.spec.vocab_size
    seq = Sequence([1, 2, 3], SamplingState(gc, gc.seed if gc.seed is not None else 0, frozenset({2})),
                   3 + min(gc.max_new_tokens, 8), 16)
    batch = pipe.engine.runner.sampling_batch([seq])
    tokens, _ = sample(torch.randn(1, vocab), batch)
    assert 0 <= int(tokens[0]) < vocab


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=10**20), "top_k"),
    (dict(seed=2**64), "seed"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(temperature=10**400), "temperature"),
    (dict(max_new_tokens=2**64), "max_new_tokens"),
    (dict(stop_token_ids="5"), "stop_token_ids"),
])
def test_out_of_range_values_are_refused(kw, match):
    with pytest.raises(BadInputError, match=match):
        GenerationConfig(**kw)


def test_stop_token_ids_beyond_the_vocabulary_are_refused(pipe):
    vocab = pipe.engine.spec.vocab_size
    gc = GenerationConfig(max_new_tokens=4, min_new_tokens=2, stop_token_ids=[vocab])
    with pytest.raises(BadInputError, match=rf"stop_token_ids must be in \[0, {vocab}\)"):
        pipe("hello", gc)
    assert pipe("hello", GenerationConfig(max_new_tokens=4, stop_token_ids=[vocab - 1])).finish_reason


def test_a_failing_step_fails_only_the_bad_request(pipe):
    """A value that slipped past validation (set after construction) fails its own request; the three innocent
    requests scheduled in the same step still finish normally."""
    engine = pipe.engine
    ids = pipe.encode("Tell me a story")
    good = GenerationConfig(max_new_tokens=6, min_new_tokens=6, ignore_eos=True, do_sample=True, top_k=5, seed=1)
    bad = GenerationConfig(max_new_tokens=6, min_new_tokens=6, ignore_eos=True, do_sample=True, top_k=5, seed=1)
    bad.top_k = 10**20  # past int64: the step's tensor conversion overflows
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    steps_before = engine.stats.num_steps

    def add_all():  # on the engine thread, between steps: all four join the same step
        for name, gc in (("good-0", good), ("bad", bad), ("good-1", good), ("good-2", good)):
            engine.add_request(ids, gc, lambda out, name=name: outputs.put((name, out)), request_id=name)

    engine.run_on_engine_thread(add_all)
    finished: dict[str, object] = {}
    while len(finished) < 4:
        name, out = outputs.get(timeout=120)
        if out.finished:
            finished[name] = out
    assert finished["bad"].finish_reason == "error" and "Overflow" in finished["bad"].error
    for name in ("good-0", "good-1", "good-2"):
        assert finished[name].finish_reason == "length", (name, finished[name].error)
        assert finished[name].num_generated_tokens == 6
    assert engine.stats.num_steps > steps_before
    assert wait_until(lambda: pipe.memory()["used_kv_blocks"] == 0, timeout=30)


def test_a_batch_with_one_bad_prompt_submits_nothing(pipe):
    engine = pipe.engine
    requests_before = engine.stats.num_requests
    with pytest.raises(PromptTooLongError):
        pipe(["ok", "word " * 400], GenerationConfig(max_new_tokens=4))
    engine.run_on_engine_thread(lambda: None)  # anything queued before this call has reached the scheduler
    assert engine.stats.num_requests == requests_before
    assert engine.num_running == 0 and engine.num_waiting == 0
