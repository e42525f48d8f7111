"""The paged KV cache's layout as the attention kernels read it (reference.py's layouts), shared by decode and
prefill: the launchers' input checks, and the (scale, min) pairs of a quantized cache read as one int per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def split_pairs(pairs):
    """(scale, min) pairs stored as (fp16, fp16) / (fp32, fp32) and loaded as one int32 / int64 each -> two fp32
    tensors (little-endian: the scale is the low half)."""
    if pairs.dtype == tl.int32:
        scale = (pairs & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        mn = (pairs >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        scale = (pairs & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        mn = (pairs >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    return scale.to(tl.float32), mn.to(tl.float32)


def check_attention_inputs(q, k_cache, v_cache, k_scale_zero, v_scale_zero, block_tables, kv_lens, quant_policy):
    """The launcher asserts decode and prefill share (q: [tokens or B, Hq, D]; one kv_lens entry per sequence)."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    batch = kv_lens.shape[0]
    assert quant_policy in (0, 4, 8), f"quant_policy must be 0, 4 or 8, got {quant_policy}"
    assert num_q_heads % num_kv_heads == 0, "Hq must be a multiple of Hk"
    assert head_dim % 2 == 0 and q.stride(-1) == 1, "q: [N, Hq, D] with even, contiguous D"
    _check_cache(k_cache, k_scale_zero, num_kv_heads, head_dim, quant_policy)
    _check_cache(v_cache, v_scale_zero, num_kv_heads, head_dim, quant_policy, is_v=True)
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.stride(1) == 1
    assert kv_lens.dim() == 1 and kv_lens.is_contiguous(), "kv_lens must be a contiguous [B]"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"


def _check_cache(cache, scale_zero, num_kv_heads, head_dim, quant_policy, is_v=False):
    stored_dim = head_dim // 2 if quant_policy == 4 else head_dim
    assert cache.dim() == 4 and cache.shape[2:] == (num_kv_heads, stored_dim), f"bad cache shape {tuple(cache.shape)}"
    token_minor = is_v and quant_policy and cache.stride(1) == 1  # reference.py: the engine's quantized V layout
    assert cache.stride(-1) == 1 or token_minor, "cache head_dim must be contiguous (quantized V: or token-minor)"
    if quant_policy:
        assert cache.dtype == torch.uint8, "quantized caches are uint8"
        nb, bs, hk = cache.shape[:3]
        assert scale_zero is not None and scale_zero.shape == (nb, hk, bs, 2), "scale_zero: [nb, Hk, block_size, 2]"
        assert scale_zero.stride(-1) == 1, "scale_zero last dim must be contiguous"


def as_pairs(scale_zero: torch.Tensor) -> torch.Tensor:
    """[nb, Hk, bs, 2] fp16 / fp32 -> the same bytes as [nb, Hk, bs] int32 / int64, one (scale, min) pair each."""
    pairs = scale_zero.view(torch.int32 if scale_zero.element_size() == 2 else torch.int64)[..., 0]
    assert pairs.stride(2) == 1, "scale_zero: a block's pairs for one head must be contiguous"
    return pairs
