"""Triton KV-cache write: new tokens' keys and values go to their paged slots, quantized on the fly; with rotary
position embedding optionally fused in (rotary_store_kv).

Grid (tokens, 2): one program writes one token's keys (or values) for every kv head, so a decode step's few
tokens get K and V written in parallel. Cache layout and quantization are those documented at the top of
reference.py: quantized vectors are first rotated by the Hadamard matrix of head_dim (when reference.kv_rotates; a
pair of tensor-core dots with a sign matrix made in registers, paged_kv.rotate_halves*); quant_policy 8 stores uint8
codes with one (scale, min) pair per token and head, 4 packs two codes per byte as halves (byte j = element j low
nibble | element j + D/2 high nibble) with a pair per half, each half's clipping ratio picked by squared error (a
loop over reference.KV_CLIP_RATIOS): x ~= q * scale + min, pairs stored as [num_blocks, Hk, G, block_size, 2].
Caches are addressed through all four strides, so the token-minor quantized V layout (head_dim stride = block_size)
needs no special case. Head vectors are handled as two halves throughout, which is exactly the int4 packing, and
slot -1 is skipped.

rotary_store_kv is rotary.apply_rotary followed by store_kv in one launch (ROPE=True), one kernel fewer per decoder
layer. Rotate-half RoPE works on the same two halves, so it slots in between the loads and the stores: the key
programs rotate in fp32 (rotary.rotate_half, the very expression apply_rotary rounds), round to the model dtype as
apply_rotary's in-place write would, and only then store or quantize, so the cache holds what the two ops write (bit
for bit under the interpreter; compiled, FMA contraction may differ in the last bit). k itself is not written back
(nothing reads it after the cache). The grid's second axis gets a third index whose programs rotate q in place for
the attention kernel that follows: every token, padding slots included, as apply_rotary does. Queries need no slot,
so these programs run beside the key and value ones instead of lengthening them: fp caches, one program per token
rotates all its q heads (rotary.rotate_heads, apply_rotary's own code); quantized caches, one program per token tile
and kv head rotates the q heads of that head's GQA group, tiled like the key and value programs.

Both kernels take part in programmatic dependent launch (pdl.py): everything they read (q, k, v: the qkv
projection's output) comes from the previous kernel, so they wait for it first thing and release the next one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.paged_kv import (
    CLIP_DENOM,
    check_scale_zero,
    group_stride,
    rotate_halves,
    rotate_halves_fp16,
    rotation_args,
)
from engine.kernels.pdl import launch_options, release_next, wait_for_previous
from engine.kernels.reference import KV_CLIP_RATIOS, KV_GROUPS
from engine.kernels.rotary import rotate_half, rotate_heads

_CLIP_DENOM = tl.constexpr(CLIP_DENOM)


@triton.jit
def _round_half_even(x):
    """torch.round semantics (ties to even) without libdevice, which the interpreter lacks."""
    r = tl.floor(x + 0.5)
    is_tie = (r - x) == 0.5
    is_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(is_tie & is_odd, r - 1.0, r)


@triton.jit
def _store_heads(
    x_ptr,
    cache_ptr,
    cos_ptr,
    sin_ptr,
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
    stride_cosn,
    stride_sinn,
    ROPE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One token's [Hk, D] keys or values into an fp cache (no quantization). ROPE: rotated first by the token's
    cos/sin ([N, D/2] fp32) and rounded to x's dtype, the value apply_rotary would have left in x."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_DH)
    mask_h = offs_h < num_kv_heads
    mask = mask_h[:, None] & (offs_d[None, :] < HALF_D)
    src = x_ptr + token * stride_xn + offs_h[:, None] * stride_xh + offs_d[None, :]  # [BLOCK_H, BLOCK_DH]
    x1 = tl.load(src, mask=mask, other=0.0)  # first half of each head vector
    x2 = tl.load(src + HALF_D, mask=mask, other=0.0)  # second half
    if ROPE:
        mask_d = offs_d < HALF_D
        cos = tl.load(cos_ptr + token * stride_cosn + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_DH]
        sin = tl.load(sin_ptr + token * stride_sinn + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        r1, r2 = rotate_half(x1.to(tl.float32), x2.to(tl.float32), cos[None, :], sin[None, :])
        x1 = r1.to(x_ptr.dtype.element_ty)
        x2 = r2.to(x_ptr.dtype.element_ty)
    dst = cache_ptr + block_id * stride_cb + block_off * stride_cs + offs_h[:, None] * stride_ch
    dst += offs_d[None, :] * stride_cd  # [BLOCK_H, BLOCK_DH]
    tl.store(dst, x1.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF_D * stride_cd, x2.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_range(x, mask, valid):
    """x: [BLOCK_T, BLOCK_DH] fp32 -> (min, max) per row over `mask` (0 for skipped tokens: the math stays finite)."""
    inf = float("inf")
    mn = tl.min(tl.where(mask, x, inf), axis=1)  # [BLOCK_T]
    mx = tl.max(tl.where(mask, x, -inf), axis=1)
    return tl.where(valid, mn, 0.0), tl.where(valid, mx, 0.0)


@triton.jit
def _quantize_half(x, mn0, mx0, mask, QMAX: tl.constexpr, NUM_CLIPS: tl.constexpr):
    """x: [BLOCK_T, BLOCK_DH] fp32 halves of BLOCK_T vectors, their group's range (mn0, mx0) -> (codes uint8, scale,
    min) per row: the clipping ratio (CLIP_DENOM - i) / CLIP_DENOM (paged_kv.py), i < NUM_CLIPS, with the smallest
    squared error (the first on a tie), as reference.quantize_kv picks it (NUM_CLIPS > 1: one group per half)."""
    inf = float("inf")
    if NUM_CLIPS == 1:
        mn = mn0
        scale = tl.maximum(tl.math.div_rn(mx0 - mn0, QMAX * 1.0), 1e-8)
    else:
        best_err = tl.full(mn0.shape, inf, tl.float32)
        mn = mn0
        scale = tl.full(mn0.shape, 1.0, tl.float32)
        for i in range(NUM_CLIPS):  # a loop, not unrolled: fewer live registers
            # correctly rounded, so the very fp32 numbers of the reference's ratios (checked for these)
            denom = tl.full(mn0.shape, _CLIP_DENOM, tl.float32)
            ratio = tl.math.div_rn(denom - i, denom)
            c_mn = mn0 * ratio
            c_scale = tl.maximum(tl.math.div_rn(mx0 * ratio - c_mn, QMAX * 1.0), 1e-8)
            c_inv = tl.math.div_rn(tl.full(mn0.shape, 1.0, tl.float32), c_scale)
            q = tl.minimum(tl.maximum(_round_half_even((x - c_mn[:, None]) * c_inv[:, None]), 0.0), QMAX)
            d = q * c_scale[:, None] + c_mn[:, None] - x
            err = tl.sum(tl.where(mask, d * d, 0.0), axis=1)
            better = err < best_err
            best_err = tl.where(better, err, best_err)
            mn = tl.where(better, c_mn, mn)
            scale = tl.where(better, c_scale, scale)
    # one reciprocal per token instead of a division per element (a correctly rounded division is a branchy
    # instruction sequence); the product is within an ulp of the quotient, so a code can differ from
    # reference.quantize_kv only when (x - min) / scale lies within an ulp of a rounding tie
    inv = tl.math.div_rn(tl.full(mn0.shape, 1.0, tl.float32), scale)
    q = tl.minimum(tl.maximum(_round_half_even((x - mn[:, None]) * inv[:, None]), 0.0), QMAX).to(tl.uint8)
    return q, scale, mn


@triton.jit
def _store_quantized_tile(
    x_ptr,
    cache_ptr,
    sz_ptr,
    slot_ptr,
    cos_ptr,
    sin_ptr,
    tile,
    head,
    num_tokens,
    rot_scale,
    stride_xn,
    stride_xh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    stride_szb,
    stride_szh,
    stride_szg,
    stride_szs,
    stride_cosn,
    stride_sinn,
    ROPE: tl.constexpr,
    ROTATE: tl.constexpr,
    QUANT_POLICY: tl.constexpr,
    GROUPS: tl.constexpr,
    NUM_CLIPS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """BLOCK_T tokens' vectors of one kv head: rotated (ROTATE), quantized per token and half, codes and (scale,
    min) pairs stored. ROPE: the vectors are RoPE-rotated first and rounded to x's dtype, so the codes are those of
    the rotated, stored-back k."""
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
    if ROPE:
        cos, sin = _load_cos_sin(cos_ptr, sin_ptr, offs_t, offs_d, mask, stride_cosn, stride_sinn)
        r1, r2 = rotate_half(x1, x2, cos, sin)
        x1 = r1.to(x_ptr.dtype.element_ty).to(tl.float32)
        x2 = r2.to(x_ptr.dtype.element_ty).to(tl.float32)
    if ROTATE:  # BLOCK_DH == HALF_D here (reference.kv_rotates); x holds 16-bit values (or fp32: "ieee")
        if PRECISION == "fp16":
            x1, x2 = rotate_halves_fp16(x1, x2, rot_scale, HALF_D, False, 0)
        else:
            x1, x2 = rotate_halves(x1, x2, rot_scale, HALF_D, PRECISION)

    mn1, mx1 = _row_range(x1, mask, valid)
    mn2, mx2 = _row_range(x2, mask, valid)
    if GROUPS == 1:  # one (scale, min) for the whole vector
        mn1 = tl.minimum(mn1, mn2)
        mx1 = tl.maximum(mx1, mx2)
        mn2 = mn1
        mx2 = mx1
    q1, scale1, mn1 = _quantize_half(x1, mn1, mx1, mask, QMAX, NUM_CLIPS)
    q2, scale2, mn2 = _quantize_half(x2, mn2, mx2, mask, QMAX, NUM_CLIPS)
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
        _store_codes(run_dst + offs_d[None, :] * stride_cd, run_sz, q1, q2, scale1, mn1, scale2, mn2, mask, valid,
                     stride_cd, stride_szg, QUANT_POLICY, GROUPS, HALF_D)
    else:
        rows_at = (slot // BLOCK_SIZE) * stride_cb + head * stride_ch + (slot % BLOCK_SIZE) * stride_cs  # [BLOCK_T]
        pairs_at = (slot // BLOCK_SIZE) * stride_szb + head * stride_szh + (slot % BLOCK_SIZE) * stride_szs
        _store_codes(cache_ptr + rows_at[:, None] + offs_d[None, :] * stride_cd, sz_ptr + pairs_at, q1, q2, scale1,
                     mn1, scale2, mn2, mask, valid, stride_cd, stride_szg, QUANT_POLICY, GROUPS, HALF_D)


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, offs_t, offs_d, mask, stride_cosn, stride_sinn):
    """cos/sin of the tokens offs_t ([BLOCK_T]) as [BLOCK_T, BLOCK_DH] fp32 tiles."""
    rows = offs_t[:, None].to(tl.int64)
    cos = tl.load(cos_ptr + rows * stride_cosn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + rows * stride_sinn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotate_q_tile(
    q_ptr,
    cos_ptr,
    sin_ptr,
    tile,
    kv_head,
    num_tokens,
    q_per_kv,
    stride_qn,
    stride_qh,
    stride_cosn,
    stride_sinn,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Rotate in place the q heads that share kv head `kv_head` (its GQA group) for BLOCK_T tokens: the query
    programs of the quantized kernel, tiled like its key and value programs. cos/sin are loaded once per tile."""
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_DH)
    mask = (offs_t < num_tokens)[:, None] & (offs_d < HALF_D)[None, :]  # every token: padding slots too
    cos, sin = _load_cos_sin(cos_ptr, sin_ptr, offs_t, offs_d, mask, stride_cosn, stride_sinn)
    rows = q_ptr + offs_t[:, None].to(tl.int64) * stride_qn + offs_d[None, :]  # [BLOCK_T, BLOCK_DH]
    for i in range(q_per_kv):
        ptrs = rows + (kv_head * q_per_kv + i) * stride_qh
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + HALF_D, mask=mask, other=0.0).to(tl.float32)
        out1, out2 = rotate_half(x1, x2, cos, sin)
        tl.store(ptrs, out1.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(ptrs + HALF_D, out2.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_codes(dst, sz, q1, q2, scale1, mn1, scale2, mn2, mask, valid, stride_cd, stride_szg,
                 QUANT_POLICY: tl.constexpr, GROUPS: tl.constexpr, HALF_D: tl.constexpr):
    tl.store(dst, q1, mask=mask)
    if QUANT_POLICY == 8:
        tl.store(dst + HALF_D * stride_cd, q2, mask=mask)
    tl.store(sz, scale1.to(sz.dtype.element_ty), mask=valid)
    tl.store(sz + 1, mn1.to(sz.dtype.element_ty), mask=valid)
    if GROUPS == 2:
        tl.store(sz + stride_szg, scale2.to(sz.dtype.element_ty), mask=valid)
        tl.store(sz + stride_szg + 1, mn2.to(sz.dtype.element_ty), mask=valid)


@triton.jit
def _store_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    num_q_heads,
    num_kv_heads,
    stride_qn,
    stride_qh,
    stride_cosn,
    stride_sinn,
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
    ROPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """fp caches: grid (tokens, 2, or 3 with ROPE), one token's keys (axis 1 = 0, rotated with ROPE), values (1)
    or, with ROPE, queries (2, rotated in place) of every head per program."""
    wait_for_previous(USE_PDL)  # q, k, v are the previous kernel's output; nothing is written before this
    release_next(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    if which == 2:
        if ROPE:  # (launched only with ROPE; the constexpr keeps the code out of plain store_kv)
            offs_d = tl.arange(0, BLOCK_DH)
            mask_d = offs_d < HALF_D
            cos = tl.load(cos_ptr + token * stride_cosn + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + token * stride_sinn + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            rotate_heads(q_ptr, stride_qn, stride_qh, token, num_q_heads, cos, sin, offs_d, mask_d, HALF_D,
                          BLOCK_HQ)
    else:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:  # padding token (-1): nothing to store
            block_id = slot // BLOCK_SIZE
            block_off = slot % BLOCK_SIZE
            if which == 0:  # K and V in separate programs: a decode step's few tokens are latency-bound
                _store_heads(k_ptr, k_cache_ptr, cos_ptr, sin_ptr, token, block_id, block_off, num_kv_heads,
                             stride_kn, stride_kh, stride_kcb, stride_kcs, stride_kch, stride_kcd, stride_cosn,
                             stride_sinn, ROPE, HALF_D, BLOCK_DH, BLOCK_H)
            else:
                _store_heads(v_ptr, v_cache_ptr, cos_ptr, sin_ptr, token, block_id, block_off, num_kv_heads,
                             stride_vn, stride_vh, stride_vcb, stride_vcs, stride_vch, stride_vcd, stride_cosn,
                             stride_sinn, False, HALF_D, BLOCK_DH, BLOCK_H)


@triton.jit
def _store_quantized_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_sz_ptr,
    v_sz_ptr,
    slot_ptr,
    num_tokens,
    q_per_kv,
    rot_scale,
    stride_qn,
    stride_qh,
    stride_cosn,
    stride_sinn,
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
    stride_kszg,
    stride_kszs,
    stride_vszb,
    stride_vszh,
    stride_vszg,
    stride_vszs,
    ROPE: tl.constexpr,
    ROTATE: tl.constexpr,
    QUANT_POLICY: tl.constexpr,
    GROUPS: tl.constexpr,
    NUM_CLIPS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Quantized caches: grid (token tiles, 2, or 3 with ROPE, kv heads), BLOCK_T tokens' keys (axis 1 = 0,
    rotated with ROPE) or values (1) of one head per program; with ROPE, axis 1 = 2 rotates those tokens' q
    heads of that kv head's group in place."""
    wait_for_previous(USE_PDL)  # q, k, v are the previous kernel's output; nothing is written before this
    release_next(USE_PDL)
    tile = tl.program_id(0)
    which = tl.program_id(1)
    head = tl.program_id(2)
    if which == 0:
        _store_quantized_tile(k_ptr, k_cache_ptr, k_sz_ptr, slot_ptr, cos_ptr, sin_ptr, tile, head, num_tokens,
                              rot_scale, stride_kn, stride_kh, stride_kcb, stride_kcs, stride_kch, stride_kcd,
                              stride_kszb, stride_kszh, stride_kszg, stride_kszs, stride_cosn, stride_sinn, ROPE,
                              ROTATE, QUANT_POLICY, GROUPS, NUM_CLIPS, BLOCK_SIZE, HALF_D, BLOCK_DH, BLOCK_T,
                              PRECISION)
    elif which == 1:
        _store_quantized_tile(v_ptr, v_cache_ptr, v_sz_ptr, slot_ptr, cos_ptr, sin_ptr, tile, head, num_tokens,
                              rot_scale, stride_vn, stride_vh, stride_vcb, stride_vcs, stride_vch, stride_vcd,
                              stride_vszb, stride_vszh, stride_vszg, stride_vszs, stride_cosn, stride_sinn, False,
                              ROTATE, QUANT_POLICY, GROUPS, NUM_CLIPS, BLOCK_SIZE, HALF_D, BLOCK_DH, BLOCK_T,
                              PRECISION)
    else:
        if ROPE:  # (launched only with ROPE; the constexpr keeps the code out of plain store_kv)
            _rotate_q_tile(q_ptr, cos_ptr, sin_ptr, tile, head, num_tokens, q_per_kv, stride_qn, stride_qh,
                           stride_cosn, stride_sinn, HALF_D, BLOCK_DH, BLOCK_T)


def _check_kv(k, v, k_cache, v_cache, slot_mapping, k_scale_zero, v_scale_zero, quant_policy) -> None:
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
            check_scale_zero(sz, k_cache, quant_policy)


def _launch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale_zero, v_scale_zero, quant_policy) -> None:
    """Both ops' launch; q is None for plain store_kv (ROPE off: q, cos and sin stand in as unused k)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    half_d = head_dim // 2
    rope = q is not None
    if not rope:
        q, cos, sin = k, k, k
    rope_strides = (q.stride(0), q.stride(1), cos.stride(0), sin.stride(0))
    strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride(), *v_cache.stride())
    programs_per_tile = 3 if rope else 2  # keys, values (, queries)
    if not quant_policy:
        _store_kv_kernel[(num_tokens, programs_per_tile)](
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping, q.shape[1], num_kv_heads, *rope_strides, *strides,
            ROPE=rope,
            BLOCK_SIZE=k_cache.shape[1],
            HALF_D=half_d,
            BLOCK_DH=triton.next_power_of_2(half_d),
            BLOCK_H=triton.next_power_of_2(num_kv_heads),
            BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
            num_warps=4,
            **launch_options(q),
        )
        return
    block_t = 32 if k.is_cuda else 16  # interpreter: small tiles, so the CPU tests cross them
    rotate, rot_scale = rotation_args(head_dim, quant_policy)
    _store_quantized_kernel[(triton.cdiv(num_tokens, block_t), programs_per_tile, num_kv_heads)](
        q, k, v, cos, sin, k_cache, v_cache, k_scale_zero, v_scale_zero, slot_mapping, num_tokens,
        q.shape[1] // num_kv_heads, rot_scale, *rope_strides, *strides,
        *[s for sz in (k_scale_zero, v_scale_zero)
          for s in (sz.stride(0), sz.stride(1), group_stride(sz), sz.stride(3))],
        ROPE=rope,
        ROTATE=rotate,
        QUANT_POLICY=quant_policy,
        GROUPS=KV_GROUPS[quant_policy],
        NUM_CLIPS=len(KV_CLIP_RATIOS[quant_policy]),
        PRECISION={torch.float32: "ieee", torch.float16: "fp16"}.get(k.dtype, "tf32"),  # exact for 16-bit values
        BLOCK_SIZE=k_cache.shape[1],
        HALF_D=half_d,
        BLOCK_DH=triton.next_power_of_2(half_d),
        BLOCK_T=block_t,
        num_warps=4,
        **launch_options(q),
    )


def store_kv(
    k: torch.Tensor,  # [N, Hk, D]
    v: torch.Tensor,  # [N, Hk, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D or D // 2]
    v_cache: torch.Tensor,  # same shape; quantized: may be token-minor (reference.py)
    slot_mapping: torch.Tensor,  # [N] int, -1 = skip
    k_scale_zero: torch.Tensor | None = None,  # [num_blocks, Hk, G, block_size, 2]
    v_scale_zero: torch.Tensor | None = None,
    quant_policy: int = 0,
) -> None:
    _check_kv(k, v, k_cache, v_cache, slot_mapping, k_scale_zero, v_scale_zero, quant_policy)
    if k.shape[0]:
        _launch(None, k, v, None, None, k_cache, v_cache, slot_mapping, k_scale_zero, v_scale_zero, quant_policy)


def rotary_store_kv(
    q: torch.Tensor,  # [N, Hq, D], rotated in place
    k: torch.Tensor,  # [N, Hk, D], read only: the cache gets its rotation
    v: torch.Tensor,  # [N, Hk, D]
    cos: torch.Tensor,  # [N, D // 2] fp32, the step's positions (RotaryEmbedding.lookup)
    sin: torch.Tensor,  # [N, D // 2]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale_zero: torch.Tensor | None = None,
    v_scale_zero: torch.Tensor | None = None,
    quant_policy: int = 0,
) -> torch.Tensor:
    """apply_rotary(q, k, cos, sin) then store_kv(rotated k, v, ...) in one launch; returns q (rotated)."""
    _check_kv(k, v, k_cache, v_cache, slot_mapping, k_scale_zero, v_scale_zero, quant_policy)
    num_tokens, num_q_heads, head_dim = q.shape
    half_d = head_dim // 2
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim, "q/k shape mismatch"
    assert num_q_heads % k.shape[1] == 0, "q heads must be a multiple of kv heads"
    assert q.stride(-1) == 1, "head_dim of q must be contiguous"
    assert cos.shape == (num_tokens, half_d) and sin.shape == cos.shape, "cos/sin must be [N, D // 2]"
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1, "cos/sin last dim must be contiguous"
    if num_tokens:
        _launch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale_zero, v_scale_zero, quant_policy)
    return q
