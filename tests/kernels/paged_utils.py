"""Builders for paged KV caches in the layout of engine/kernels/reference.py, shared by the kernel tests."""

from __future__ import annotations

import torch

from engine.kernels import reference


def make_paged_kv(kv_lens, num_kv_heads, head_dim, block_size, quant_policy, dtype, device, num_spare_blocks=2,
                  v_token_minor=True):
    """Random K/V for each sequence's kv_lens[i] tokens, written with reference.store_kv into shuffled blocks.

    Everything a kernel must not read is poisoned: unused slots of fp caches are NaN, unused slots of quantized
    caches have NaN scales, and block-table padding points at block 0, a spare all-NaN block. Returns
    (k_cache, v_cache, k_scale_zero, v_scale_zero, block_tables [B, max_blocks + 1] int32). Scales are fp16 for
    16-bit models and fp32 for fp32 ones and quantized V caches are token-minor (v_token_minor=False: head_dim
    contiguous, a layout the kernels accept too), as the engine's model runner allocates them.
    """
    blocks_per_seq = [(n + block_size - 1) // block_size for n in kv_lens]
    num_blocks = sum(blocks_per_seq) + num_spare_blocks
    perm = 1 + torch.randperm(num_blocks - 1, device=device)  # data blocks in shuffled order
    poison_block = 0  # never written; also what a kernel reads if it dereferences a masked block-table entry
    block_tables = torch.full((len(kv_lens), max(blocks_per_seq) + 1), poison_block, dtype=torch.int32, device=device)
    start = 0
    for i, nb in enumerate(blocks_per_seq):
        block_tables[i, :nb] = perm[start : start + nb]
        start += nb

    stored_dim = head_dim // 2 if quant_policy == 4 else head_dim
    shape = (num_blocks, block_size, num_kv_heads, stored_dim)
    if quant_policy == 0:
        k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        k_sz = v_sz = None
    else:
        k_cache = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        v_cache = new_quantized_v_cache(shape, device, v_token_minor)
        sz_dtype = torch.float32 if dtype == torch.float32 else torch.float16
        sz_shape = (num_blocks, num_kv_heads, reference.KV_GROUPS[quant_policy], block_size, 2)  # head-major
        k_sz = torch.full(sz_shape, float("nan"), dtype=sz_dtype, device=device)
        v_sz = torch.full(sz_shape, float("nan"), dtype=sz_dtype, device=device)

    slots = []
    for i, n in enumerate(kv_lens):
        pos = torch.arange(n, device=device)
        slots.append(block_tables[i, pos // block_size].long() * block_size + pos % block_size)
    slots = torch.cat(slots)
    k = torch.randn(slots.numel(), num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(slots.numel(), num_kv_heads, head_dim, dtype=dtype, device=device)
    reference.store_kv(k, v, k_cache, v_cache, slots, k_sz, v_sz, quant_policy)
    return k_cache, v_cache, k_sz, v_sz, block_tables


def new_quantized_v_cache(shape, device, token_minor=True):
    """Random uint8 codes of logical shape [num_blocks, block_size, Hk, D_stored]; token_minor: stored as
    [num_blocks, Hk, D_stored, block_size] (reference.py's quantized V layout) and returned as a permuted view."""
    if not token_minor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    nb, bs, hk, d = shape
    return torch.randint(0, 256, (nb, hk, d, bs), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)


def assert_close(out, ref, atol, rtol):
    assert not torch.isnan(out).any(), "kernel output has NaN (unwritten or poisoned data read)"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
