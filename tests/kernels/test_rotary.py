"""rotary.py (apply_rotary, in place) against reference.apply_rotary, including strided views of a fused qkv."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.rotary import apply_rotary

from .conftest import DEVICE, requires_cuda
from .paged_utils import assert_close

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)


def _check(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, device):
    # q and k as views into one fused projection output, the way attention layers slice them
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, -1)
    v_before = qkv[:, (num_q_heads + num_kv_heads) * head_dim :].clone()
    angles = torch.rand(num_tokens, head_dim // 2, device=device) * 100
    cos, sin = angles.cos(), angles.sin()
    q_ref, k_ref = reference.apply_rotary(q.clone(), k.clone(), cos, sin)

    q_out, k_out = apply_rotary(q, k, cos, sin)
    atol, rtol = TOLERANCE[dtype]
    assert_close(q_out, q_ref, atol, rtol)
    assert_close(k_out, k_ref, atol, rtol)
    assert_close(q, q_ref, atol, rtol)  # written in place
    assert torch.equal(qkv[:, (num_q_heads + num_kv_heads) * head_dim :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 2, 64), (3, 3, 128), (2, 1, 80)])
def test_apply_rotary(num_q_heads, num_kv_heads, head_dim, dtype):
    _check(5, num_q_heads, num_kv_heads, head_dim, dtype, DEVICE)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(32, 32), (32, 8)])
def test_apply_rotary_gpu(num_q_heads, num_kv_heads, dtype):
    _check(4096, num_q_heads, num_kv_heads, 128, dtype, "cuda")
