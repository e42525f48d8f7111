"""Batched sampling on the device: penalties, min-new-tokens, greedy / temperature / top-k / top-p / min-p.

Randomness comes from a counter-based hash of (request seed, step, token id), not from a global generator,
so a request's output depends only on its own seed: the same seed gives the same tokens whatever else is
in the batch, and a preempted request recomputed later draws the same numbers again. Drawing is an
exponential race (argmax p / E, E ~ Exp(1)), which samples exactly from p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer on int64 tensors; constants stay below 2**31 so products never overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def hashed_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B] int64 seeds and steps -> [B, vocab] uniforms in [2**-24, 1 - 2**-24], deterministic per (seed, step)."""
    row = _mix32(_mix32((seeds & _MASK32) ^ 0x2545F491) ^ (steps & _MASK32))  # [B]
    col = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    h = _mix32(_mix32(row[:, None] ^ col[None, :]) + 0x3C6EF372)  # [B, V]
    return ((h >> 8).clamp(1, (1 << 24) - 1)).float() * (1.0 / (1 << 24))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors (built by the model runner)."""

    temperatures: torch.Tensor  # [B] float, 0 = greedy
    top_ks: torch.Tensor  # [B] int, 0 = off
    top_ps: torch.Tensor  # [B] float
    min_ps: torch.Tensor  # [B] float
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64, generated tokens so far
    repetition_penalties: torch.Tensor | None = None  # [B]; None when all are 1
    presence_penalties: torch.Tensor | None = None
    frequency_penalties: torch.Tensor | None = None
    seen_ids: torch.Tensor | None = None  # [B, L] prompt + generated ids, padded with -1 (repetition)
    generated_ids: torch.Tensor | None = None  # [B, L] generated ids, padded with -1 (presence / frequency)
    banned_ids: torch.Tensor | None = None  # [B, K] ids to forbid this step (min_new_tokens), padded with -1
    all_greedy: bool = False
    any_top_k_top_p: bool = False  # host-side flags, so the sampler never syncs to ask the device
    any_min_p: bool = False
    num_logprobs: int = -1  # -1: none wanted; else top-k alternatives to return (max over rows)


def _scatter_mask(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] ids padded with -1 -> [B, V] counts."""
    counts = torch.zeros(ids.shape[0], vocab_size + 1, device=ids.device, dtype=torch.float32)
    counts.scatter_add_(1, torch.where(ids < 0, vocab_size, ids), torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    vocab = logits.shape[1]
    if b.repetition_penalties is not None:
        seen = _scatter_mask(b.seen_ids, vocab) > 0
        p = b.repetition_penalties[:, None]
        penalized = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(seen, penalized, logits)
    if b.presence_penalties is not None:
        counts = _scatter_mask(b.generated_ids, vocab)
        logits = logits - b.presence_penalties[:, None] * (counts > 0) - b.frequency_penalties[:, None] * counts
    if b.banned_ids is not None:
        banned = _scatter_mask(b.banned_ids, vocab) > 0
        logits = logits.masked_fill(banned, float("-inf"))
    return logits


def sample(logits: torch.Tensor, b: SamplingBatch):
    """logits [B, V] float32 -> (token ids [B] int64, logprob info or None)."""
    logits = apply_penalties(logits, b)
    logprob_info = None
    if b.num_logprobs >= 0:
        logprobs = torch.log_softmax(logits, dim=-1)
    greedy = logits.argmax(dim=-1)
    if b.all_greedy:
        tokens = greedy
    else:
        temps = b.temperatures.clamp_min(1e-5)[:, None]
        probs = torch.softmax(logits / temps, dim=-1)
        if b.any_top_k_top_p:
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            ranks = torch.arange(probs.shape[1], device=probs.device)[None, :]
            k = torch.where(b.top_ks > 0, b.top_ks, probs.shape[1])[:, None]
            cum_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop = (ranks >= k) | (cum_before >= b.top_ps[:, None])
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, sorted_idx, sorted_probs)
        if b.any_min_p:
            top = probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < b.min_ps[:, None] * top, 0.0)
        exp_noise = -torch.log(hashed_uniform(b.seeds, b.steps, probs.shape[1]))
        sampled = (probs / exp_noise).argmax(dim=-1)
        tokens = torch.where(b.temperatures > 0, sampled, greedy)
    if b.num_logprobs >= 0:
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        top_vals, top_ids = (logprobs.topk(b.num_logprobs, dim=-1) if b.num_logprobs > 0 else (None, None))
        logprob_info = (chosen, top_vals, top_ids)
    return tokens, logprob_info
