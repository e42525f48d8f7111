"""W4A16 AWQ matmul kernels vs dequantize-then-matmul (reference.awq_linear / reference.awq_linear_k).

Tolerances: both sides dequantize to the same values (exactly: the codes pass through the kernels' decoding
unchanged); the kernels accumulate in fp32 over tiles, per group (zero point and scale applied per group and
output) and over split-K partials, the reference in one matmul: relative error (Frobenius) < 1e-4 in fp32,
< 2e-2 in fp16 / bf16 against an fp32 reference (fp16 outputs alone round at ~3e-4).

The CPU runs interpret the kernels (TRITON_INTERPRET=1, fp32, plain-Triton decoding); the GPU runs add the 7B
shapes, fp16 / bf16 and the inline-PTX decoding (fp16: subnormal halves; bf16: the 16 + q magic)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.awq_gemm import awq_dequantize, awq_dequantize_k, awq_linear, awq_linear_k, awq_repack
from tests.kernels.conftest import requires_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU box, interpreted elsewhere

# kernel variants (entries override awq_gemm.default_config): the defaults cover swap-AB + fold + per-nibble MMAs
# at M <= 64 and the dequantize-then-MMA big tiles above
VARIANTS = {
    "default": None,
    "mma-join-fold": dict(kernel="mma", BLOCK_M=16, BLOCK_N=32, SWAP_AB=False, FOLD=True, SPLIT_DOTS=False),
    "mma-split-dequant": dict(kernel="mma", BLOCK_M=16, BLOCK_N=32, SWAP_AB=False, FOLD=False, SPLIT_DOTS=True),
    "mma-swap-join-dequant": dict(kernel="mma", BLOCK_M=16, BLOCK_N=32, SWAP_AB=True, FOLD=False, SPLIT_DOTS=False,
                                  programs_per_sm=1),
}


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


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_repack_to_k_packed_layout(group_size):
    K, N = 512, 48
    qweight, _, _ = random_awq(K, N, group_size, torch.float32, "cpu")
    packed = awq_repack(qweight, group_size, rows_per_step=256)
    assert packed.shape == (N, K // 8) and packed.dtype == torch.int32
    assert torch.equal(reference.awq_unpack_k(packed, group_size), reference.awq_unpack(qweight).t())
    # the layout spelled out: nibble i of int16 t of chunk c (the high half of int32 (c C / 4 + t) // 2 when t is
    # odd) is input row C c + (C / 4) i + t
    C = min(group_size, 128)
    t, i, k = 5, 3, C + 3 * (C // 4) + 5  # chunk 1, int16 5, nibble 3
    col, bit = (C // 4 + t) // 2, 16 * (t % 2) + 4 * i
    assert ((packed[7, col] >> bit) & 0xF).item() == reference.awq_unpack(qweight)[k, 7].item()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("group_size", [64, 128])
def test_kernels_match_reference_small(variant, M, group_size):
    K, N = 256, 96
    qweight, qzeros, scales = random_awq(K, N, group_size, torch.float32, DEVICE)
    qweight_k = awq_repack(qweight, group_size)
    x = torch.randn(M, K, device=DEVICE)
    bias = torch.randn(N, device=DEVICE) if M == 5 else None
    ref = reference.awq_linear(x, qweight, qzeros, scales, group_size, bias)
    assert rel_err(reference.awq_linear_k(x, qweight_k, qzeros, scales, group_size, bias), ref) < 1e-5
    got = awq_linear_k(x, qweight_k, qzeros, scales, group_size, bias, config=VARIANTS[variant])
    assert got.shape == (M, N) and got.dtype == x.dtype and not got.isnan().any()
    assert rel_err(got, ref) < 1e-4


@pytest.mark.parametrize("group_size", [32, 128])
def test_checkpoint_layout_entry_point(group_size):
    K, N = 256, 64
    qweight, qzeros, scales = random_awq(K, N, group_size, torch.float32, DEVICE)
    x = torch.randn(3, K, device=DEVICE)
    ref = reference.awq_linear(x, qweight, qzeros, scales, group_size)
    assert rel_err(awq_linear(x, qweight, qzeros, scales, group_size), ref) < 1e-4


def test_split_k_partials_are_summed_once(poison_empty):
    # many splits (one group each) and NaN-poisoned workspace/output: every output written, by exactly one sum
    K, N, G = 512, 64, 64
    qweight, qzeros, scales = random_awq(K, N, G, torch.float32, DEVICE)
    qweight_k = awq_repack(qweight, G)
    x = torch.randn(2, K, device=DEVICE)
    cfg = dict(kernel="mma", BLOCK_M=16, BLOCK_N=32, programs_per_sm=64, max_split=8)
    ref = reference.awq_linear(x, qweight, qzeros, scales, G)
    for _ in range(2):  # the per-tile counters are back at zero after a launch
        assert rel_err(awq_linear_k(x, qweight_k, qzeros, scales, G, config=cfg), ref) < 1e-4


def test_dequantize_kernels_match_reference_small(poison_empty):
    K, N, G = 256, 128, 64
    qweight, qzeros, scales = random_awq(K, N, G, torch.float32, DEVICE)
    assert torch.equal(awq_dequantize(qweight, qzeros, scales, G), reference.awq_dequantize(qweight, qzeros, scales, G))
    got = awq_dequantize_k(awq_repack(qweight, G), qzeros, scales, G)
    assert torch.equal(got.t(), reference.awq_dequantize(qweight, qzeros, scales, G))


def test_awq_linear_layer_keeps_checkpoint_layout_on_cpu():
    from engine.layers.awq_linear import AWQLinear

    layer = AWQLinear(256, 64, bias=False, dtype=torch.float32, group_size=128)
    qweight, qzeros, scales = random_awq(256, 64, 128, torch.float16, "cpu")
    layer.qweight.data, layer.qzeros.data, layer.scales.data = qweight, qzeros, scales
    layer.post_load()
    assert not layer.k_packed and torch.equal(layer.qweight, qweight)
    x = torch.randn(2, 256)
    assert rel_err(layer(x), reference.awq_linear(x, qweight, qzeros, scales, 128)) < 1e-5


# ---- GPU: 7B shapes, fp16 / bf16, inline-PTX decoding -------------------------------------------------------
GPU_VARIANTS = {
    **VARIANTS,
    "mma-swap-split-fold-magic": dict(kernel="mma", BLOCK_M=16, BLOCK_N=128, SWAP_AB=True, FOLD=True,
                                      SPLIT_DOTS=True, DENORM=False, num_warps=4),
    "mma-big-tiles": dict(kernel="mma", BLOCK_M=64, BLOCK_N=128, SWAP_AB=False, FOLD=False, SPLIT_DOTS=False,
                          num_warps=8),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("M", [1, 4, 16, 64, 256, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq_linear_gpu(M, dtype):
    K, N, G = 4096, 11008, 128
    qweight, qzeros, scales = random_awq(K, N, G, dtype, "cuda")
    qweight_k = awq_repack(qweight, G)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    ref = x.float() @ reference.awq_dequantize(qweight, qzeros, scales.float(), G) + bias.float()
    assert rel_err(awq_linear_k(x, qweight_k, qzeros, scales, G, bias), ref) < 2e-2
    if M <= 16:
        assert rel_err(awq_linear(x, qweight, qzeros, scales, G, bias), ref) < 2e-2


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_variants_gpu(variant, dtype):
    K, N, G = 11008, 4096, 128
    qweight, qzeros, scales = random_awq(K, N, G, dtype, "cuda")
    qweight_k = awq_repack(qweight, G)
    w = reference.awq_dequantize(qweight, qzeros, scales.float(), G)
    for M in (1, 3, 24):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        got = awq_linear_k(x, qweight_k, qzeros, scales, G, config=GPU_VARIANTS[variant])
        assert rel_err(got, x.float() @ w) < 2e-2, (variant, M)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("M", [24, 100, 200])
def test_awq_linear_gpu_down_shape(M):
    # K = 11008: the 17..32-token and the 256-row tiles of default_config
    K, N, G = 11008, 4096, 128
    qweight, qzeros, scales = random_awq(K, N, G, torch.float16, "cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    ref = x.float() @ reference.awq_dequantize(qweight, qzeros, scales.float(), G)
    assert rel_err(awq_linear_k(x, awq_repack(qweight, G), qzeros, scales, G), ref) < 2e-2


@pytest.mark.gpu
@requires_cuda
def test_deterministic_and_graph_capturable():
    K, N, G = 4096, 4096, 128
    qweight, qzeros, scales = random_awq(K, N, G, torch.float16, "cuda")
    qweight_k = awq_repack(qweight, G)
    for M in (1, 16, 64):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        eager = awq_linear_k(x, qweight_k, qzeros, scales, G)
        assert torch.equal(eager, awq_linear_k(x, qweight_k, qzeros, scales, G))  # split-K sums in a fixed order
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = awq_linear_k(x, qweight_k, qzeros, scales, G)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager)


@pytest.mark.gpu
@requires_cuda
def test_awq_linear_layer_repacks_on_gpu():
    from engine.layers.awq_linear import AWQLinear

    layer = AWQLinear(4096, 4096, bias=True, dtype=torch.float16, group_size=128).cuda()
    qweight, qzeros, scales = random_awq(4096, 4096, 128, torch.float16, "cuda")
    layer.qweight.data, layer.qzeros.data, layer.scales.data = qweight, qzeros, scales
    layer.bias.data.normal_()
    layer.post_load()
    layer.post_load()  # idempotent
    assert layer.k_packed and layer.qweight.shape == (4096, 4096 // 8)
    for M in (1, 300):
        x = torch.randn(M, 4096, device="cuda", dtype=torch.float16)
        ref = reference.awq_linear(x.float(), qweight, qzeros, scales.float(), 128, layer.bias.float())
        assert rel_err(layer(x), ref) < 2e-2
