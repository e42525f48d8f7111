"""Triton silu_and_mul: the gated-MLP activation silu(gate) * up over a fused [gate | up] projection output.

Computed in fp32 and rounded once to the input dtype (the reference rounds after silu and after the product,
so the two agree to about one ulp of the model dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import launch_options, release_next, wait_for_previous


@triton.jit
def silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    inter,
    stride_xn,
    stride_outn,
    BLOCK_I: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < inter

    gate = tl.load(x_ptr + row * stride_xn + offs_i, mask=mask_i, other=0.0).to(tl.float32)  # [BLOCK_I]
    up = tl.load(x_ptr + row * stride_xn + inter + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    out = silu(gate) * up
    tl.store(out_ptr + row * stride_outn + offs_i, out.to(out_ptr.dtype.element_ty), mask=mask_i)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * inter] -> [..., inter] = silu(x[..., :inter]) * x[..., inter:]."""
    assert x.shape[-1] % 2 == 0, "last dim must hold gate and up halves"
    assert x.stride(-1) == 1, "last dim of x must be contiguous"
    inter = x.shape[-1] // 2
    x2d = x.reshape(-1, 2 * inter)  # [num_tokens, 2 * inter]
    num_tokens = x2d.shape[0]
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    out2d = out.view(-1, inter)  # [num_tokens, inter]
    if num_tokens == 0 or inter == 0:
        return out
    block_i = min(triton.next_power_of_2(inter), 1024)  # 1024 columns per program: 4 warps x 8 elements
    grid = (num_tokens, triton.cdiv(inter, block_i))
    _silu_and_mul_kernel[grid](x2d, out2d, inter, x2d.stride(0), out2d.stride(0), BLOCK_I=block_i, num_warps=4,
                               **launch_options(x))
    return out
