"""The engine agrees with transformers on the same weights: prompt logits (fp32, tight tolerance) and greedy
generation token for token, alone and in batches whose requests join at different steps."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.engine.conftest import PROMPTS, engine_prompt_logits, greedy, hf_greedy, hf_model

ARCHS = ["llama_path", "llama_gqa_path", "qwen2_path", "mistral_path"]


def _reference_path(request, fixture):
    if fixture == "internlm2_paths":
        internlm2, llama_ref = request.getfixturevalue(fixture)
        return internlm2, llama_ref
    path = request.getfixturevalue(fixture)
    return path, path


@pytest.mark.parametrize("fixture", ARCHS + ["internlm2_paths"])
def test_prompt_logits_match_transformers(request, make_pipe, fixture):
    path, ref_path = _reference_path(request, fixture)
    pipe = make_pipe(path)
    ref = hf_model(ref_path)
    for prompt in PROMPTS:
        ids = pipe.encode(prompt)
        ours = engine_prompt_logits(pipe, ids)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].float()
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", ARCHS + ["internlm2_paths"])
def test_greedy_generation_matches_transformers(request, make_pipe, fixture):
    path, ref_path = _reference_path(request, fixture)
    pipe = make_pipe(path)
    ref = hf_model(ref_path)
    outs = pipe(PROMPTS, greedy(32))  # one batch of prompts of different lengths
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(ref, pipe.encode(prompt), 32)
        assert out.finish_reason == "length"
        assert out.generate_token_len == 32


def test_requests_joining_a_running_batch_match_transformers(make_pipe, llama_gqa_path):
    """Requests admitted while others decode (continuous batching) still generate exactly what they would alone."""
    pipe = make_pipe(llama_gqa_path, max_prefill_token_num=32)  # long prompts also prefill in chunks
    ref = hf_model(llama_gqa_path)
    results: dict[int, list[int]] = {}
    started = [threading.Event() for _ in PROMPTS]

    def run(i):
        ids = []
        for delta in pipe.stream(PROMPTS[i], greedy(24)):
            ids += delta.token_ids
            if len(ids) >= 3:
                started[i].set()
        started[i].set()
        results[i] = ids

    threads = []
    for i in range(len(PROMPTS)):
        t = threading.Thread(target=run, args=(i,))
        t.start()
        threads.append(t)
        started[i].wait(timeout=30)  # the next request arrives once this one is decoding
    for t in threads:
        t.join(timeout=60)
    assert pipe.engine.stats.num_steps > 24  # interleaved, not one request after another in one batch
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == hf_greedy(ref, pipe.encode(prompt), 24), f"prompt {i}"


def test_repetition_penalty_matches_transformers(make_pipe, llama_path):
    pipe = make_pipe(llama_path)
    ref = hf_model(llama_path)
    ids = pipe.encode(PROMPTS[0])
    out = pipe(PROMPTS[0], greedy(24, repetition_penalty=1.5))
    assert out.token_ids == hf_greedy(ref, ids, 24, repetition_penalty=1.5)


def test_sharded_checkpoint_and_llama3_rope_match_transformers(make_pipe, tmp_path):
    from tests.model_factory import make_llama

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    path = make_llama(tmp_path / "l3", num_kv_heads=2, rope_scaling=rope, shards=3)
    assert (path / "model.safetensors.index.json").is_file()
    pipe = make_pipe(path)
    ref = hf_model(path)
    ids = pipe.encode(PROMPTS[3])  # long enough to reach the scaled frequencies
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(engine_prompt_logits(pipe, ids), theirs, atol=2e-4, rtol=1e-4)
