"""The paged KV cache's layout as the kernels read and write it (reference.py's layouts), shared by store, decode
and prefill: the launchers' input checks, the (scale, min) pairs of a quantized cache read as one int per token and
half, and the Hadamard rotation of head vectors held as two halves (rotate_halves).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.reference import KV_CLIP_RATIOS, KV_GROUPS, kv_rotates

LOG2E = 1.4426950408889634
CLIP_DENOM = 40  # int4 clipping ratios (CLIP_DENOM - i) / CLIP_DENOM, i < len(KV_CLIP_RATIOS[4]): the kernel's formula
assert all(KV_CLIP_RATIOS[bits] == tuple((CLIP_DENOM - i) / CLIP_DENOM for i in range(len(KV_CLIP_RATIOS[bits])))
           for bits in (4, 8))


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


@triton.jit
def hadamard_signs(HALF_D: tl.constexpr, VARIANT: tl.constexpr = 0):
    """[HALF_D, HALF_D] fp32 Sylvester Hadamard signs (-1)^popcount(i & j), made in registers (HALF_D a power of
    two <= 128). VARIANT 1 computes the same matrix as ((i | HALF_D) & j): a kernel that needs the signs before and
    after its main loop uses one variant each, so the compiler cannot merge them into one value kept in registers
    through the loop."""
    i = tl.arange(0, HALF_D)
    if VARIANT:
        b = (i[:, None] | HALF_D) & i[None, :]
    else:
        b = i[:, None] & i[None, :]
    b = b ^ (b >> 4)
    b = b ^ (b >> 2)
    b = b ^ (b >> 1)
    return 1.0 - 2.0 * (b & 1).to(tl.float32)


@triton.jit
def rotate_halves(x1, x2, rot_scale, HALF_D: tl.constexpr, PRECISION: tl.constexpr):
    """Halves (x1, x2) [M, HALF_D] fp32 of vectors x -> the halves of x @ reference.hadamard(2 HALF_D), which is
    [[A, A], [A, -A]] with A = signs * rot_scale (rot_scale = 1 / sqrt(2 HALF_D)): (x1 A + x2 A, x1 A - x2 A).
    Inputs that are 16-bit values are exact in tf32, so PRECISION "tf32" then loses nothing (fp32 accumulation)."""
    signs = hadamard_signs(HALF_D)
    a = tl.dot(x1, signs, input_precision=PRECISION)
    b = tl.dot(x2, signs, input_precision=PRECISION)
    return (a + b) * rot_scale, (a - b) * rot_scale


@triton.jit
def rotate_halves_fp16(x1, x2, rot_scale, HALF_D: tl.constexpr, RESIDUAL: tl.constexpr, VARIANT: tl.constexpr):
    """rotate_halves on fp16 tensor-core dots (fp32 results): the signs are exact in fp16 and the dots accumulate in
    fp32. Without RESIDUAL the inputs are taken as fp16 (exact for fp16 values; the decode kernel's dots round q to
    fp16 anyway). With RESIDUAL fp32 inputs are split into an fp16 part and its fp16 residual (|r| <= 2^-11 |x|),
    which keeps about fp32 accuracy (2^-22) for values within fp16's range (normalized attention outputs); the fp32
    FMA dot of rotate_halves "ieee" would need far more registers. VARIANT: hadamard_signs'."""
    signs = hadamard_signs(HALF_D, VARIANT).to(tl.float16)
    a1 = x1.to(tl.float16)
    a2 = x2.to(tl.float16)
    if RESIDUAL:
        y1 = tl.dot((x1 - a1.to(tl.float32)).to(tl.float16), signs)
        y1 = tl.dot(a1, signs, y1)
        y2 = tl.dot((x2 - a2.to(tl.float32)).to(tl.float16), signs)
        y2 = tl.dot(a2, signs, y2)
    else:
        y1 = tl.dot(a1, signs)
        y2 = tl.dot(a2, signs)
    return (y1 + y2) * rot_scale, (y1 - y2) * rot_scale


def rotation_args(head_dim: int, quant_policy: int) -> tuple[bool, float]:
    """(ROTATE, rot_scale) for a launch: quantized caches of a head_dim reference.kv_rotates hold rotated vectors."""
    rotate = bool(quant_policy) and kv_rotates(head_dim)
    return rotate, head_dim**-0.5


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
        check_scale_zero(scale_zero, cache, quant_policy)


def check_scale_zero(scale_zero, cache, quant_policy):
    nb, bs, hk = cache.shape[:3]
    groups = KV_GROUPS[quant_policy]
    assert scale_zero is not None and scale_zero.shape == (nb, hk, groups, bs, 2), \
        f"scale_zero: [nb, Hk, {groups}, block_size, 2]"
    assert scale_zero.stride(-1) == 1, "scale_zero last dim must be contiguous"


def group_stride(scale_zero: torch.Tensor) -> int:
    """The stride from the first half's (scale, min) group to the second half's: 0 when one group serves both."""
    return scale_zero.stride(2) if scale_zero.shape[2] == 2 else 0


def as_pairs(scale_zero: torch.Tensor) -> torch.Tensor:
    """[nb, Hk, G, bs, 2] fp16 / fp32 -> the same bytes as [nb, Hk, G, bs] int32 / int64, one (scale, min) pair
    each."""
    pairs = scale_zero.view(torch.int32 if scale_zero.element_size() == 2 else torch.int64)[..., 0]
    assert pairs.stride(3) == 1, "scale_zero: a block's pairs for one head and group must be contiguous"
    return pairs
