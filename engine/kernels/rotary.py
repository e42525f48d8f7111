"""Triton rotate-half RoPE (the HF Llama convention), applied in place to q and k.

One program rotates every head of one token: q and k share that token's cos/sin, loaded once. The two halves
of each head are loaded separately (x1 = x[:D/2], x2 = x[D/2:]) and rotated in fp32:
    out1 = x1 * cos - x2 * sin,  out2 = x2 * cos + x1 * sin.
q and k may be strided views (e.g. slices of a fused qkv projection); they are written in place and returned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rotate_half(x1, x2, cos, sin):
    """The rotation itself, on fp32 halves (cos/sin broadcastable to them), shared with store_kv.py's fused
    rotary_store_kv (bit for bit the same under the interpreter; compiled, the two kernels may contract the
    multiply-adds into FMAs differently, a last-bit difference)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def rotate_heads(
    x_ptr,
    stride_xn,
    stride_xh,
    token,
    num_heads,
    cos,
    sin,
    offs_d,
    mask_d,
    HALF_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rotate the [num_heads, D] rows of one token in place; cos/sin: [BLOCK_DH] fp32."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < num_heads) & mask_d[None, :]
    ptrs = x_ptr + token * stride_xn + offs_h[:, None] * stride_xh + offs_d[None, :]  # [BLOCK_H, BLOCK_DH]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF_D, mask=mask, other=0.0).to(tl.float32)
    out1, out2 = rotate_half(x1, x2, cos[None, :], sin[None, :])
    tl.store(ptrs, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF_D, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    num_q_heads,
    num_kv_heads,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_cosn,
    stride_sinn,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_DH)
    mask_d = offs_d < HALF_D
    cos = tl.load(cos_ptr + token * stride_cosn + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_DH]
    sin = tl.load(sin_ptr + token * stride_sinn + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    rotate_heads(q_ptr, stride_qn, stride_qh, token, num_q_heads, cos, sin, offs_d, mask_d, HALF_D, BLOCK_HQ)
    rotate_heads(k_ptr, stride_kn, stride_kh, token, num_kv_heads, cos, sin, offs_d, mask_d, HALF_D, BLOCK_HK)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [N, Hq, D], k: [N, Hk, D], cos/sin: [N, D // 2]. Rotates q and k in place and returns (q, k)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half_d = head_dim // 2
    assert head_dim % 2 == 0 and k.shape == (num_tokens, num_kv_heads, head_dim), "q/k shape mismatch"
    assert cos.shape == (num_tokens, half_d) and sin.shape == cos.shape, "cos/sin must be [N, D // 2]"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "head_dim of q and k must be contiguous"
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1, "cos/sin last dim must be contiguous"
    if num_tokens == 0:
        return q, k
    block_dh = triton.next_power_of_2(half_d)
    _apply_rotary_kernel[(num_tokens,)](
        q,
        k,
        cos,
        sin,
        num_q_heads,
        num_kv_heads,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        HALF_D=half_d,
        BLOCK_DH=block_dh,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )
    return q, k
