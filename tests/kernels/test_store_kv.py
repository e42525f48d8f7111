"""store_kv.py against reference.store_kv: fp, int8 and int4 caches, shuffled slots, padding slots (-1) skipped.

Both start from the same poisoned caches, so writing a wrong slot, or any slot for a -1 token, shows up as a
difference. Quantized codes and (scale, min) pairs are computed with the reference's roundings (ties to even,
correctly rounded division), so the expected mismatch is none; CODE_TOLERANCE states what is tolerated. Quantized
caches hold Hadamard-rotated halves, each with its own (scale, min) and (int4) its own clipping ratio, picked by the
smallest squared error: a rotation summed in another order (compiled: FMA contraction) can move a pair by an fp16
ulp or, at a near tie of two ratios' errors, pick the other ratio; assert_quantized_match tolerates that for at most
GROUP_FLIP_FRACTION of the (token, head, half) groups (none in the small CPU tests).
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.store_kv import store_kv

from .conftest import DEVICE, requires_cuda
from .paged_utils import new_quantized_v_cache

# quant_policy -> (max |code difference|, max fraction of codes that may differ); fp caches must match exactly
# (compiled on a GPU, fp32 evaluation order can move a value across a rounding tie: at most one code off)
CODE_TOLERANCE = {0: (0, 0.0), 8: (1, 2e-2), 4: (1, 2e-2)}
GROUP_FLIP_FRACTION = 1e-3


def assert_quantized_match(got_cache, exp_cache, got_sz, exp_sz, quant_policy):
    """Quantized caches [nb, bs, Hk, D_stored] and their pairs [nb, Hk, 2, bs, 2]: per (token, head, half) group,
    codes within CODE_TOLERANCE and the pair within an ulp of its dtype (NaN poison equal), but for at most
    GROUP_FLIP_FRACTION of the groups (a near tie of two clipping ratios)."""
    max_diff, max_fraction = CODE_TOLERANCE[quant_policy]
    diff = (_codes(got_cache, quant_policy) - _codes(exp_cache, quant_policy)).abs()
    diff = diff.unflatten(-1, (2, diff.shape[-1] // 2))  # [nb, bs, Hk, half, D / 2]
    rtol = 1e-3 if exp_sz.dtype == torch.float16 else 1e-6
    pairs_ok = torch.isclose(got_sz.float(), exp_sz.float(), rtol=rtol, atol=1e-6, equal_nan=True).all(-1)
    group_ok = (diff <= max_diff).all(-1) & pairs_ok.permute(0, 3, 1, 2)  # [nb, bs, Hk, half]
    flipped = (~group_ok).float().mean().item()
    assert flipped <= GROUP_FLIP_FRACTION, f"{flipped:.2%} of the groups differ"
    assert ((diff > 0) & group_ok[..., None]).float().mean() <= max_fraction


def _codes(cache: torch.Tensor, quant_policy: int) -> torch.Tensor:
    """Stored bytes -> one code per element (int4 bytes hold two codes; compare nibbles, not bytes)."""
    c = cache.int()
    return torch.cat([c & 0xF, c >> 4], dim=-1) if quant_policy == 4 else c


def _caches(num_blocks, block_size, num_kv_heads, head_dim, quant_policy, dtype, device, v_token_minor=True):
    """Poisoned caches like the model runner's: scale_zero fp16 for 16-bit models and fp32 for fp32 ones, quantized V
    token-minor (unless v_token_minor=False)."""
    stored_dim = head_dim // 2 if quant_policy == 4 else head_dim
    shape = (num_blocks, block_size, num_kv_heads, stored_dim)
    if quant_policy == 0:
        caches = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(2)]
        return caches + [None, None]
    caches = [torch.randint(0, 256, shape, dtype=torch.uint8, device=device),
              new_quantized_v_cache(shape, device, v_token_minor)]
    sz_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    sz_shape = (num_blocks, num_kv_heads, reference.KV_GROUPS[quant_policy], block_size, 2)  # head-major
    return caches + [torch.full(sz_shape, float("nan"), dtype=sz_dtype, device=device) for _ in range(2)]


def _check(num_tokens, num_kv_heads, head_dim, block_size, num_blocks, quant_policy, dtype, device,
           v_token_minor=True, slots=None):
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = 3 * torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device) + 1
    if slots is None:  # scattered slots, some of them padding
        slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
        slots[torch.rand(num_tokens, device=device) < 0.2] = -1
    slots = slots.to(device=device, dtype=torch.int32)

    expected = _caches(num_blocks, block_size, num_kv_heads, head_dim, quant_policy, dtype, device, v_token_minor)
    got = [t.clone(memory_format=torch.preserve_format) if t is not None else None for t in expected]
    reference.store_kv(k, v, *expected[:2], slots, *expected[2:], quant_policy)
    store_kv(k, v, *got[:2], slots, *got[2:], quant_policy)

    for i in range(2):
        if quant_policy == 0:
            assert torch.equal(got[i].nan_to_num(123.0), expected[i].nan_to_num(123.0))
        else:
            assert_quantized_match(got[i], expected[i], got[i + 2], expected[i + 2], quant_policy)


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv(quant_policy, dtype):
    _check(num_tokens=9, num_kv_heads=2, head_dim=64, block_size=4, num_blocks=5, quant_policy=quant_policy,
           dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_store_kv_odd_shapes(quant_policy):
    _check(num_tokens=6, num_kv_heads=3, head_dim=80, block_size=3, num_blocks=4, quant_policy=quant_policy,
           dtype=torch.float16, device=DEVICE)


@pytest.mark.parametrize("quant_policy", [8, 4])
def test_store_kv_head_dim_contiguous_v(quant_policy):
    """Quantized V caches laid out like K (head_dim contiguous) work too."""
    _check(num_tokens=9, num_kv_heads=2, head_dim=64, block_size=4, num_blocks=5, quant_policy=quant_policy,
           dtype=torch.float16, device=DEVICE, v_token_minor=False)


@pytest.mark.parametrize("v_token_minor", [True, False])
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_store_kv_prompt_runs(quant_policy, v_token_minor):
    """Prompt-like slots: runs of consecutive slots, block-aligned or not, a partial last tile and a padding
    token inside a run (the kernel's contiguous-tile and scattered paths, and tiles that fall back)."""
    block_size = 16
    slots = torch.cat([torch.arange(16, 56), torch.arange(70, 93), torch.tensor([-1, 94, 95])])
    slots[20] = -1
    _check(num_tokens=slots.numel(), num_kv_heads=2, head_dim=64, block_size=block_size, num_blocks=7,
           quant_policy=quant_policy, dtype=torch.float16, device=DEVICE, v_token_minor=v_token_minor, slots=slots)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_store_kv_gpu(head_dim, dtype, quant_policy):
    _check(num_tokens=4096, num_kv_heads=8, head_dim=head_dim, block_size=64, num_blocks=100,
           quant_policy=quant_policy, dtype=dtype, device="cuda")
    runs = torch.cat([torch.arange(64, 64 + 3000), torch.arange(3100, 3100 + 1000)])  # two prompts
    _check(num_tokens=runs.numel(), num_kv_heads=8, head_dim=head_dim, block_size=64, num_blocks=100,
           quant_policy=quant_policy, dtype=dtype, device="cuda", slots=runs)


def test_constant_and_offset_vectors_survive_fp16_scale_zero():
    """A constant head vector (range 0) and one whose mean dwarfs its range must dequantize finitely and closely
    when scale and zero are stored in fp16 (the engine's layout for half models)."""
    from engine.kernels import reference

    x = torch.empty(3, 2, 16)
    x[0] = 0.75  # constant
    x[1] = 3000.0 + torch.rand(2, 16) * 0.01  # large offset, tiny range
    x[2] = torch.randn(2, 16)
    for bits in (8, 4):
        q, sz = reference.quantize_kv(x, bits)
        back = reference.dequantize_kv(q, sz.half(), bits, torch.float32)
        assert torch.isfinite(back).all()
        assert (back[0] - 0.75).abs().max() < 1e-3
        assert (back[1] - x[1]).abs().max() < 3.0  # fp16 spacing at 3000 is 2
