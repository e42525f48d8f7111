"""decode_attention.py against reference.paged_decode_attention: fp / int8 / int4 caches share one test body.

The caches come from paged_utils.make_paged_kv (shuffled blocks, NaN-poisoned unused slots and padding) and the
output buffers from poison_empty, so a read past kv_len or an unwritten output element fails the test. Both the
default split heuristic and forced split counts run (1: the program writes the output; 3: a non power of two, with
tail splits that are empty for short sequences; more than decode_attention.MERGE_CHUNK: the last program to arrive
merges in several steps). Split launches must leave every arrival counter at zero, for the next launch and for CUDA
graph replays.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import decode_attention, reference
from engine.kernels.decode_attention import decode_attention_launch, paged_decode_attention, pick_num_splits

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


def _inputs(kv_lens, num_q_heads, num_kv_heads, head_dim, block_size, quant_policy, dtype, device, v_token_minor=True):
    """paged_decode_attention's positional arguments for random sequences of kv_lens tokens."""
    k_cache, v_cache, k_sz, v_sz, block_tables = make_paged_kv(
        kv_lens, num_kv_heads, head_dim, block_size, quant_policy, dtype, device, v_token_minor=v_token_minor)
    q = torch.randn(len(kv_lens), num_q_heads, head_dim, dtype=dtype, device=device)
    kv_lens_t = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, block_tables, kv_lens_t, head_dim**-0.5, k_sz, v_sz, quant_policy


def _assert_counters_zero(device: torch.device):
    counters = decode_attention._ARRIVALS.get(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert counters is None or not counters.any(), "a split launch left an arrival counter set"


def _check(kv_lens, num_q_heads, num_kv_heads, head_dim, block_size, quant_policy, dtype, device, forced_splits=(),
           v_token_minor=True):
    args = _inputs(kv_lens, num_q_heads, num_kv_heads, head_dim, block_size, quant_policy, dtype, device,
                   v_token_minor)
    expected = reference.paged_decode_attention(*args)
    atol, rtol = TOLERANCE[(dtype, quant_policy)]

    assert_close(paged_decode_attention(*args), expected, atol, rtol)
    block_n = 16 if device == "cpu" else 64
    for num_splits in forced_splits:
        assert_close(decode_attention_launch(*args, num_splits=num_splits, block_n=block_n), expected, atol, rtol)
    _assert_counters_zero(args[0].device)


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


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize(
    "dtype,num_q_heads,num_kv_heads",
    [
        (torch.float32, 2, 2),  # MHA
        (torch.float16, 2, 2),
        (torch.float32, 8, 2),  # GQA 4:1
    ],
)
def test_paged_decode_attention_many_splits(dtype, num_q_heads, num_kv_heads, quant_policy, poison_empty):
    """Forced split counts, merged by the last program to arrive. Contexts of 300 and 170 tokens give some splits
    and leave the tail ones empty; 5 and 1 tokens are shorter than one split's share (all splits but the first
    empty). 20 splits merge in two MERGE_CHUNK steps."""
    assert decode_attention.MERGE_CHUNK < 20
    _check([300, 5, 1, 170], num_q_heads, num_kv_heads, 64, 16, quant_policy, dtype, DEVICE, forced_splits=(2, 8, 20))


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_paged_decode_attention_repeat_is_identical(quant_policy):
    """Two launches in a row with the same inputs give bit-identical outputs (the merge sums splits in a fixed
    order whichever program arrives last) and leave the counters at zero, also with a launch of another batch size
    in between (the same counters serving other (sequence, kv head) tiles)."""
    args = _inputs([260, 3, 97], 8, 2, 64, 16, quant_policy, torch.float32, DEVICE)
    block_n = 16 if DEVICE == "cpu" else 64
    first = decode_attention_launch(*args, num_splits=9, block_n=block_n)
    _assert_counters_zero(args[0].device)
    second = decode_attention_launch(*args, num_splits=9, block_n=block_n)
    _assert_counters_zero(args[0].device)
    assert torch.equal(first, second)
    q, k_cache, v_cache, block_tables, kv_lens = args[:5]
    decode_attention_launch(q[1:], k_cache, v_cache, block_tables[1:], kv_lens[1:], *args[5:], num_splits=5,
                            block_n=block_n)
    third = decode_attention_launch(*args, num_splits=9, block_n=block_n)
    _assert_counters_zero(args[0].device)
    assert torch.equal(first, third)


def test_paged_decode_attention_empty_sequence():
    """A sequence with no context (never sent by the engine) gives zeros, with one split or several, and does not
    disturb its neighbours."""
    args = _inputs([0, 40], 4, 2, 64, 16, 0, torch.float32, DEVICE)
    q, k_cache, v_cache, block_tables, kv_lens = args[:5]
    expected = reference.paged_decode_attention(q[1:], k_cache, v_cache, block_tables[1:], kv_lens[1:], *args[5:])
    block_n = 16 if DEVICE == "cpu" else 64
    for num_splits in (1, 4):
        out = decode_attention_launch(*args, num_splits=num_splits, block_n=block_n)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert_close(out[1:], expected, 1e-5, 1e-5)
    _assert_counters_zero(args[0].device)


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


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_lens", [[1], [300], [4100], [8192], [1, 300, 4100, 8192]])
def test_paged_decode_attention_gpu_llama2_7b(kv_lens, dtype, quant_policy, poison_empty):
    """Llama-2-7B attention (32 heads, no GQA, head_dim 128, 64-token blocks): at batch 1 the heuristic splits all
    but the shortest context (up to 16 splits on an H200), so the merge runs in the launch; forced 1 / 40 / 64
    splits too."""
    _check(kv_lens, 32, 32, 128, 64, quant_policy, dtype, "cuda", forced_splits=(1, 40, 64))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_paged_decode_attention_cuda_graph(quant_policy):
    """A split launch captured in a CUDA graph: every replay merges correctly (the counters it captured return to
    zero), with new queries and a shorter context between replays."""
    kv_lens = [4100]
    args = _inputs(kv_lens, 32, 32, 128, 64, quant_policy, torch.float16, "cuda")
    q, k_cache, v_cache, block_tables, kv_lens_t = args[:5]
    assert pick_num_splits(1, 32, block_tables.shape[1] * 64, 64, q.device) > 1
    atol, rtol = TOLERANCE[(torch.float16, quant_policy)]
    paged_decode_attention(*args)  # warm-up: compiles, allocates the counters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(*args)
    for replay in range(3):
        q.copy_(torch.randn_like(q))
        kv_lens_t.fill_(kv_lens[0] - 1000 * replay)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, reference.paged_decode_attention(*args), atol, rtol)
        _assert_counters_zero(q.device)
