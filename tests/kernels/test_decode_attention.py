"""decode_attention.py against reference.paged_decode_attention: fp / int8 / int4 caches share one test body.

The caches come from paged_utils.make_paged_kv (shuffled blocks, NaN-poisoned unused slots and padding) and the
output buffers from poison_empty, so a read past kv_len or an unwritten output element fails the test. Both the
default split heuristic and forced split counts run (1: stage 1 writes the output; 3: a non power of two, with
tail splits that are empty for short sequences).
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.decode_attention import decode_attention_launch, paged_decode_attention

from .conftest import DEVICE, requires_cuda
from .paged_utils import assert_close, make_paged_kv

# (dtype, quant_policy) -> (atol, rtol). The reference dequantizes K/V to the model dtype too, so quantized
# caches agree as closely as fp ones; the 16-bit gaps come from P being rounded before the P @ V dot.
TOLERANCE = {
    (torch.float32, 0): (1e-5, 1e-5),
    (torch.float32, 8): (1e-5, 1e-5),
    (torch.float32, 4): (1e-5, 1e-5),
    (torch.float16, 0): (2e-3, 1e-2),
    (torch.float16, 8): (2e-3, 1e-2),
    (torch.float16, 4): (2e-3, 1e-2),
    (torch.bfloat16, 0): (1.5e-2, 2e-2),
    (torch.bfloat16, 8): (1.5e-2, 2e-2),
    (torch.bfloat16, 4): (1.5e-2, 2e-2),
}


def _check(kv_lens, num_q_heads, num_kv_heads, head_dim, block_size, quant_policy, dtype, device, forced_splits=(),
           v_token_minor=True):
    k_cache, v_cache, k_sz, v_sz, block_tables = make_paged_kv(
        kv_lens, num_kv_heads, head_dim, block_size, quant_policy, dtype, device, v_token_minor=v_token_minor)
    q = torch.randn(len(kv_lens), num_q_heads, head_dim, dtype=dtype, device=device)
    kv_lens_t = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    args = (q, k_cache, v_cache, block_tables, kv_lens_t, scale, k_sz, v_sz, quant_policy)
    expected = reference.paged_decode_attention(*args)
    atol, rtol = TOLERANCE[(dtype, quant_policy)]

    assert_close(paged_decode_attention(*args), expected, atol, rtol)
    block_n = 16 if device == "cpu" else 64
    for num_splits in forced_splits:
        assert_close(decode_attention_launch(*args, num_splits=num_splits, block_n=block_n), expected, atol, rtol)


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize(
    "dtype,num_q_heads,num_kv_heads,block_size,kv_lens",
    [
        (torch.float16, 2, 2, 8, [1, 37, 20]),  # MHA, lengths not a multiple of the block size
        (torch.float32, 4, 2, 16, [50, 5, 33]),  # GQA 2:1
        (torch.float16, 6, 2, 64, [70, 3]),  # GQA 3:1 (group padded to 16 rows), blocks larger than a tile
    ],
)
def test_paged_decode_attention(dtype, num_q_heads, num_kv_heads, block_size, kv_lens, quant_policy, poison_empty):
    _check(kv_lens, num_q_heads, num_kv_heads, 64, block_size, quant_policy, dtype, DEVICE, forced_splits=(1, 3))


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_paged_decode_attention_head_dim_128(quant_policy, poison_empty):
    _check([19, 40], 8, 2, 128, 16, quant_policy, torch.float16, DEVICE)  # GQA 4:1


@pytest.mark.parametrize("quant_policy", [0, 4])
def test_paged_decode_attention_head_dim_80(quant_policy, poison_empty):
    _check([9, 23], 2, 1, 80, 6, quant_policy, torch.float16, DEVICE)  # half dim 40 padded to 64; block size 6


@pytest.mark.parametrize("quant_policy", [8, 4])
def test_paged_decode_attention_head_dim_contiguous_v(quant_policy, poison_empty):
    """Quantized V laid out like K (head_dim contiguous) instead of the engine's token-minor layout."""
    _check([45, 7], 4, 2, 64, 16, quant_policy, torch.float16, DEVICE, forced_splits=(2,), v_token_minor=False)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,num_q_heads,num_kv_heads,max_len",
    [(64, 32, 8, 2048), (4, 32, 32, 8192), (3, 28, 4, 8000)],  # Llama-3 GQA batch 64; Llama-2 long; Qwen2-7B odd
)
def test_paged_decode_attention_gpu(batch, num_q_heads, num_kv_heads, max_len, dtype, quant_policy, poison_empty):
    kv_lens = torch.randint(1, max_len + 1, (batch,)).tolist()
    kv_lens[0] = max_len
    _check(kv_lens, num_q_heads, num_kv_heads, 128, 64, quant_policy, dtype, "cuda", forced_splits=(1, 7))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_paged_decode_attention_gpu_head_dim_64(quant_policy, poison_empty):
    _check([1, 300, 4097, 64], 16, 16, 64, 16, quant_policy, torch.float16, "cuda", forced_splits=(5,))
