"""Triton paged decode attention: one new query token per sequence over its whole paged KV cache.

Flash-decoding in two stages:
  stage 1 (`_decode_split_kernel`): grid (batch, kv_heads, splits). A program takes every query head of one kv
      head (GQA: K/V are loaded once per group, the group's heads are the rows of a tl.dot, padded to 16) and one
      contiguous slice of the context, and runs an online softmax over it. int8 / int4 K/V are dequantized in
      registers. It writes the slice's normalized partial output and its log-sum-exp (base 2).
  stage 2 (`_decode_reduce_kernel`): grid (batch, q_heads). Merges the splits' partials by their log-sum-exp.
With a single split (large batch x kv_heads already fills the GPU) stage 1 writes the output directly. The split
count is a runtime argument (one compiled kernel serves every count) picked from shapes alone, so a launch
needs no device sync and can be captured in a CUDA graph.

Head vectors are handled as two halves (d < D/2, d >= D/2), the int4 packing of reference.py, so one code path
serves all cache formats: q.k = q_lo.k_lo + q_hi.k_hi. `_load_kv_tile` is shared with prefill_attention.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
DEFAULT_SM_COUNT = 4  # stands in for the multiprocessor count off-GPU (TRITON_INTERPRET): keeps CPU grids small
WAVES = 4  # stage-1 programs to aim for, per multiprocessor: enough loads in flight to saturate HBM
MAX_SPLITS = 64


@triton.jit
def _load_kv_tile(
    cache_ptr,
    sz_ptr,
    block_ids,  # [BLOCK_N] int64 physical block of each token
    block_offs,  # [BLOCK_N] offset of each token inside its block
    kv_head,
    offs_d,  # [BLOCK_DH]
    mask_n,  # [BLOCK_N]
    stride_cb,
    stride_cs,
    stride_ch,
    stride_szb,
    stride_szs,
    stride_szh,
    QUANT_POLICY: tl.constexpr,
    HALF_D: tl.constexpr,
):
    """(lo, hi) halves [BLOCK_N, BLOCK_DH] of BLOCK_N cached head vectors; fp32 when dequantized, else the cache
    dtype. Masked tokens read as 0."""
    mask = mask_n[:, None] & (offs_d[None, :] < HALF_D)
    rows = block_ids * stride_cb + block_offs * stride_cs + kv_head * stride_ch  # [BLOCK_N]
    ptrs = cache_ptr + rows[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_DH]
    if QUANT_POLICY == 4:
        packed = tl.load(ptrs, mask=mask, other=0)  # uint8: element d low nibble, element d + D/2 high nibble
        lo = packed & 0xF
        hi = packed >> 4
    else:
        lo = tl.load(ptrs, mask=mask, other=0)
        hi = tl.load(ptrs + HALF_D, mask=mask, other=0)
    if QUANT_POLICY != 0:
        sz = sz_ptr + block_ids * stride_szb + block_offs * stride_szs + kv_head * stride_szh  # [BLOCK_N]
        scale = tl.load(sz, mask=mask_n, other=0.0).to(tl.float32)
        mn = tl.load(sz + 1, mask=mask_n, other=0.0).to(tl.float32)
        lo = lo.to(tl.float32) * scale[:, None] + mn[:, None]
        hi = hi.to(tl.float32) * scale[:, None] + mn[:, None]
    return lo, hi


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_sz_ptr,
    v_sz_ptr,
    block_table_ptr,
    kv_lens_ptr,
    out_ptr,  # WRITE_PARTIAL: fp32 partials [B, Hq, num_splits, D]; else the output [B, Hq, D]
    lse_ptr,  # [B, Hq, num_splits] fp32, log2-sum-exp2 of each split's scaled scores (WRITE_PARTIAL only)
    qk_scale,  # softmax scale * log2(e)
    num_splits,  # a runtime value: split counts share one compiled kernel
    stride_qb,
    stride_qh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_kszb,
    stride_kszs,
    stride_kszh,
    stride_vszb,
    stride_vszs,
    stride_vszh,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lseb,
    stride_lseh,
    GROUP: tl.constexpr,
    QUANT_POLICY: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    kv_len = tl.load(kv_lens_ptr + batch).to(tl.int32)
    split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N  # a whole number of tiles
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)  # empty (start >= end) for the tail splits of short contexts

    offs_h = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + offs_h  # [BLOCK_H] query heads of this kv head
    mask_h = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_DH)
    mask_hd = mask_h[:, None] & (offs_d[None, :] < HALF_D)
    q_ptrs = q_ptr + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]  # [BLOCK_H, BLOCK_DH]
    q_lo = tl.load(q_ptrs, mask=mask_hd, other=0.0)
    q_hi = tl.load(q_ptrs + HALF_D, mask=mask_hd, other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc_lo = tl.zeros([BLOCK_H, BLOCK_DH], tl.float32)
    acc_hi = tl.zeros([BLOCK_H, BLOCK_DH], tl.float32)
    block_table_ptr += batch * stride_btb

    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        block_offs = offs_n % BLOCK_SIZE

        k_lo, k_hi = _load_kv_tile(k_cache_ptr, k_sz_ptr, block_ids, block_offs, kv_head, offs_d, mask_n,
                                   stride_kcb, stride_kcs, stride_kch, stride_kszb, stride_kszs, stride_kszh,
                                   QUANT_POLICY, HALF_D)  # [BLOCK_N, BLOCK_DH] each
        s = tl.dot(q_lo, tl.trans(k_lo.to(q_lo.dtype)), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        s = tl.dot(q_hi, tl.trans(k_hi.to(q_hi.dtype)), s, input_precision=DOT_PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        v_lo, v_hi = _load_kv_tile(v_cache_ptr, v_sz_ptr, block_ids, block_offs, kv_head, offs_d, mask_n,
                                   stride_vcb, stride_vcs, stride_vch, stride_vszb, stride_vszs, stride_vszh,
                                   QUANT_POLICY, HALF_D)
        p = p.to(q_lo.dtype)
        acc_lo = tl.dot(p, v_lo.to(q_lo.dtype), acc_lo * alpha[:, None], input_precision=DOT_PRECISION)
        acc_hi = tl.dot(p, v_hi.to(q_lo.dtype), acc_hi * alpha[:, None], input_precision=DOT_PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # an empty split leaves l = 0: its output is 0, its lse -inf
    acc_lo = acc_lo / l_safe[:, None]
    acc_hi = acc_hi / l_safe[:, None]
    out_ptrs = out_ptr + batch * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(out_ptrs, acc_lo.to(out_ptr.dtype.element_ty), mask=mask_hd)
    tl.store(out_ptrs + HALF_D, acc_hi.to(out_ptr.dtype.element_ty), mask=mask_hd)
    if WRITE_PARTIAL:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + batch * stride_lseb + heads * stride_lseh + split, lse, mask=mask_h)


@triton.jit
def _decode_reduce_kernel(
    partial_ptr,  # [B, Hq, num_splits, D] fp32
    lse_ptr,  # [B, Hq, num_splits] fp32
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lseb,
    stride_lseh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    lse = tl.load(lse_ptr + batch * stride_lseb + head * stride_lseh + offs_s, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    weights = tl.exp2(lse - lse_max)  # [BLOCK_S]; empty splits weigh 0
    part_ptrs = partial_ptr + batch * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :]
    parts = tl.load(part_ptrs, mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def default_config(q: torch.Tensor) -> dict:
    """Tile sizes: 64-token tiles, double-buffered, on GPU (32 for fp32, whose dots run on FMAs and would spill);
    16 under the interpreter, so tiny CPU tests still cross tiles."""
    if not q.is_cuda:
        return {"block_n": 16, "num_warps": 4, "num_stages": 1}
    if q.dtype == torch.float32:
        return {"block_n": 32, "num_warps": 4, "num_stages": 2}
    return {"block_n": 64, "num_warps": 4, "num_stages": 2}


def pick_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int, device: torch.device) -> int:
    """Split the context until batch x kv_heads x splits programs fill the GPU (WAVES per multiprocessor), keeping
    at least two tiles per split. Uses shapes only (no device sync), so it is CUDA-graph safe."""
    wanted = triton.cdiv(WAVES * _sm_count(device), max(batch * num_kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(max_context, 2 * block_n), MAX_SPLITS))


def _check_cache(cache, scale_zero, num_kv_heads, head_dim, quant_policy):
    stored_dim = head_dim // 2 if quant_policy == 4 else head_dim
    assert cache.dim() == 4 and cache.shape[2:] == (num_kv_heads, stored_dim), f"bad cache shape {tuple(cache.shape)}"
    assert cache.stride(-1) == 1, "cache head_dim must be contiguous"
    if quant_policy:
        assert cache.dtype == torch.uint8, "quantized caches are uint8"
        assert scale_zero is not None and scale_zero.shape == (*cache.shape[:3], 2), "scale_zero: [nb, bs, Hk, 2]"
        assert scale_zero.stride(-1) == 1, "scale_zero last dim must be contiguous"


def decode_attention_launch(
    q, k_cache, v_cache, block_tables, kv_lens, scale, k_scale_zero, v_scale_zero, quant_policy,
    num_splits: int, block_n: int, num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:
    """paged_decode_attention with explicit split count and tiling (tests and benchmarks force these)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    assert quant_policy in (0, 4, 8), f"quant_policy must be 0, 4 or 8, got {quant_policy}"
    assert num_q_heads % num_kv_heads == 0, "Hq must be a multiple of Hk"
    assert head_dim % 2 == 0 and q.stride(-1) == 1, "q: [B, Hq, D] with even, contiguous D"
    _check_cache(k_cache, k_scale_zero, num_kv_heads, head_dim, quant_policy)
    _check_cache(v_cache, v_scale_zero, num_kv_heads, head_dim, quant_policy)
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.stride(1) == 1
    assert kv_lens.shape == (batch,) and kv_lens.is_contiguous(), "kv_lens must be [B]"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    if not quant_policy:
        k_scale_zero, v_scale_zero = k_cache, v_cache  # unused placeholders (QUANT_POLICY=0)

    out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)  # [B, Hq, D]
    if batch == 0:
        return out
    group = num_q_heads // num_kv_heads
    half_d = head_dim // 2
    if num_splits > 1:
        partial = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        stage1_out, stride_os = partial, partial.stride(2)
    else:
        partial = lse = None
        stage1_out, stride_os = out, 0
    lse_arg = lse if lse is not None else out  # unused placeholder with a single split

    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        k_scale_zero,
        v_scale_zero,
        block_tables,
        kv_lens,
        stage1_out,
        lse_arg,
        scale * LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_scale_zero.stride(0),
        k_scale_zero.stride(1),
        k_scale_zero.stride(2),
        v_scale_zero.stride(0),
        v_scale_zero.stride(1),
        v_scale_zero.stride(2),
        block_tables.stride(0),
        stage1_out.stride(0),
        stage1_out.stride(1),
        stride_os,
        lse_arg.stride(0),
        lse_arg.stride(1),
        GROUP=group,
        QUANT_POLICY=quant_policy,
        BLOCK_SIZE=k_cache.shape[1],
        HALF_D=half_d,
        BLOCK_DH=max(16, triton.next_power_of_2(half_d)),  # tl.dot needs K >= 16
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16: pad the head group
        BLOCK_N=block_n,
        WRITE_PARTIAL=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            partial,
            lse,
            out,
            num_splits,
            partial.stride(0),
            partial.stride(1),
            partial.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=4,
        )
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D or D // 2]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    kv_lens: torch.Tensor,  # [B], the new token included
    scale: float,
    k_scale_zero: torch.Tensor | None = None,  # [num_blocks, block_size, Hk, 2]
    v_scale_zero: torch.Tensor | None = None,
    quant_policy: int = 0,
) -> torch.Tensor:
    cfg = default_config(q)
    max_context = block_tables.shape[1] * k_cache.shape[1]  # an upper bound known without a device sync
    num_splits = pick_num_splits(q.shape[0], k_cache.shape[2], max_context, cfg["block_n"], q.device)
    return decode_attention_launch(q, k_cache, v_cache, block_tables, kv_lens, scale, k_scale_zero, v_scale_zero,
                                   quant_policy, num_splits, **cfg)
