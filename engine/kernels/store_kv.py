"""Triton KV-cache write: new tokens' keys and values go to their paged slots, quantized on the fly.

One program writes one token (every kv head, both K and V). Cache layout and quantization are those documented
at the top of reference.py: quant_policy 8 stores uint8 codes, 4 packs two codes per byte as halves (byte j =
element j low nibble | element j + D/2 high nibble), each with a per-token, per-head (scale, min) pair:
x ~= q * scale + min.
Head vectors are handled as two halves throughout, which is exactly the int4 packing, and slot -1 is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    """torch.round semantics (ties to even) without libdevice, which the interpreter lacks."""
    r = tl.floor(x + 0.5)
    is_tie = (r - x) == 0.5
    is_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(is_tie & is_odd, r - 1.0, r)


@triton.jit
def _quantize(x, scale, mn, QMAX: tl.constexpr):
    """x: [BLOCK_H, BLOCK_DH] fp32, scale/mn: [BLOCK_H] -> codes in [0, QMAX] as uint8."""
    q = _round_half_even(tl.math.div_rn(x - mn[:, None], scale[:, None]))
    return tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.uint8)


@triton.jit
def _store_heads(
    x_ptr,
    cache_ptr,
    sz_ptr,
    token,
    block_id,
    block_off,
    num_kv_heads,
    stride_xn,
    stride_xh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_szb,
    stride_szs,
    stride_szh,
    QUANT_POLICY: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_DH)
    mask_h = offs_h < num_kv_heads
    mask = mask_h[:, None] & (offs_d[None, :] < HALF_D)
    src = x_ptr + token * stride_xn + offs_h[:, None] * stride_xh + offs_d[None, :]  # [BLOCK_H, BLOCK_DH]
    x1 = tl.load(src, mask=mask, other=0.0)  # first half of each head vector
    x2 = tl.load(src + HALF_D, mask=mask, other=0.0)  # second half
    dst = cache_ptr + block_id * stride_cb + block_off * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]

    if QUANT_POLICY == 0:
        tl.store(dst, x1.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF_D, x2.to(cache_ptr.dtype.element_ty), mask=mask)
    else:
        QMAX: tl.constexpr = (1 << QUANT_POLICY) - 1
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        mn = tl.min(tl.minimum(tl.where(mask, x1, float("inf")), tl.where(mask, x2, float("inf"))), axis=1)
        mx = tl.max(tl.maximum(tl.where(mask, x1, -float("inf")), tl.where(mask, x2, -float("inf"))), axis=1)
        mn = tl.where(mask_h, mn, 0.0)  # padding heads: keep the math finite
        mx = tl.where(mask_h, mx, 0.0)
        scale = tl.maximum(tl.math.div_rn(mx - mn, QMAX * 1.0), 1e-8)  # [BLOCK_H]
        q1 = _quantize(x1, scale, mn, QMAX)
        q2 = _quantize(x2, scale, mn, QMAX)
        if QUANT_POLICY == 4:
            tl.store(dst, q1 | (q2 << 4), mask=mask)
        else:
            tl.store(dst, q1, mask=mask)
            tl.store(dst + HALF_D, q2, mask=mask)
        sz = sz_ptr + block_id * stride_szb + block_off * stride_szs + offs_h * stride_szh  # [BLOCK_H]
        tl.store(sz, scale.to(sz_ptr.dtype.element_ty), mask=mask_h)
        tl.store(sz + 1, mn.to(sz_ptr.dtype.element_ty), mask=mask_h)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_sz_ptr,
    v_sz_ptr,
    slot_ptr,
    num_kv_heads,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_kszb,
    stride_kszs,
    stride_kszh,
    stride_vszb,
    stride_vszs,
    stride_vszh,
    QUANT_POLICY: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    block_id = slot // BLOCK_SIZE
    block_off = slot % BLOCK_SIZE
    _store_heads(k_ptr, k_cache_ptr, k_sz_ptr, token, block_id, block_off, num_kv_heads,
                 stride_kn, stride_kh, stride_kcb, stride_kcs, stride_kch, stride_kszb, stride_kszs, stride_kszh,
                 QUANT_POLICY, HALF_D, BLOCK_DH, BLOCK_H)
    _store_heads(v_ptr, v_cache_ptr, v_sz_ptr, token, block_id, block_off, num_kv_heads,
                 stride_vn, stride_vh, stride_vcb, stride_vcs, stride_vch, stride_vszb, stride_vszs, stride_vszh,
                 QUANT_POLICY, HALF_D, BLOCK_DH, BLOCK_H)


def store_kv(
    k: torch.Tensor,  # [N, Hk, D]
    v: torch.Tensor,  # [N, Hk, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D or D // 2]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [N] int, -1 = skip
    k_scale_zero: torch.Tensor | None = None,  # [num_blocks, block_size, Hk, 2]
    v_scale_zero: torch.Tensor | None = None,
    quant_policy: int = 0,
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    assert quant_policy in (0, 4, 8), f"quant_policy must be 0, 4 or 8, got {quant_policy}"
    assert v.shape == k.shape and head_dim % 2 == 0, "k and v must both be [N, Hk, D] with even D"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.is_contiguous(), "slot_mapping must be [N]"
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "head_dim of k and v must be contiguous"
    stored_dim = head_dim // 2 if quant_policy == 4 else head_dim
    for cache in (k_cache, v_cache):
        assert cache.dim() == 4 and cache.shape[2:] == (num_kv_heads, stored_dim), "bad cache shape"
        assert cache.stride(-1) == 1, "cache head_dim must be contiguous"
    assert k_cache.shape[:2] == v_cache.shape[:2], "k and v caches must have the same blocks"
    if quant_policy:
        assert k_cache.dtype == torch.uint8 and v_cache.dtype == torch.uint8, "quantized caches are uint8"
        for sz in (k_scale_zero, v_scale_zero):
            assert sz is not None and sz.shape == (*k_cache.shape[:3], 2), "scale_zero must be [nb, bs, Hk, 2]"
            assert sz.stride(-1) == 1, "scale_zero last dim must be contiguous"
    else:
        k_scale_zero, v_scale_zero = k_cache, v_cache  # unused placeholders (QUANT_POLICY=0)
    if num_tokens == 0:
        return
    half_d = head_dim // 2
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        k_scale_zero,
        v_scale_zero,
        slot_mapping,
        num_kv_heads,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_scale_zero.stride(0),
        k_scale_zero.stride(1),
        k_scale_zero.stride(2),
        v_scale_zero.stride(0),
        v_scale_zero.stride(1),
        v_scale_zero.stride(2),
        QUANT_POLICY=quant_policy,
        BLOCK_SIZE=k_cache.shape[1],
        HALF_D=half_d,
        BLOCK_DH=triton.next_power_of_2(half_d),
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )
