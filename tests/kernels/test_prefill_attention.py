"""prefill_attention.py against reference.paged_prefill_attention: fp / int8 / int4 caches share one test body.

Varlen batches where some sequences have cached context before their new tokens (prefix-cache hits, chunked
prefill: q_len < kv_len) and some do not, over shuffled blocks with NaN-poisoned unused slots and padding.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.prefill_attention import paged_prefill_attention

from .conftest import DEVICE, requires_cuda
from .paged_utils import assert_close, make_paged_kv

# (dtype, quant_policy) -> (atol, rtol); see test_decode_attention.py for why quantized caches need no extra slack
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


def _check(q_lens, kv_lens, num_q_heads, num_kv_heads, head_dim, block_size, quant_policy, dtype, device,
           pass_max_seqlen=True, v_token_minor=True):
    k_cache, v_cache, k_sz, v_sz, block_tables = make_paged_kv(
        kv_lens, num_kv_heads, head_dim, block_size, quant_policy, dtype, device, v_token_minor=v_token_minor)
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, dtype=dtype, device=device)
    kv_lens_t = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    args = (q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens_t, head_dim**-0.5, k_sz, v_sz, quant_policy)
    expected = reference.paged_prefill_attention(*args)
    got = paged_prefill_attention(*args, max(q_lens) if pass_max_seqlen else None)
    assert_close(got, expected, *TOLERANCE[(dtype, quant_policy)])


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize(
    "dtype,num_q_heads,num_kv_heads,block_size,q_lens,kv_lens",
    [
        (torch.float16, 2, 2, 8, [1, 21, 20], [1, 37, 20]),  # MHA; a prefix of 16, a fresh prompt
        (torch.float32, 4, 2, 16, [7, 3, 17], [30, 19, 17]),  # GQA 2:1; prefixes of 23 and 16
        (torch.float16, 6, 2, 64, [33, 2], [70, 2]),  # GQA 3:1, blocks larger than a tile
    ],
)
def test_paged_prefill_attention(dtype, num_q_heads, num_kv_heads, block_size, q_lens, kv_lens, quant_policy,
                                 poison_empty):
    _check(q_lens, kv_lens, num_q_heads, num_kv_heads, 64, block_size, quant_policy, dtype, DEVICE)


@pytest.mark.parametrize("quant_policy", [8, 4])
def test_paged_prefill_attention_head_dim_128(quant_policy, poison_empty):
    _check([5, 18], [21, 18], 4, 1, 128, 8, quant_policy, torch.float16, DEVICE, pass_max_seqlen=False)  # GQA 4:1


@pytest.mark.parametrize("quant_policy", [0, 4])
def test_paged_prefill_attention_head_dim_80(quant_policy, poison_empty):
    _check([9, 4], [9, 23], 2, 1, 80, 6, quant_policy, torch.float16, DEVICE)  # half dim 40 padded; block size 6


@pytest.mark.parametrize("quant_policy", [8, 4])
def test_paged_prefill_attention_head_dim_contiguous_v(quant_policy, poison_empty):
    """Quantized V laid out like K (head_dim contiguous) instead of the engine's token-minor layout."""
    _check([7, 20], [30, 20], 4, 2, 64, 16, quant_policy, torch.float16, DEVICE, v_token_minor=False)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(32, 32), (32, 8)])
def test_paged_prefill_attention_gpu(num_q_heads, num_kv_heads, dtype, quant_policy, poison_empty):
    q_lens = [2048, 1, 300, 777, 512]
    kv_lens = [2048, 8000, 1324, 777, 4096]  # fresh prompt, decode-like, prefix hits / later chunks
    _check(q_lens, kv_lens, num_q_heads, num_kv_heads, 128, 64, quant_policy, dtype, "cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("quant_policy", [0, 4])
def test_paged_prefill_attention_gpu_head_dim_64(quant_policy, poison_empty):
    _check([100, 1000], [100, 1300], 16, 16, 64, 16, quant_policy, torch.float16, "cuda", pass_max_seqlen=False)
