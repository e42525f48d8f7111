"""The real trained model, SmolLM2-135M-Instruct (studio/default_model.py): the engine against transformers on the
same weights, chat replies that end at <|im_end|>, and what the int8 / int4 KV cache costs in perplexity.

fp32 on CPU: the engine equals transformers token for token. Figures printed here (bf16 agreement, KV-quant
perplexities, KL divergences and greedy agreement) are the ones BENCHMARKS.md's quality table repeats."""

from __future__ import annotations

import math

import pytest
import torch

from engine import EngineConfig, GenerationConfig, pipeline
from studio.quality import greedy_agreement, heldout_text, perplexity, top1_agreement
from tests.engine.conftest import engine_prompt_logits, greedy, hf_greedy

PLAIN = "The three primary colours are"
CHAT = [{"role": "user", "content": "Give me two tips for sleeping better."}]
SEA = [{"role": "user", "content": "Write one sentence about the sea."}]
QUALITY_WINDOW = 512  # tokens per scored window: the held-out text's 1.6k tokens make 4 windows


def config(**overrides) -> EngineConfig:
    return EngineConfig(**{"dtype": "float32", "cache_block_seq_len": 16, "cpu_kv_cache_bytes": 256 * 2**20,
                           "session_len": 2048, **overrides})


@pytest.fixture(scope="module")
def real_pipe(real_model_path):
    pipe = pipeline(real_model_path, config())
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def hf_real(real_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(real_model_path), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 2
    return model


@pytest.mark.parametrize("prompt", [PLAIN, CHAT], ids=["plain", "chat"])
def test_real_model_greedy_tokens_equal_transformers_fp32(real_pipe, hf_real, prompt):
    ids = real_pipe.encode(prompt, apply_chat_template=isinstance(prompt, list))
    ours = real_pipe(prompt, greedy(48), apply_chat_template=isinstance(prompt, list)).token_ids
    assert ours == hf_greedy(hf_real, ids, 48)


def test_real_model_prompt_logits_match_transformers(real_pipe, hf_real):
    ids = real_pipe.encode(CHAT)
    ours = engine_prompt_logits(real_pipe, ids)
    with torch.no_grad():
        ref = hf_real(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)


def test_real_model_perplexity_equals_transformers(real_pipe, hf_real):
    text = heldout_text(2500)
    ours = perplexity(real_pipe, text, window=QUALITY_WINDOW)
    ids = real_pipe.tokenizer.encode(text, add_special_tokens=True)
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), QUALITY_WINDOW):
            chunk = torch.tensor([ids[start : start + QUALITY_WINDOW]])
            if chunk.shape[1] < 2:
                continue
            logprobs = torch.log_softmax(hf_real(chunk).logits[0, :-1].float(), -1)
            nll -= logprobs.gather(1, chunk[0, 1:, None]).sum().item()
            n += chunk.shape[1] - 1
    assert ours.num_tokens == n
    assert ours.ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert 5 < ours.ppl < 60, f"a trained model reads plain prose at a modest perplexity, got {ours.ppl:.2f}"


def test_real_model_score_is_chunked_exactly(real_model_path):
    """Scoring in 32-token chunks (later chunks read the earlier ones' KV from the paged cache) = one chunk."""
    import engine.llm_engine as llm_engine

    text = heldout_text(1200)
    with pipeline(real_model_path, config()) as pipe:
        whole = pipe.score(text, top_logprobs=3)
        old = llm_engine.SCORE_CHUNK_TOKENS
        llm_engine.SCORE_CHUNK_TOKENS = 32
        try:
            chunked = pipe.score(text, top_logprobs=3)
        finally:
            llm_engine.SCORE_CHUNK_TOKENS = old
    assert len(whole) > 100 and whole[0]["logprob"] is None
    assert [e["token_id"] for e in whole] == [e["token_id"] for e in chunked]
    for a, b in zip(whole[1:], chunked[1:]):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)
        assert a["top"][0][0] == b["top"][0][0]
        assert a["top"][0][1] >= a["logprob"] - 1e-5  # the best alternative is at least the actual token
    assert "".join(e["text"] for e in whole) == text


def test_real_model_chat_reply_stops_at_im_end_and_stream_equals_batch(real_pipe):
    gen = GenerationConfig(max_new_tokens=200, do_sample=False)
    batch = real_pipe(SEA, gen)
    streamed = list(real_pipe.stream(SEA, gen))
    assert batch.finish_reason == "stop", batch.text
    assert "<|im_end|>" not in batch.text and len(batch.text.split()) >= 5
    assert "".join(d.text for d in streamed) == batch.text
    assert streamed[-1].finish_reason == "stop"
    assert real_pipe.tokenizer.decode(batch.token_ids[-1:], skip_special_tokens=False) != "<|im_end|>" or \
        batch.text == real_pipe.tokenizer.decode(batch.token_ids, skip_special_tokens=True)
    capital = real_pipe("What is the capital of France?", gen)
    assert "Paris" in capital.text and capital.finish_reason == "stop"


def test_real_model_bf16_agreement_reported(real_model_path, hf_real):
    """bf16 drifts from fp32 within a few dozen tokens on both sides; the engine's bf16 and transformers' bf16
    start the same way. Reported, with a floor that catches a broken bf16 path."""
    from transformers import AutoModelForCausalLM

    hf16 = AutoModelForCausalLM.from_pretrained(str(real_model_path), dtype=torch.bfloat16).eval()
    hf16.generation_config.eos_token_id, hf16.generation_config.pad_token_id = None, 2
    with pipeline(real_model_path, config(dtype="bfloat16")) as pipe:
        ids = pipe.encode(CHAT)
        ours = pipe(CHAT, greedy(48)).token_ids
    ref16 = hf_greedy(hf16, ids, 48)
    ref32 = hf_greedy(hf_real, ids, 48)
    agree = greedy_agreement(ours, ref16)
    print(f"\nbf16 greedy agreement over 48 tokens: engine vs transformers bf16 {agree:.2f}, "
          f"engine bf16 vs fp32 {greedy_agreement(ours, ref32):.2f}, transformers bf16 vs fp32 "
          f"{greedy_agreement(ref16, ref32):.2f}")
    assert agree >= 8 / 48, (ours, ref16)  # a broken bf16 path (wrong rounding, wrong dtype) goes off at once


# Today's-scheme reference for the KL bound: one asymmetric (scale, min) per token and head, no rotation, measured
# with this test's windows at commit 90aca0a (fp32, CPU): mean KL 0.105 (+14.3% perplexity); int4 must stay at or
# below 0.4x that. The rotated, per-half scheme measures 0.027 (+2.6%); int8 (rotated) 0.00014 (+0.03%).
OLD_INT4_MEAN_KLD = 0.105


def kv_quality(pipe, base_logprobs, windows) -> tuple[float, float, float]:
    """(perplexity, mean KL(16-bit || pipe), p99 KL) over `windows` (token id lists) from full next-token
    distributions; base_logprobs: the 16-bit engine's log-softmax per window."""
    nll, kls, scored = 0.0, [], 0
    for ids, base in zip(windows, base_logprobs):
        logprobs = engine_prompt_logits(pipe, ids).float()[:-1].log_softmax(-1)
        nll -= logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        scored += len(ids) - 1
        kls.append((base.exp() * (base - logprobs)).sum(-1))
    kl = torch.cat(kls)
    return math.exp(nll / scored), kl.mean().item(), kl.quantile(0.99).item()


def test_real_model_kv_int8_int4_perplexity_within_bounds(real_model_path, real_pipe):
    """int8 KV: nearly identical perplexity and next-token choices (+0.5% at most); int4 KV (Hadamard-rotated halves,
    a (scale, min) pair and clipping ratio per half): within +4% perplexity and 0.4x today's scheme's mean KL
    divergence from the 16-bit model, on the held-out text in 512-token windows. Free-running greedy agreement over
    64 tokens is reported (one flip changes the rest)."""
    text = heldout_text()
    ids = real_pipe.tokenizer.encode(text, add_special_tokens=True)
    windows = [ids[s : s + QUALITY_WINDOW] for s in range(0, len(ids), QUALITY_WINDOW) if len(ids) - s >= 2]
    base_logprobs = [engine_prompt_logits(real_pipe, w).float()[:-1].log_softmax(-1) for w in windows]
    base_ppl, base_kl, _ = kv_quality(real_pipe, base_logprobs, windows)
    assert base_kl < 1e-9  # the same engine against itself
    assert base_ppl == pytest.approx(perplexity(real_pipe, text, window=QUALITY_WINDOW).ppl, rel=1e-4)
    probe = heldout_text(1500)
    base_top = real_pipe.score(probe, top_logprobs=1)
    base_tokens = real_pipe(SEA, greedy(64)).token_ids
    results = {}
    for policy in (8, 4):
        with pipeline(real_model_path, config(quant_policy=policy)) as pipe:
            ppl, kl, kl99 = kv_quality(pipe, base_logprobs, windows)
            top1 = top1_agreement(pipe.score(probe, top_logprobs=1), base_top)
            agree = greedy_agreement(pipe(SEA, greedy(64)).token_ids, base_tokens)
        results[policy] = (ppl, top1, kl)
        print(f"\nKV policy {policy}: perplexity {ppl:.3f} vs {base_ppl:.3f} ({(ppl / base_ppl - 1) * 100:+.2f}%), "
              f"KL divergence mean {kl:.5f} p99 {kl99:.4f}, teacher-forced top-1 agreement {top1:.3f}, "
              f"greedy agreement over 64 tokens {agree:.2f}")
    assert results[8][0] / base_ppl < 1.005
    assert 1.0 < results[4][0] / base_ppl < 1.04
    assert results[4][2] <= 0.4 * OLD_INT4_MEAN_KLD
    assert 0.0 < results[8][2] < results[4][2]
    assert results[8][1] >= 0.97
    assert results[8][1] > results[4][1] >= 0.8
