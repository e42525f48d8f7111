"""Dense small-M matmul kernel (gemv.py) vs reference.linear (F.linear).

The CPU runs interpret the kernel (TRITON_INTERPRET=1, fp32); the GPU runs add fp16 / bf16 at the Llama-2-7B
shapes. Tolerance: relative error (Frobenius) < 1e-5 in fp32 and < 5e-3 in fp16 / bf16 against an fp32 product
(the kernel accumulates in fp32 over tiles and split-K partials; outputs round to the dtype)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.gemv import GEMV_MAX_M, gemv, linear, silu_mul_linear
from tests.kernels.conftest import requires_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# config overrides: the one-token FMA path, the MMA path, and a split-K that does not divide the K tiles evenly
VARIANTS = {
    "default": None,
    "fma": dict(DOT=False, BLOCK_N=8, BLOCK_K=64, programs_per_sm=8),
    "mma": dict(DOT=True, BLOCK_N=32, BLOCK_K=32, programs_per_sm=8),
    "uneven-split": dict(DOT=False, BLOCK_N=16, BLOCK_K=32, programs_per_sm=3, max_split=7),
}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("M", [1, 3, GEMV_MAX_M])
@pytest.mark.parametrize("K, N, bias", [(256, 96, False), (200, 40, True)])  # 200: K not a multiple of the tile
def test_gemv_matches_linear(variant, M, K, N, bias):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g).to(DEVICE)
    w = torch.randn(N, K, generator=g).to(DEVICE)
    b = torch.randn(N, generator=g).to(DEVICE) if bias else None
    out = gemv(x, w, b, config=VARIANTS[variant])
    assert out.shape == (M, N) and out.dtype == x.dtype
    assert rel_err(out, reference.linear(x, w, b)) < 1e-5


@pytest.mark.parametrize("variant", ["fma", "mma"])
@pytest.mark.parametrize("M", [1, 4])
def test_gemv_fused_silu_mul_input(variant, M):
    # the down projection reads [gate | up] and applies silu(gate) * up itself
    g = torch.Generator().manual_seed(M)
    gate_up = torch.randn(M, 2 * 200, generator=g).to(DEVICE)
    w = torch.randn(48, 200, generator=g).to(DEVICE)
    out = gemv(gate_up, w, config=VARIANTS[variant], silu_mul=True)
    assert rel_err(out, reference.silu_mul_linear(gate_up, w)) < 1e-5


def test_gemv_split_k_is_deterministic_and_strided_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 512, generator=g).to(DEVICE)[:, ::2]  # non-contiguous rows of K = 256
    w = torch.randn(64, 256, generator=g).to(DEVICE)
    cfg = dict(DOT=False, BLOCK_N=16, BLOCK_K=32, programs_per_sm=16, max_split=8)
    first = gemv(x, w, config=cfg)
    assert torch.equal(first, gemv(x, w, config=cfg))
    assert rel_err(first, x @ w.t()) < 1e-5


def test_linear_keeps_shapes_and_falls_back_above_max_m():
    x = torch.randn(2, GEMV_MAX_M, 64).to(DEVICE)  # 2 * GEMV_MAX_M rows: the fallback
    w = torch.randn(48, 64).to(DEVICE)
    assert rel_err(linear(x, w), reference.linear(x, w)) < 1e-5
    assert linear(x[:1, :3], w).shape == (1, 3, 48)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 4, 8])
@pytest.mark.parametrize("K, N", [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 32000)])
def test_gemv_llama_shapes_gpu(dtype, M, K, N):
    g = torch.Generator(device="cuda").manual_seed(K + N + M)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).to(dtype)
    ref = x.float() @ w.float().t()
    out = linear(x, w)
    assert rel_err(out, ref) < 5e-3
    torch.cuda.synchronize()
    assert torch.equal(out, linear(x, w))  # deterministic split-K
    if N == 4096:  # as the down projection: [gate | up] in, the activation fused
        gate_up = torch.randn(M, 2 * K, device="cuda", generator=g).to(dtype)
        ref = reference.silu_mul_linear(gate_up.float(), w.float())
        assert rel_err(silu_mul_linear(gate_up, w), ref) < 5e-3


def test_linear_routes_few_half_precision_rows_to_the_kernel():
    # the entry points the model calls: fp16 rows up to GEMV_MAX_M take the kernel (shape kept), results as F.linear
    from engine.kernels.gemv import _gemv_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 64, generator=g).half().to(DEVICE)
    w = (torch.randn(48, 64, generator=g) * 0.1).half().to(DEVICE)
    assert _gemv_rows(x, w) == 3 and _gemv_rows(x.float(), w.float()) == 0
    out = linear(x, w)
    assert out.shape == (1, 3, 48) and rel_err(out, reference.linear(x.float(), w.float())) < 5e-3
    gate_up = torch.randn(2, 128, generator=g).half().to(DEVICE)
    assert rel_err(silu_mul_linear(gate_up, w), reference.silu_mul_linear(gate_up.float(), w.float())) < 5e-3
