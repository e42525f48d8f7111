"""W4A16 kernels on the tile-contiguous layout (engine/kernels/awq_tiled.py) vs the plain-torch references.

Tolerances (relative Frobenius error of the output), against x @ W with W = (q - z) * s dequantized exactly in fp32
from the checkpoint tensors:
- fp32 activations: < 1e-5 (both sides exact products; only the fp32 summation order differs);
- fp16 / bf16 activations: < 2e-2, as tests/kernels/test_awq_gemm.py (the dequantizing tiles round (q - z) * s
  to x's dtype: 2^-11 / 2^-8 relative; outputs round once more; accumulation is fp32 everywhere).
The layout itself is checked bit for bit: repack then reference decode == the checkpoint's codes, zeros, scales.

CPU runs interpret the kernels (TRITON_INTERPRET=1 from conftest.py, plain-Triton nibble decoding); on a GPU the
same small tests run compiled, and `-m gpu` adds the Llama-2-7B shapes, the inline-PTX decoding and graph capture.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.awq_tiled import (
    LAYOUT_N,
    awq_tile_repack,
    awq_tiled_dequantize,
    awq_tiled_linear,
    meta_rows,
    tiled_shape,
)
from tests.kernels.conftest import DEVICE, requires_cuda

# entries override awq_tiled.default_config
VARIANTS = {
    "default": None,
    "fold-swap-bn64": dict(BLOCK_M=16, BLOCK_N=64, SWAP_AB=True, FOLD=True, SPLIT_DOTS=True),
    "fold-swap-joined": dict(BLOCK_M=16, BLOCK_N=32, SWAP_AB=True, FOLD=True, SPLIT_DOTS=False),
    "dequant-swap": dict(BLOCK_M=16, BLOCK_N=64, SWAP_AB=True, FOLD=False, SPLIT_DOTS=False, programs_per_sm=1),
    "dequant-noswap-split": dict(BLOCK_M=16, BLOCK_N=32, SWAP_AB=False, FOLD=False, SPLIT_DOTS=True),
}


def random_awq(K, N, group_size, scale_dtype, device):
    qweight = torch.randint(-(2**31), 2**31 - 1, (K, N // 8), dtype=torch.int32, device=device)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (K // group_size, N // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(K // group_size, N, device=device) * 0.02 + 0.001).to(scale_dtype)
    return qweight, qzeros, scales


def exact_weight(qweight, qzeros, scales, group_size):
    """[K, N] fp32 (q - z) * s, exact (16-bit scale times a small integer)."""
    return reference.awq_dequantize(qweight, qzeros, scales.float(), group_size)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("layout_n", [32, 64, 128])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_repack_round_trips_bit_for_bit(group_size, layout_n):
    K, N = 512, 200  # N not a multiple of layout_n: padded columns
    scale_dtype = torch.bfloat16 if group_size == 64 else torch.float16
    qweight, qzeros, scales = random_awq(K, N, group_size, scale_dtype, "cpu")
    packed = awq_tile_repack(qweight, qzeros, scales, group_size, layout_n)
    assert packed.dtype == torch.int16 and packed.shape == tiled_shape(N, K, group_size, layout_n)
    q, z, s = reference.awq_unpack_tiled(packed, N, group_size, scale_dtype, layout_n)
    G = group_size
    assert torch.equal(q, reference.awq_unpack(qweight))
    assert torch.equal(z, reference.awq_unpack(qzeros).repeat_interleave(G, dim=0))
    assert torch.equal(s, scales.repeat_interleave(G, dim=0))
    assert torch.equal(reference.awq_dequantize_tiled(packed, N, G, scale_dtype, layout_n),
                       reference.awq_dequantize(qweight, qzeros, scales, G))
    # the layout spelled out for one element: column n, input row k of chunk c
    C = min(G, 128)
    n, c, i, t = N - 3, 2, 3, 5
    k = C * c + (C // 4) * i + t
    b, r = divmod(n, layout_n)
    assert ((int(packed[b, c, r, t]) >> (4 * i)) & 0xF) == reference.awq_unpack(qweight)[k, n].item()
    flat = packed[b, c].reshape(-1)[layout_n * (C // 4) :]  # the tile's meta rows, read flat
    assert flat[r].view(scale_dtype) == scales[k // G, n]
    word = flat[layout_n : layout_n + layout_n // 4].view(torch.int32)[r // 8]
    assert ((int(word) >> (4 * (r % 8))) & 0xF) == reference.awq_unpack(qzeros)[k // G, n].item()
    assert packed.shape[2] == layout_n + meta_rows(layout_n, C)
    # padded columns: zero codes and zero scales
    q_all = reference.awq_unpack_tiled(packed, packed.shape[0] * layout_n, G, scale_dtype, layout_n)
    assert not q_all[0][:, N:].any() and not q_all[2][:, N:].any()


# every variant in fp32 (exact products: the tightest check), the decode-size and dequantizing paths in fp16 / bf16
DTYPE_VARIANTS = [(torch.float32, v) for v in VARIANTS] + [
    (torch.float16, "default"), (torch.float16, "dequant-swap"),
    (torch.bfloat16, "default"), (torch.bfloat16, "fold-swap-joined"), (torch.bfloat16, "dequant-noswap-split")]


@pytest.mark.slow
@pytest.mark.parametrize("M", [1, 3, 16, 40])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize(("dtype", "variant"), DTYPE_VARIANTS, ids=lambda v: str(v).replace("torch.", ""))
def test_kernel_matches_reference_small(dtype, variant, group_size, M):
    K, N = 256, 160  # 160 = 128 + 32: the last program covers padded layout rows
    scale_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    qweight, qzeros, scales = random_awq(K, N, group_size, scale_dtype, DEVICE)
    packed = awq_tile_repack(qweight, qzeros, scales, group_size)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    bias = torch.randn(N, device=DEVICE, dtype=dtype) if M == 3 else None
    w = exact_weight(qweight, qzeros, scales, group_size)
    ref = x.float() @ w + (0 if bias is None else bias.float())
    got = awq_tiled_linear(x, packed, N, group_size, scale_dtype, bias, config=VARIANTS[variant])
    assert got.shape == (M, N) and got.dtype == dtype and not got.isnan().any()
    assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 2e-2)
    # the reference op of the layout agrees too (it rounds W to the scales' dtype, as reference.awq_linear does)
    ref_op = reference.awq_linear_tiled(x.float(), packed, N, group_size, scale_dtype,
                                        bias=None if bias is None else bias.float(), layout_n=LAYOUT_N)
    assert rel_err(ref_op, ref) < 2e-2


def test_layout_64_and_group_32_small():
    K, N, G = 256, 96, 32  # C = 32: C / 4 = 8 < the MMA's K of 16, so the per-nibble MMAs are joined
    qweight, qzeros, scales = random_awq(K, N, G, torch.float16, DEVICE)
    packed = awq_tile_repack(qweight, qzeros, scales, G, layout_n=64)
    w = exact_weight(qweight, qzeros, scales, G)
    for M in (1, 5):
        x = torch.randn(M, K, device=DEVICE)
        got = awq_tiled_linear(x, packed, N, G, torch.float16, layout_n=64, config=dict(BLOCK_N=64))
        assert rel_err(got, x @ w) < 1e-5


def test_split_k_partials_are_summed_once(poison_empty):
    # many splits (one chunk each), NaN-poisoned workspace and output: every output written by exactly one sum
    K, N, G = 512, 128, 64
    qweight, qzeros, scales = random_awq(K, N, G, torch.float16, DEVICE)
    packed = awq_tile_repack(qweight, qzeros, scales, G)
    x = torch.randn(2, K, device=DEVICE)
    ref = x @ exact_weight(qweight, qzeros, scales, G)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, programs_per_sm=64, max_split=8)
    for _ in range(2):  # the per-tile counters are back at zero after a launch
        assert rel_err(awq_tiled_linear(x, packed, N, G, config=cfg), ref) < 1e-5


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_dequantize_kernel_and_prefill_path(poison_empty, scale_dtype):
    K, N, G = 256, 160, 64
    qweight, qzeros, scales = random_awq(K, N, G, scale_dtype, DEVICE)
    packed = awq_tile_repack(qweight, qzeros, scales, G)
    got = awq_tiled_dequantize(packed, N, G, scale_dtype)
    want = reference.awq_dequantize(qweight, qzeros, scales, G)
    assert got.shape == (N, K) and not got.isnan().any()
    if scale_dtype == torch.float16 or DEVICE == "cuda":
        assert torch.equal(got.t(), want)  # one rounding of the exact product, as the reference
    else:  # the interpreter's fp32 -> bf16 conversion does not always round to nearest: one bf16 ulp at most
        assert torch.allclose(got.t().float(), want.float(), rtol=2**-7, atol=0)
    x = torch.randn(300, K, device=DEVICE)  # > FUSED_MAX_M rows: dequantize, then one matmul
    ref = x @ exact_weight(qweight, qzeros, scales, G)
    assert rel_err(awq_tiled_linear(x, packed, N, G, scale_dtype), ref) < (2e-2 if scale_dtype == torch.bfloat16
                                                                          else 1e-3)


def test_launcher_rejects_mismatched_inputs():
    K, N, G = 256, 64, 128
    qweight, qzeros, scales = random_awq(K, N, G, torch.float16, "cpu")
    packed = awq_tile_repack(qweight, qzeros, scales, G)
    x = torch.randn(2, K)
    with pytest.raises(AssertionError, match="shape"):
        awq_tiled_linear(x, packed, N + 128, G)  # the buffer holds one layout tile of columns, not two
    with pytest.raises(AssertionError, match="shape"):
        awq_tiled_linear(torch.randn(2, 2 * K), packed, N, G)
    with pytest.raises(AssertionError, match="BLOCK_N"):
        awq_tiled_linear(x, packed, N, G, config=dict(BLOCK_N=256))
    with pytest.raises(AssertionError, match="16-bit"):
        awq_tile_repack(qweight, qzeros, scales.float(), G)


# ---- GPU: Llama-2-7B shapes, fp16 / bf16, inline-PTX decoding -----------------------------------------------
GPU_VARIANTS = {
    **VARIANTS,
    "fold-magic": dict(BLOCK_M=16, BLOCK_N=128, SWAP_AB=True, FOLD=True, SPLIT_DOTS=True, DENORM=False),
    "dequant-swap-128x128": dict(BLOCK_M=128, BLOCK_N=128, SWAP_AB=True, FOLD=False, SPLIT_DOTS=False, num_warps=8),
    "evict-first-stages5": dict(BLOCK_M=8, BLOCK_N=128, num_stages=5, EVICT="evict_first"),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("M", [1, 4, 16, 64, 256, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq_tiled_gpu(M, dtype):
    K, N, G = 4096, 11008, 128
    qweight, qzeros, scales = random_awq(K, N, G, dtype, "cuda")
    packed = awq_tile_repack(qweight, qzeros, scales, G)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    ref = x.float() @ exact_weight(qweight, qzeros, scales, G) + bias.float()
    assert rel_err(awq_tiled_linear(x, packed, N, G, dtype, bias), ref) < 2e-2


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq_tiled_variants_gpu(variant, dtype):
    K, N, G = 11008, 4096, 128
    qweight, qzeros, scales = random_awq(K, N, G, dtype, "cuda")
    packed = awq_tile_repack(qweight, qzeros, scales, G)
    w = exact_weight(qweight, qzeros, scales, G)
    for M in (1, 3, 24, 64):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        got = awq_tiled_linear(x, packed, N, G, dtype, config=GPU_VARIANTS[variant])
        assert rel_err(got, x.float() @ w) < 2e-2, (variant, M)


@pytest.mark.gpu
@requires_cuda
def test_awq_tiled_deterministic_and_graph_capturable():
    K, N, G = 4096, 4096, 128
    qweight, qzeros, scales = random_awq(K, N, G, torch.float16, "cuda")
    packed = awq_tile_repack(qweight, qzeros, scales, G)
    for M in (1, 16, 64):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        eager = awq_tiled_linear(x, packed, N, G)
        assert torch.equal(eager, awq_tiled_linear(x, packed, N, G))  # split-K sums in a fixed order
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = awq_tiled_linear(x, packed, N, G)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager)
