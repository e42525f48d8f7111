"""activation.py (silu_and_mul) against reference.silu_and_mul."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.activation import silu_and_mul

from .conftest import DEVICE, requires_cuda
from .paged_utils import assert_close

# the reference rounds to the model dtype twice (after silu, after the product), the kernel once
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}  # (atol, rtol)


def _check(shape, dtype, device):
    x = 3 * torch.randn(*shape, dtype=dtype, device=device)
    assert_close(silu_and_mul(x), reference.silu_and_mul(x), *TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 2 * 40), (2, 3, 2 * 64)])
def test_silu_and_mul(shape, dtype, poison_empty):
    _check(shape, dtype, DEVICE)


def test_silu_and_mul_multi_block(poison_empty):
    _check((3, 2 * 1100), torch.float32, DEVICE)  # inter > 1024: several programs per row


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inter", [11008, 14336])
def test_silu_and_mul_gpu(inter, dtype, poison_empty):
    _check((2048, 2 * inter), dtype, "cuda")
