"""Triton RMSNorm with an optional fused residual add (the twin of reference.rms_norm).

Takes part in programmatic dependent launch (pdl.py). One program normalizes one row: x (+ residual) is added
in the model dtype (so residual_out matches the unfused add bit for bit), the mean of squares is taken in fp32,
and the result is scaled by `weight`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import launch_options, release_next, wait_for_previous


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    eps,
    hidden,
    stride_xn,
    stride_resn,
    stride_outn,
    stride_res_outn,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < hidden
    w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # a weight: before the wait (PDL)
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)

    x = tl.load(x_ptr + row * stride_xn + offs_d, mask=mask_d, other=0.0)  # [BLOCK_D]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_resn + offs_d, mask=mask_d, other=0.0)
        x = x + res.to(x.dtype)  # rounded to the model dtype, as the unfused add would be
        tl.store(res_out_ptr + row * stride_res_outn + offs_d, x, mask=mask_d)

    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    out = xf * rstd * w
    tl.store(out_ptr + row * stride_outn + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x: [..., hidden], weight: [hidden]; with `residual` (same shape as x) returns (normed, x + residual)."""
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.stride(0) == 1, "weight must be a contiguous [hidden] vector"
    assert x.stride(-1) == 1, "the hidden dim of x must be contiguous"
    x2d = x.reshape(-1, hidden)  # [num_tokens, hidden]
    num_tokens = x2d.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2d = out.view(-1, hidden)

    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1, "residual must match x"
        res2d = residual.reshape(-1, hidden)
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res_out2d = res_out.view(-1, hidden)
    else:
        res2d, res_out2d = x2d, out2d  # unused placeholders (HAS_RESIDUAL=False)

    if num_tokens > 0:
        block_d = triton.next_power_of_2(hidden)
        num_warps = min(max(block_d // 256, 1), 16)  # ~8 fp32 per thread; hidden 4096 -> 16 warps
        _rms_norm_kernel[(num_tokens,)](
            x2d,
            res2d,
            weight,
            out2d,
            res_out2d,
            eps,
            hidden,
            x2d.stride(0),
            res2d.stride(0),
            out2d.stride(0),
            res_out2d.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK_D=block_d,
            num_warps=num_warps,
            **launch_options(x),
        )
    return out if residual is None else (out, res_out)
