"""Tensor parallelism on CPU: gloo, 2 processes (rank 0 in this process, rank 1 a worker). Greedy tokens equal
to tp = 1 and logits within fp32 tolerance on Llama GQA, Llama with fewer KV heads than ranks, Qwen2 (biases,
tied embeddings) and an AWQ checkpoint; a killed or hung worker ends the requests with an error and stops the
engine, which then refuses requests naming the rank; unsplittable shapes are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from engine import EngineConfig, pipeline
from engine.errors import EngineStoppedError
from tests.engine.conftest import PROMPTS, engine_prompt_logits, greedy, small_config, wait_until, within

# a bound on each test; the thread method, since a lost request leaves the main thread blocked in C (a queue get, a
# collective), which the signal method cannot interrupt: it dumps every thread's stack and ends the run instead
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300, method="thread")]
DEADLINE_S = 120  # generous: what a lost request would exceed, never what a loaded machine needs


def _config(tp: int, **kw) -> EngineConfig:
    return small_config(tp=tp, num_gpu_blocks=64, **kw)


def _compare(path, **kw):
    one = pipeline(path, _config(1, **kw))
    try:
        ids = [one.encode(p) for p in PROMPTS[:3]]
        ref_logits = [engine_prompt_logits(one, i) for i in ids]
        ref_out = [o.token_ids for o in one(PROMPTS[:3], greedy(12))]
        ref_weights = one.memory()["weights_bytes"]
    finally:
        one.close()
    two = pipeline(path, _config(2, **kw))
    try:
        workers = list(two.engine.runner.tp_group.procs)
        for i, ref in zip(ids, ref_logits):
            ours = engine_prompt_logits(two, i)
            assert ours.shape == ref.shape
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        assert [o.token_ids for o in two(PROMPTS[:3], greedy(12))] == ref_out
        mem = two.memory()
        assert mem["tp"] == 2 and [r["rank"] for r in mem["ranks"]] == [0, 1]
        assert mem["ranks"][0]["num_kv_blocks"] == mem["ranks"][1]["num_kv_blocks"] == mem["num_kv_blocks"]
        for r in mem["ranks"]:  # each rank holds its shard only (norms are replicated, so a bit over half)
            assert r["weights_bytes"] < 0.7 * ref_weights
    finally:
        two.close()
    assert all(p.poll() is not None for p in workers), "a worker outlived the engine"


def test_tp2_llama_gqa_matches_tp1(llama_gqa_path):
    _compare(llama_gqa_path)


@pytest.fixture(scope="module")
def llama_one_kv_head_path(tmp_path_factory):
    from tests.model_factory import make_llama

    return make_llama(tmp_path_factory.mktemp("llama-mqa"), num_kv_heads=1)


def test_tp2_fewer_kv_heads_than_ranks_matches_tp1(llama_one_kv_head_path):
    _compare(llama_one_kv_head_path)


def test_tp2_qwen2_biases_tied_embeddings_matches_tp1(qwen2_path):
    _compare(qwen2_path)


@pytest.fixture(scope="module")
def awq_folder(tmp_path_factory, llama_gqa_path):
    out = tmp_path_factory.mktemp("awq-tp") / "llama-awq"
    calib = out.parent / "calib.txt"
    calib.write_text(("The sea was calm and the ships sailed north toward the islands. " * 40 + "\n") * 4)
    subprocess.run([sys.executable, "-m", "quant", str(llama_gqa_path), "--work-dir", str(out),
                    "--calib-dataset", str(calib), "--calib-samples", "2", "--calib-seqlen", "32",
                    "--w-group-size", "16", "--device", "cpu"], check=True, capture_output=True, timeout=300)
    return out


def test_tp2_awq_matches_tp1(awq_folder):
    _compare(awq_folder)


class _Requests:
    """Requests added straight to the engine: each one's final output, and an event set when it arrives."""

    def __init__(self, engine):
        self.engine, self.final, self.done = engine, {}, {}

    def add(self, name, ids, gen, on_token=None):
        """The request's id; or None when the engine refused it (EngineStoppedError naming the rank)."""
        self.done[name] = threading.Event()

        def callback(out):
            if out.token_ids and on_token is not None:
                on_token()
            if out.finished:
                self.final[name] = out
                self.done[name].set()

        try:
            return self.engine.add_request(ids, gen, callback)
        except EngineStoppedError as e:
            assert "rank 1" in str(e)
            del self.done[name]
            return None

    def wait(self, name):
        assert self.done[name].wait(DEADLINE_S), f"request {name!r} never ended (lost)"
        return self.final[name]


@pytest.mark.parametrize("when", ["idle", "between_steps"])
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_failing_worker_ends_requests_with_an_error(llama_gqa_path, monkeypatch, how, when):
    """A worker killed (SIGKILL) or hung (SIGSTOP: alive, not answering) while the engine is idle, or from the
    engine thread right after a token (the worker is then between steps, maybe before it waits for the next
    header): the request in the failing step and one queued behind it end with finish_reason "error" naming
    rank 1 (or the queued one is refused so), the engine stops by itself, later requests and calls are refused,
    and the worker is reaped. A hang fails by ENGINE_TP_TIMEOUT_S; every wait here has a deadline."""
    monkeypatch.setenv("ENGINE_TP_TIMEOUT_S", "4")
    sig = signal.SIGKILL if how == "killed" else signal.SIGSTOP
    pipe = pipeline(llama_gqa_path, _config(2))
    engine = pipe.engine
    worker = engine.runner.tp_group.procs[0]
    ids = pipe.encode(PROMPTS[0])
    reqs = _Requests(engine)
    try:
        if when == "idle":
            os.kill(worker.pid, sig)
            if how == "killed":  # the supervisor sees the exit: the engine stops with no request to fail
                assert wait_until(lambda: not engine.is_alive, timeout=DEADLINE_S), "a dead worker went unnoticed"
                assert "rank 1" in engine.fatal_error
            reqs.add("first", ids, greedy(8))
        else:
            signalled = []

            def fail_worker_then_queue_another():  # on the engine thread, between two steps
                if not signalled:
                    signalled.append(True)
                    os.kill(worker.pid, sig)
                    reqs.add("queued", ids, greedy(8))

            reqs.add("first", ids, greedy(400), on_token=fail_worker_then_queue_another)
        if "first" in reqs.done:
            first = reqs.wait("first")
            assert first.finish_reason == "error", first
            assert "rank 1" in first.error
        if "queued" in reqs.done:
            queued = reqs.wait("queued")
            assert queued.finish_reason == "error" and "rank 1" in queued.error, queued
        assert wait_until(lambda: not engine._thread.is_alive(), timeout=DEADLINE_S), "the engine loop kept running"
        assert not engine.is_alive and "rank 1" in engine.fatal_error
        if how == "hung":
            assert "hung" in engine.fatal_error
        with pytest.raises(EngineStoppedError, match="rank 1"):
            within(DEADLINE_S, pipe, PROMPTS[0], greedy(8))
        with pytest.raises(EngineStoppedError, match="rank 1"):
            within(DEADLINE_S, engine.run_on_engine_thread, lambda: None)
    finally:
        pipe.close()
    assert wait_until(lambda: worker.poll() is not None, timeout=DEADLINE_S), "the failed worker was left behind"


def test_unsplittable_shapes_are_refused():
    from engine.models import parse_model_spec
    from engine.parallel.shard_loader import TPShapeError, make_plan

    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 96, "num_hidden_layers": 1,
           "num_attention_heads": 3, "num_key_value_heads": 3, "intermediate_size": 128, "vocab_size": 100}
    with pytest.raises(TPShapeError, match="3 attention heads are not divisible by 2"):
        make_plan(parse_model_spec(cfg), 2, 0)
    cfg.update(num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(TPShapeError, match="3 KV heads are not divisible by 2"):
        make_plan(parse_model_spec(cfg), 2, 0)
    cfg.update(num_attention_heads=4, num_key_value_heads=2, hidden_size=128, intermediate_size=192,
               quantization_config={"quant_method": "awq", "group_size": 128, "bits": 4})
    with pytest.raises(TPShapeError, match="never splits a quantization group"):
        make_plan(parse_model_spec(cfg), 2, 0, "awq")


def test_unsplittable_checkpoint_refused_before_workers_start(llama_path, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    with pytest.raises(ValueError, match="--tp 3 cannot split"):
        pipeline(bad, _config(3))
    assert cfg  # the folder itself is fine at tp = 1


def test_each_rank_reads_only_its_slices(llama_gqa_path, monkeypatch):
    # the safetensors path slices on disk (get_slice), never get_tensor; the ranks' slices tile the full tensors
    from safetensors import safe_open
    from safetensors.torch import load_file

    from engine import loader
    from engine.parallel.shard_loader import make_plan, sharded_tensors

    spec = loader.read_model_spec(llama_gqa_path)
    full = {}
    for f in sorted(llama_gqa_path.glob("*.safetensors")):
        full.update(load_file(str(f)))
    import safetensors

    def no_whole_reads(*a, **kw):
        handle = safe_open(*a, **kw)

        class Guard:
            def __enter__(self):
                self.h = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.h.keys()

            def get_slice(self, name):
                return self.h.get_slice(name)

            def get_tensor(self, name):
                raise AssertionError(f"{name} read whole")

        return Guard()

    monkeypatch.setattr(safetensors, "safe_open", no_whole_reads)
    shards = [dict(sharded_tensors(llama_gqa_path, make_plan(spec, 2, r))) for r in range(2)]
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(torch.cat([s[q] for s in shards], 0), full[q])
    assert torch.equal(torch.cat([s[o] for s in shards], 1), full[o])
    assert torch.equal(torch.cat([s[k] for s in shards], 0), full[k])
    norm = "model.layers.0.input_layernorm.weight"
    assert all(torch.equal(s[norm], full[norm]) for s in shards)
