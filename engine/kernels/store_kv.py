"""Triton KV-cache write: new tokens' keys and values go to their paged slots, quantized on the fly.

Grid (tokens, 2): one program writes one token's keys (or values) for every kv head, so a decode step's few
tokens get K and V written in parallel. Cache layout and quantization are those documented at the top of
reference.py: quant_policy 8 stores uint8 codes, 4 packs two codes per byte as halves (byte j = element j low
nibble | element j + D/2 high nibble), each with a per-token, per-head (scale, min) pair: x ~= q * scale + min,
stored as [num_blocks, Hk, block_size, 2]. Caches are addressed through all four strides, so the token-minor
quantized V layout (head_dim stride = block_size) needs no special case. Head vectors are handled as two halves
throughout, which is exactly the int4 packing, and slot -1 is skipped.
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
    token,
    block_id,
    block_off,
    num_kv_heads,
    stride_xn,
    stride_xh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One token's [Hk, D] keys or values into an fp cache (no quantization)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_DH)
    mask_h = offs_h < num_kv_heads
    mask = mask_h[:, None] & (offs_d[None, :] < HALF_D)
    src = x_ptr + token * stride_xn + offs_h[:, None] * stride_xh + offs_d[None, :]  # [BLOCK_H, BLOCK_DH]
    x1 = tl.load(src, mask=mask, other=0.0)  # first half of each head vector
    x2 = tl.load(src + HALF_D, mask=mask, other=0.0)  # second half
    dst = cache_ptr + block_id * stride_cb + block_off * stride_cs + offs_h[:, None] * stride_ch
    dst += offs_d[None, :] * stride_cd  # [BLOCK_H, BLOCK_DH]
    tl.store(dst, x1.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF_D * stride_cd, x2.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_quantized_tile(
    x_ptr,
    cache_ptr,
    sz_ptr,
    slot_ptr,
    tile,
    head,
    num_tokens,
    stride_xn,
    stride_xh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    stride_szb,
    stride_szh,
    stride_szs,
    QUANT_POLICY: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """BLOCK_T tokens' vectors of one kv head: quantized per token, codes and (scale, min) stored."""
    QMAX: tl.constexpr = (1 << QUANT_POLICY) - 1
    rows = tl.arange(0, BLOCK_T)
    offs_t = tile * BLOCK_T + rows  # [BLOCK_T] token indices
    mask_t = offs_t < num_tokens
    slot = tl.load(slot_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64)
    valid = slot >= 0
    offs_d = tl.arange(0, BLOCK_DH)
    mask_d = offs_d < HALF_D
    mask = valid[:, None] & mask_d[None, :]
    src = x_ptr + offs_t[:, None].to(tl.int64) * stride_xn + head * stride_xh + offs_d[None, :]  # [BLOCK_T, BLOCK_DH]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # first half of each head vector
    x2 = tl.load(src + HALF_D, mask=mask, other=0.0).to(tl.float32)  # second half

    inf = float("inf")
    mn = tl.min(tl.minimum(tl.where(mask, x1, inf), tl.where(mask, x2, inf)), axis=1)  # [BLOCK_T]
    mx = tl.max(tl.maximum(tl.where(mask, x1, -inf), tl.where(mask, x2, -inf)), axis=1)
    mn = tl.where(valid, mn, 0.0)  # skipped tokens: keep the math finite
    mx = tl.where(valid, mx, 0.0)
    scale = tl.maximum(tl.math.div_rn(mx - mn, QMAX * 1.0), 1e-8)
    # one reciprocal per token instead of a division per element (a correctly rounded division is a branchy
    # instruction sequence); the product is within an ulp of the quotient, so a code can differ from
    # reference.quantize_kv only when (x - min) / scale lies within an ulp of a rounding tie
    inv = tl.math.div_rn(tl.full([BLOCK_T], 1.0, tl.float32), scale)
    q1 = tl.minimum(tl.maximum(_round_half_even((x1 - mn[:, None]) * inv[:, None]), 0.0), QMAX).to(tl.uint8)
    q2 = tl.minimum(tl.maximum(_round_half_even((x2 - mn[:, None]) * inv[:, None]), 0.0), QMAX).to(tl.uint8)
    if QUANT_POLICY == 4:
        q1 = q1 | (q2 << 4)

    # A tile of consecutive slots inside one block (a prompt's tokens) is written through addresses the compiler
    # sees as contiguous along tokens, so the token-minor V cache gets whole runs of bytes per row, not a byte
    # per token scattered by the block size; any other tile (a decode batch, padding) scatters token by token.
    slot0 = tl.load(slot_ptr + tile * BLOCK_T).to(tl.int64)
    off0 = slot0 % BLOCK_SIZE
    scattered = tl.sum(tl.where(mask_t & (slot != slot0 + rows), 1, 0), axis=0)
    # (Each branch has its own names: a value assigned in both would be merged, and with it what the compiler knows.)
    if (scattered == 0) & (slot0 >= 0) & (off0 + BLOCK_T <= BLOCK_SIZE):
        run = off0 + rows  # [BLOCK_T] consecutive offsets inside block slot0 // BLOCK_SIZE
        run_dst = cache_ptr + (slot0 // BLOCK_SIZE) * stride_cb + head * stride_ch + run[:, None] * stride_cs
        run_sz = sz_ptr + (slot0 // BLOCK_SIZE) * stride_szb + head * stride_szh + run * stride_szs
        _store_codes(run_dst + offs_d[None, :] * stride_cd, run_sz, q1, q2, scale, mn, mask, valid, stride_cd,
                     QUANT_POLICY, HALF_D)
    else:
        rows_at = (slot // BLOCK_SIZE) * stride_cb + head * stride_ch + (slot % BLOCK_SIZE) * stride_cs  # [BLOCK_T]
        pairs_at = (slot // BLOCK_SIZE) * stride_szb + head * stride_szh + (slot % BLOCK_SIZE) * stride_szs
        _store_codes(cache_ptr + rows_at[:, None] + offs_d[None, :] * stride_cd, sz_ptr + pairs_at, q1, q2, scale,
                     mn, mask, valid, stride_cd, QUANT_POLICY, HALF_D)


@triton.jit
def _store_codes(dst, sz, q1, q2, scale, mn, mask, valid, stride_cd, QUANT_POLICY: tl.constexpr, HALF_D: tl.constexpr):
    tl.store(dst, q1, mask=mask)
    if QUANT_POLICY == 8:
        tl.store(dst + HALF_D * stride_cd, q2, mask=mask)
    tl.store(sz, scale.to(sz.dtype.element_ty), mask=valid)
    tl.store(sz + 1, mn.to(sz.dtype.element_ty), mask=valid)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    num_kv_heads,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    BLOCK_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """fp caches: grid (tokens, 2), one token's keys (or values) of every kv head per program."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    block_id = slot // BLOCK_SIZE
    block_off = slot % BLOCK_SIZE
    if tl.program_id(1) == 0:  # K and V in separate programs: a decode step's few tokens are latency-bound
        _store_heads(k_ptr, k_cache_ptr, token, block_id, block_off, num_kv_heads, stride_kn, stride_kh,
                     stride_kcb, stride_kcs, stride_kch, stride_kcd, HALF_D, BLOCK_DH, BLOCK_H)
    else:
        _store_heads(v_ptr, v_cache_ptr, token, block_id, block_off, num_kv_heads, stride_vn, stride_vh,
                     stride_vcb, stride_vcs, stride_vch, stride_vcd, HALF_D, BLOCK_DH, BLOCK_H)


@triton.jit
def _store_quantized_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_sz_ptr,
    v_sz_ptr,
    slot_ptr,
    num_tokens,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    stride_kszb,
    stride_kszh,
    stride_kszs,
    stride_vszb,
    stride_vszh,
    stride_vszs,
    QUANT_POLICY: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Quantized caches: grid (token tiles, 2, kv heads), BLOCK_T tokens' keys (or values) of one head per program."""
    tile = tl.program_id(0)
    head = tl.program_id(2)
    if tl.program_id(1) == 0:
        _store_quantized_tile(k_ptr, k_cache_ptr, k_sz_ptr, slot_ptr, tile, head, num_tokens, stride_kn, stride_kh,
                              stride_kcb, stride_kcs, stride_kch, stride_kcd, stride_kszb, stride_kszh, stride_kszs,
                              QUANT_POLICY, BLOCK_SIZE, HALF_D, BLOCK_DH, BLOCK_T)
    else:
        _store_quantized_tile(v_ptr, v_cache_ptr, v_sz_ptr, slot_ptr, tile, head, num_tokens, stride_vn, stride_vh,
                              stride_vcb, stride_vcs, stride_vch, stride_vcd, stride_vszb, stride_vszh, stride_vszs,
                              QUANT_POLICY, BLOCK_SIZE, HALF_D, BLOCK_DH, BLOCK_T)


def store_kv(
    k: torch.Tensor,  # [N, Hk, D]
    v: torch.Tensor,  # [N, Hk, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D or D // 2]
    v_cache: torch.Tensor,  # same shape; quantized: may be token-minor (reference.py)
    slot_mapping: torch.Tensor,  # [N] int, -1 = skip
    k_scale_zero: torch.Tensor | None = None,  # [num_blocks, Hk, block_size, 2]
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
    assert k_cache.stride(-1) == 1, "k cache head_dim must be contiguous"
    assert v_cache.stride(-1) == 1 or (quant_policy and v_cache.stride(1) == 1), "v cache: head_dim or token-minor"
    assert k_cache.shape[:2] == v_cache.shape[:2], "k and v caches must have the same blocks"
    if quant_policy:
        assert k_cache.dtype == torch.uint8 and v_cache.dtype == torch.uint8, "quantized caches are uint8"
        for sz in (k_scale_zero, v_scale_zero):
            nb, bs, hk = k_cache.shape[:3]
            assert sz is not None and sz.shape == (nb, hk, bs, 2), "scale_zero must be [nb, Hk, block_size, 2]"
            assert sz.stride(-1) == 1, "scale_zero last dim must be contiguous"
    if num_tokens == 0:
        return
    half_d = head_dim // 2
    strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride(), *v_cache.stride())
    if not quant_policy:
        _store_kv_kernel[(num_tokens, 2)](
            k, v, k_cache, v_cache, slot_mapping, num_kv_heads, *strides,
            BLOCK_SIZE=k_cache.shape[1],
            HALF_D=half_d,
            BLOCK_DH=triton.next_power_of_2(half_d),
            BLOCK_H=triton.next_power_of_2(num_kv_heads),
            num_warps=4,
        )
        return
    block_t = 32 if k.is_cuda else 16  # interpreter: small tiles, so the CPU tests cross them
    _store_quantized_kernel[(triton.cdiv(num_tokens, block_t), 2, num_kv_heads)](
        k, v, k_cache, v_cache, k_scale_zero, v_scale_zero, slot_mapping, num_tokens, *strides,
        *k_scale_zero.stride()[:3], *v_scale_zero.stride()[:3],
        QUANT_POLICY=quant_policy,
        BLOCK_SIZE=k_cache.shape[1],
        HALF_D=half_d,
        BLOCK_DH=triton.next_power_of_2(half_d),
        BLOCK_T=block_t,
        num_warps=4,
    )
