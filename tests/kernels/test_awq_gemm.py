"""W4A16 AWQ matmul kernel vs dequantize-then-matmul (reference.awq_linear).

Tolerance: both sides dequantize to the same values; the kernel accumulates in fp32 over tiles (and split-K
atomics), the reference in one matmul: relative error < 1e-4 in fp32, < 2e-2 in fp16 / bf16."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.awq_gemm import awq_dequantize, awq_linear
from tests.kernels.conftest import requires_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU box, interpreted elsewhere


def random_awq(K, N, group_size, dtype, device):
    qweight = torch.randint(-(2**31), 2**31 - 1, (K, N // 8), dtype=torch.int32, device=device)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (K // group_size, N // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(K // group_size, N, device=device) * 0.02 + 0.001).to(dtype)
    return qweight, qzeros, scales


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_awq_unpack_order_matches_autoawq_packing():
    # pack columns 0..7 with values 0..7 the AutoAWQ way: nibble i holds column AWQ_ORDER[i]
    values = torch.arange(8, dtype=torch.int32)
    packed = torch.zeros(1, 1, dtype=torch.int32)  # reference only: CPU everywhere
    for i, col in enumerate(reference.AWQ_ORDER):
        packed |= (values[col] << (4 * i)).to(torch.int32)
    assert reference.awq_unpack(packed).tolist() == [list(range(8))]


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_kernel_matches_reference_small(M, group_size, bias):
    K, N = 128, 96
    qweight, qzeros, scales = random_awq(K, N, group_size, torch.float32, DEVICE)
    x = torch.randn(M, K, device=DEVICE)
    b = torch.randn(N, device=DEVICE) if bias else None
    ref = reference.awq_linear(x, qweight, qzeros, scales, group_size, b)
    got = awq_linear(x, qweight, qzeros, scales, group_size, b)
    assert got.shape == (M, N) and not got.isnan().any()
    assert rel_err(got, ref) < 1e-4


def test_dequantize_kernel_matches_reference_small(poison_empty):
    K, N, G = 64, 128, 32
    qweight, qzeros, scales = random_awq(K, N, G, torch.float32, DEVICE)
    got = awq_dequantize(qweight, qzeros, scales, G)
    assert torch.equal(got, reference.awq_dequantize(qweight, qzeros, scales, G))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("M", [1, 4, 16, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq_linear_gpu(M, dtype):
    K, N, G = 4096, 11008, 128
    qweight, qzeros, scales = random_awq(K, N, G, dtype, "cuda")
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    ref = x.float() @ reference.awq_dequantize(qweight, qzeros, scales.float(), G)
    assert rel_err(awq_linear(x, qweight, qzeros, scales, G), ref) < 2e-2
