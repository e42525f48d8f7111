"""Paged attention layer and the per-step metadata every attention layer of a forward pass shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.kernels import ops


@dataclass
class AttentionMetadata:
    """What one forward pass's attention layers need, built once per step by the model runner."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    block_tables: torch.Tensor  # [batch, max_blocks] int32
    kv_lens: torch.Tensor  # [batch] cached tokens per sequence after this step's tokens are stored
    cu_seqlens_q: torch.Tensor | None = None  # [batch + 1] (prefill only)
    max_seqlen_q: int = 1


@dataclass
class KVCache:
    """One layer's paged cache (layout in engine/kernels/reference.py)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale_zero: torch.Tensor | None = None
    v_scale_zero: torch.Tensor | None = None
    quant_policy: int = 0


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.kv_cache: KVCache | None = None  # bound by the model runner after it allocates the cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim], not yet rotated;
        cos_sin: the step's RotaryEmbedding.lookup, applied here, fused into the cache write (one kernel: q is
        rotated in place, the rotated k goes straight to the cache)."""
        cache = self.kv_cache
        q = ops.rotary_store_kv(q, k, v, *cos_sin, cache.k, cache.v, meta.slot_mapping, cache.k_scale_zero,
                                cache.v_scale_zero, cache.quant_policy)
        if meta.is_prefill:
            return ops.paged_prefill_attention(q, cache.k, cache.v, meta.block_tables, meta.cu_seqlens_q,
                                               meta.kv_lens, self.scale, cache.k_scale_zero, cache.v_scale_zero,
                                               cache.quant_policy, meta.max_seqlen_q)
        return ops.paged_decode_attention(q, cache.k, cache.v, meta.block_tables, meta.kv_lens, self.scale,
                                          cache.k_scale_zero, cache.v_scale_zero, cache.quant_policy)
