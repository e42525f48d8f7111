"""store_kv.rotary_store_kv (RoPE fused into the KV-cache write) against reference.rotary_store_kv and against the
two ops it replaces, rotary.apply_rotary then store_kv.

q, k and v are views into one fused qkv projection output, as the attention layer passes them. Under the interpreter
the fused kernel must leave exactly what the two Triton ops leave (q rotated in place, the same cache bytes and
(scale, min) pairs), and the fp results match the torch reference exactly too (no FMA contraction there);
quantized codes get test_store_kv's tolerance against the reference (the kernels quantize through a reciprocal,
see store_kv.py). Compiled for a GPU the two kernels may contract the rotation's multiply-adds differently:
there results agree to about two ulps (a quantized code to 1).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from engine.kernels import ops, reference
from engine.kernels.rotary import apply_rotary
from engine.kernels.store_kv import rotary_store_kv, store_kv

from .conftest import DEVICE, requires_cuda
from .test_store_kv import _caches, assert_quantized_match


def _qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, device):
    """q, k, v views of one [N, (Hq + 2 Hk) D] tensor (the layout LlamaAttention slices), and that tensor."""
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return qkv, q.view(num_tokens, num_q_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim), \
        v.view(num_tokens, num_kv_heads, head_dim)


def _views(qkv, num_q_heads, num_kv_heads, head_dim):
    n = qkv.shape[0]
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return q.view(n, num_q_heads, head_dim), k.view(n, num_kv_heads, head_dim), v.view(n, num_kv_heads, head_dim)


def _cos_sin(num_tokens, head_dim, device):
    """Gathered from a table at arbitrary positions, like RotaryEmbedding.lookup (fp32, [N, D // 2])."""
    table = torch.outer(torch.arange(4096, dtype=torch.float32), 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim))
    positions = torch.randint(0, 4096, (num_tokens,))
    return table.cos()[positions].to(device), table.sin()[positions].to(device)


def _clone(tensors):
    return [t.clone(memory_format=torch.preserve_format) if t is not None else None for t in tensors]


def _check(num_tokens, num_q_heads, num_kv_heads, head_dim, block_size, num_blocks, quant_policy, dtype, device,
           slots=None, v_token_minor=True, against_reference=True):
    qkv, q, k, v = _qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, device)
    cos, sin = _cos_sin(num_tokens, head_dim, device)
    # bit for bit under the interpreter; compiled for a GPU the compiler may contract the rotation's multiply-adds
    # into FMAs differently in the two kernels, so results may differ in the last bit (and a quantized code by 1)
    exact = torch.device(device).type != "cuda"
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # about two ulps

    def same(got, expected):
        if exact:
            assert torch.equal(got.nan_to_num(123.0), expected.nan_to_num(123.0))
        else:
            torch.testing.assert_close(got, expected, atol=tol, rtol=tol, equal_nan=True)

    def same_caches(got, expected):  # [k, v, k pairs, v pairs]
        if exact or not quant_policy:
            for g, e in zip(got, expected):
                if e is not None:
                    same(g, e)
        else:
            for i in range(2):
                assert_quantized_match(got[i], expected[i], got[i + 2], expected[i + 2], quant_policy)

    if slots is None:  # scattered slots, some of them padding
        slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
        slots[torch.rand(num_tokens, device=device) < 0.2] = -1
    slots = slots.to(device=device, dtype=torch.int32)
    caches = _caches(num_blocks, block_size, num_kv_heads, head_dim, quant_policy, dtype, device, v_token_minor)

    # the two ops it replaces, on their own copy of qkv and caches
    qkv_two = qkv.clone()
    q2, k2, v2 = _views(qkv_two, num_q_heads, num_kv_heads, head_dim)
    two = _clone(caches)
    apply_rotary(q2, k2, cos, sin)
    store_kv(k2, v2, *two[:2], slots, *two[2:], quant_policy)

    fused = _clone(caches)
    qkv_before = qkv.clone()
    out = rotary_store_kv(q, k, v, cos, sin, *fused[:2], slots, *fused[2:], quant_policy)

    assert out.data_ptr() == q.data_ptr()  # q is rotated in place and returned
    q_size = num_q_heads * head_dim
    same(qkv[:, :q_size], qkv_two[:, :q_size])  # q as apply_rotary leaves it
    assert torch.equal(qkv[:, q_size:], qkv_before[:, q_size:])  # k and v untouched
    same_caches(fused, two)  # caches and (scale, min) pairs: the same bytes

    if not against_reference:
        return
    q_ref = qkv_before[:, :q_size].view(num_tokens, num_q_heads, head_dim).clone()
    k_ref, v_ref = k.clone(), v.clone()
    expected = _clone(caches)
    reference.rotary_store_kv(q_ref, k_ref, v_ref, cos, sin, *expected[:2], slots, *expected[2:], quant_policy)
    assert torch.equal(k_ref, k)  # the reference leaves k alone too
    same(q, q_ref)
    for i in range(2):
        if quant_policy == 0:
            same(fused[i], expected[i])
        else:
            assert_quantized_match(fused[i], expected[i], fused[i + 2], expected[i + 2], quant_policy)


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 2, 64), (2, 2, 128), (3, 1, 80)])
def test_rotary_store_kv(num_q_heads, num_kv_heads, head_dim, dtype, quant_policy):
    _check(num_tokens=9, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=4,
           num_blocks=5, quant_policy=quant_policy, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("quant_policy", [8, 4])
def test_rotary_store_kv_head_dim_contiguous_v(quant_policy):
    _check(num_tokens=9, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=4, num_blocks=5,
           quant_policy=quant_policy, dtype=torch.float32, device=DEVICE, v_token_minor=False)


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_rotary_store_kv_prompt_runs(quant_policy):
    """Prompt-like slots (the quantized kernel's contiguous-tile path), a padding token inside a run, a partial
    last tile: padding tokens' q is rotated all the same."""
    slots = torch.cat([torch.arange(16, 56), torch.arange(70, 93), torch.tensor([-1, 94, 95])])
    slots[20] = -1
    _check(num_tokens=slots.numel(), num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16, num_blocks=7,
           quant_policy=quant_policy, dtype=torch.float32, device=DEVICE, slots=slots)


@pytest.mark.parametrize("quant_policy", [0, 4])
def test_rotary_store_kv_no_tokens(quant_policy):
    caches = _caches(2, 4, 2, 64, quant_policy, torch.float32, DEVICE)
    _, q, k, v = _qkv(0, 4, 2, 64, torch.float32, DEVICE)
    cos, sin = _cos_sin(0, 64, DEVICE)
    assert rotary_store_kv(q, k, v, cos, sin, *caches[:2], torch.empty(0, dtype=torch.int32, device=DEVICE),
                           *caches[2:], quant_policy) is q


def test_registered_with_reference_signature():
    from engine.kernels import triton_ops  # noqa: F401  (fills ops.TRITON_OPS)

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(ops.TRITON_OPS["rotary_store_kv"]) == params(reference.rotary_store_kv)
    assert params(ops.rotary_store_kv) == params(reference.rotary_store_kv)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads", [32, 8])
def test_rotary_store_kv_gpu(num_kv_heads, dtype, quant_policy):
    """Llama-2-7B heads (and a GQA variant): decode batches and a prompt, the two ops' results to about two ulps
    (compiled, the rotation's fp32 products may be contracted into FMAs differently in the two kernels)."""
    for num_tokens in (1, 4):
        _check(num_tokens=num_tokens, num_q_heads=32, num_kv_heads=num_kv_heads, head_dim=128, block_size=64,
               num_blocks=100, quant_policy=quant_policy, dtype=dtype, device="cuda", against_reference=False)
    prompt = torch.arange(64, 64 + 300)
    _check(num_tokens=prompt.numel(), num_q_heads=32, num_kv_heads=num_kv_heads, head_dim=128, block_size=64,
           num_blocks=100, quant_policy=quant_policy, dtype=dtype, device="cuda", slots=prompt,
           against_reference=False)
