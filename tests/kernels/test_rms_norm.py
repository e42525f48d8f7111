"""rms_norm.py against reference.rms_norm, with and without the fused residual add."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.rms_norm import rms_norm

from .conftest import DEVICE, requires_cuda
from .paged_utils import assert_close

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)


def _check(num_tokens, hidden, dtype, with_residual, device):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    weight = (1.0 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    residual = torch.randn_like(x) if with_residual else None
    expected = reference.rms_norm(x, weight, 1e-6, residual)
    got = rms_norm(x, weight, 1e-6, residual)
    atol, rtol = TOLERANCE[dtype]
    if with_residual:
        assert_close(got[0], expected[0], atol, rtol)
        assert_close(got[1], expected[1], 0.0, 0.0)  # the add is done in the model dtype, like the reference
    else:
        assert_close(got, expected, atol, rtol)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm(hidden, dtype, with_residual, poison_empty):
    _check(5, hidden, dtype, with_residual, DEVICE)


def test_rms_norm_3d_input(poison_empty):
    x = torch.randn(2, 3, 64, device=DEVICE)
    weight = torch.randn(64, device=DEVICE)
    assert_close(rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), 1e-5, 1e-5)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [4096, 5120])
def test_rms_norm_gpu(hidden, dtype, with_residual, poison_empty):
    _check(2048, hidden, dtype, with_residual, "cuda")
