"""Triton paged prefill attention: causal flash attention of packed varlen new tokens over their paged KV cache.

Sequence i's q_len = cu_seqlens_q[i + 1] - cu_seqlens_q[i] new tokens sit at the last q_len positions of its
kv_len cached tokens (already stored), so one kernel serves plain prefill (q_len == kv_len), prefix-cache hits
and chunked prefill (q_len < kv_len). Grid (q tiles, q heads, batch); a program runs an online softmax (base 2,
fp32) over the context tiles its rows can see, applying the causal mask only on the tiles that cross the
diagonal. K/V come from the paged cache through per-token block-table lookups (any block size), dequantized
in registers when quant_policy is 8 or 4. (Prefill reuses each dequantized tile for BLOCK_M query rows, so
unlike decode it dequantizes K/V tiles outright.) Quantized caches of a head_dim reference.kv_rotates hold K and V
rotated by the Hadamard matrix H: the program rotates its q tile once (qH . kH = q . k) and its output once at the end
(the P @ V sum is then in the rotated basis; H H = I).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.paged_kv import (
    LOG2E,
    as_pairs,
    check_attention_inputs,
    group_stride,
    rotate_halves,
    rotate_halves_fp16,
    rotation_args,
    split_pairs,
)


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
    stride_cd,
    stride_szb,
    stride_szh,
    stride_szg,
    stride_szs,
    QUANT_POLICY: tl.constexpr,
    HALF_D: tl.constexpr,
):
    """(lo, hi) halves [BLOCK_N, BLOCK_DH] of BLOCK_N cached head vectors (as stored: rotated when quantized); fp32
    when dequantized, each half with its own (scale, min), else the cache dtype. Masked tokens read as 0."""
    mask = mask_n[:, None] & (offs_d[None, :] < HALF_D)
    rows = block_ids * stride_cb + block_offs * stride_cs + kv_head * stride_ch  # [BLOCK_N]
    ptrs = cache_ptr + rows[:, None] + offs_d[None, :] * stride_cd  # [BLOCK_N, BLOCK_DH]
    if QUANT_POLICY == 4:
        packed = tl.load(ptrs, mask=mask, other=0)  # uint8: element d low nibble, element d + D/2 high nibble
        lo = packed & 0xF
        hi = packed >> 4
    else:
        lo = tl.load(ptrs, mask=mask, other=0)
        hi = tl.load(ptrs + HALF_D * stride_cd, mask=mask, other=0)
    if QUANT_POLICY != 0:
        sz = sz_ptr + block_ids * stride_szb + kv_head * stride_szh + block_offs * stride_szs  # [BLOCK_N]
        scale_lo = tl.load(sz, mask=mask_n, other=0.0).to(tl.float32)
        mn_lo = tl.load(sz + 1, mask=mask_n, other=0.0).to(tl.float32)
        scale_hi = tl.load(sz + stride_szg, mask=mask_n, other=0.0).to(tl.float32)
        mn_hi = tl.load(sz + stride_szg + 1, mask=mask_n, other=0.0).to(tl.float32)
        lo = lo.to(tl.float32) * scale_lo[:, None] + mn_lo[:, None]
        hi = hi.to(tl.float32) * scale_hi[:, None] + mn_hi[:, None]
    return lo, hi


@triton.jit
def _load_v_token_minor(
    cache_ptr,
    pairs_ptr,  # the V scale_zero viewed as one int32 / int64 per (scale, min) pair: [num_blocks, Hk, 2, block_size]
    block_table_ptr,
    start_n,
    block_ids,  # [BLOCK_N] int64 physical block of each token (masked entries: 0)
    block_offs,  # [BLOCK_N]
    kv_head,
    offs_d,  # [BLOCK_DH]
    mask_n,  # [BLOCK_N]
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    stride_pb,
    stride_ph,
    stride_pg,
    QUANT_POLICY: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """A quantized, token-minor V cache's tile as fp32 (lo, hi) halves [BLOCK_N, BLOCK_DH], like _load_kv_tile: read
    as [d, token] tiles so each row is a run of contiguous tokens (the compiler sees that when a tile lies inside one
    block: its block id is then one broadcast load), with codes and scales unmasked along tokens (the addresses stay
    inside allocated blocks, and tokens past the context get scale 0 and min 0), then transposed."""
    if BLOCK_SIZE % BLOCK_N == 0:
        ids = tl.load(block_table_ptr + start_n // BLOCK_SIZE + tl.arange(0, BLOCK_N) * 0).to(tl.int64)
    else:
        ids = block_ids
    rows = ids * stride_cb + block_offs * stride_cs + kv_head * stride_ch  # [BLOCK_N]
    ptrs = cache_ptr + rows[None, :] + offs_d[:, None] * stride_cd  # [BLOCK_DH, BLOCK_N]
    mask_d = (offs_d < HALF_D)[:, None]
    if QUANT_POLICY == 4:
        packed = tl.load(ptrs, mask=mask_d, other=0)  # uint8: element d low nibble, element d + D/2 high nibble
        lo = packed & 0xF
        hi = packed >> 4
    else:
        lo = tl.load(ptrs, mask=mask_d, other=0)
        hi = tl.load(ptrs + HALF_D * stride_cd, mask=mask_d, other=0)
    # (scale, min) pairs read as one int32 / int64 each (paged_kv.split_pairs), unmasked like the codes
    pairs_at = pairs_ptr + ids * stride_pb + kv_head * stride_ph + block_offs  # [BLOCK_N]
    scale_lo, mn_lo = split_pairs(tl.load(pairs_at))  # one pair per half
    scale_hi, mn_hi = split_pairs(tl.load(pairs_at + stride_pg))
    scale_lo = tl.where(mask_n, scale_lo, 0.0)
    scale_hi = tl.where(mask_n, scale_hi, 0.0)
    mn_lo = tl.where(mask_n, mn_lo, 0.0)
    mn_hi = tl.where(mask_n, mn_hi, 0.0)
    lo = lo.to(tl.float32) * scale_lo[None, :] + mn_lo[None, :]
    hi = hi.to(tl.float32) * scale_hi[None, :] + mn_hi[None, :]
    return tl.trans(lo), tl.trans(hi)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_sz_ptr,
    v_sz_ptr,
    block_table_ptr,
    cu_seqlens_q_ptr,
    kv_lens_ptr,
    out_ptr,
    qk_scale,  # softmax scale * log2(e)
    rot_scale,  # ROTATE: 1 / sqrt(head_dim), the Hadamard matrix's scale
    stride_qt,
    stride_qh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    stride_kszb,
    stride_kszh,
    stride_kszg,
    stride_kszs,
    stride_vszb,
    stride_vszh,
    stride_vszg,
    stride_vszs,
    stride_btb,
    stride_ot,
    stride_oh,
    v_pairs_ptr,  # V_TOKEN_MINOR: v_sz as pairs (as_pairs); else a placeholder
    stride_vpb,
    stride_vph,
    stride_vpg,
    GROUP: tl.constexpr,
    QUANT_POLICY: tl.constexpr,
    ROTATE: tl.constexpr,  # the cache holds Hadamard-rotated vectors: q is rotated, the output rotated back
    BLOCK_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    V_TOKEN_MINOR: tl.constexpr,  # quantized V stored token-minor (reference.py), as the model runner allocates it
    DOT_PRECISION: tl.constexpr,
    ROT_PRECISION: tl.constexpr,  # the rotations: "ieee" (fp32 models) or anything else (fp16 dots)
):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = head // GROUP

    q_start = tl.load(cu_seqlens_q_ptr + batch).to(tl.int32)
    q_len = tl.load(cu_seqlens_q_ptr + batch + 1).to(tl.int32) - q_start
    m_start = m_block * BLOCK_M
    if m_start >= q_len:  # the grid covers the longest sequence
        return
    kv_len = tl.load(kv_lens_ptr + batch).to(tl.int32)
    prefix = kv_len - q_len  # cached tokens before the first new one

    offs_m = m_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q_len
    pos_m = prefix + offs_m  # [BLOCK_M] absolute positions of the rows
    offs_d = tl.arange(0, BLOCK_DH)
    mask_md = mask_m[:, None] & (offs_d[None, :] < HALF_D)
    rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :]  # [BLOCK_M, BLOCK_DH]
    q_lo = tl.load(q_ptrs, mask=mask_md, other=0.0)
    q_hi = tl.load(q_ptrs + HALF_D, mask=mask_md, other=0.0)
    if ROTATE:  # q H . k H = q . k
        if ROT_PRECISION == "ieee":
            r_lo, r_hi = rotate_halves(q_lo.to(tl.float32), q_hi.to(tl.float32), rot_scale, HALF_D, "ieee")
        else:  # 16-bit q: exact in fp16 (bf16 within fp16's range), the dots accumulate in fp32
            r_lo, r_hi = rotate_halves_fp16(q_lo, q_hi, rot_scale, HALF_D, False, 0)
        q_lo = r_lo.to(q_ptr.dtype.element_ty)
        q_hi = r_hi.to(q_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
    block_table_ptr += batch * stride_btb

    # tiles entirely at or before the first row's position need no mask; the rest (up to the last row's
    # position) cross the diagonal
    full_end = ((prefix + m_start + 1) // BLOCK_N) * BLOCK_N
    end = tl.minimum(prefix + m_start + BLOCK_M, kv_len)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        block_offs = offs_n % BLOCK_SIZE

        k_lo, k_hi = _load_kv_tile(k_cache_ptr, k_sz_ptr, block_ids, block_offs, kv_head, offs_d, mask_n,
                                   stride_kcb, stride_kcs, stride_kch, stride_kcd,
                                   stride_kszb, stride_kszh, stride_kszg, stride_kszs, QUANT_POLICY,
                                   HALF_D)  # [BLOCK_N, BLOCK_DH]
        s = tl.dot(q_lo, tl.trans(k_lo.to(q_lo.dtype)), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        s = tl.dot(q_hi, tl.trans(k_hi.to(q_hi.dtype)), s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if start_n >= full_end:
            visible = (offs_n[None, :] <= pos_m[:, None]) & mask_n[None, :]
            s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every row sees key 0 in the first tile
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        if V_TOKEN_MINOR:
            v_lo, v_hi = _load_v_token_minor(v_cache_ptr, v_pairs_ptr, block_table_ptr, start_n, block_ids,
                                             block_offs, kv_head, offs_d, mask_n, stride_vcb, stride_vcs, stride_vch,
                                             stride_vcd, stride_vpb, stride_vph, stride_vpg, QUANT_POLICY, HALF_D,
                                             BLOCK_SIZE, BLOCK_N)
        else:
            v_lo, v_hi = _load_kv_tile(v_cache_ptr, v_sz_ptr, block_ids, block_offs, kv_head, offs_d, mask_n,
                                       stride_vcb, stride_vcs, stride_vch, stride_vcd,
                                       stride_vszb, stride_vszh, stride_vszg, stride_vszs, QUANT_POLICY, HALF_D)
        p = p.to(q_lo.dtype)
        acc_lo = tl.dot(p, v_lo.to(q_lo.dtype), acc_lo * alpha[:, None], input_precision=DOT_PRECISION)
        acc_hi = tl.dot(p, v_hi.to(q_lo.dtype), acc_hi * alpha[:, None], input_precision=DOT_PRECISION)

    acc_lo = acc_lo / l_i[:, None]
    acc_hi = acc_hi / l_i[:, None]
    if ROTATE:  # the output in the cache's rotated basis: rotate it back (H H = I), once normalized
        if ROT_PRECISION == "ieee":
            acc_lo, acc_hi = rotate_halves(acc_lo, acc_hi, rot_scale, HALF_D, "ieee")
        else:  # on fp16 tensor cores: the fp32 FMA dot would spill registers
            acc_lo, acc_hi = rotate_halves_fp16(acc_lo, acc_hi, rot_scale, HALF_D, True, 1)
    out_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, acc_lo.to(out_ptr.dtype.element_ty), mask=mask_md)
    tl.store(out_ptrs + HALF_D, acc_hi.to(out_ptr.dtype.element_ty), mask=mask_md)


def default_config(q: torch.Tensor) -> dict:
    """Tile sizes. GPU 16-bit: 128 x 64 tiles, 8 warps (FA2-like on Hopper); fp32 (ieee dots on FMAs) uses 32 x 32 to
    keep registers in check. Interpreter: 16 x 16, so tiny CPU tests cross tile and diagonal boundaries."""
    if not q.is_cuda:
        return {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    if q.dtype == torch.float32:
        return {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 1}
    return {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2}


def prefill_attention_launch(
    q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, k_scale_zero, v_scale_zero, quant_policy,
    max_seqlen_q: int, block_m: int, block_n: int, num_warps: int = 8, num_stages: int = 2,
) -> torch.Tensor:
    """paged_prefill_attention with explicit tiling (tests and benchmarks force it)."""
    num_tokens, num_q_heads, head_dim = q.shape
    batch = kv_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    check_attention_inputs(q, k_cache, v_cache, k_scale_zero, v_scale_zero, block_tables, kv_lens, quant_policy)
    assert cu_seqlens_q.shape == (batch + 1,) and cu_seqlens_q.is_contiguous(), "cu_seqlens_q must be [B + 1]"
    if not quant_policy:
        k_scale_zero, v_scale_zero = k_cache.unsqueeze(0), v_cache.unsqueeze(0)  # unused placeholders, 5-d like them
    rotate, rot_scale = rotation_args(head_dim, quant_policy)

    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)  # [num_tokens, Hq, D]
    if num_tokens == 0 or batch == 0 or max_seqlen_q <= 0:
        return out
    half_d = head_dim // 2
    v_token_minor = bool(quant_policy) and v_cache.stride(1) == 1 and v_cache.stride(-1) != 1
    v_pairs = as_pairs(v_scale_zero) if v_token_minor else v_cache  # else an unused placeholder
    grid = (triton.cdiv(max_seqlen_q, block_m), num_q_heads, batch)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        k_scale_zero,
        v_scale_zero,
        block_tables,
        cu_seqlens_q,
        kv_lens,
        out,
        scale * LOG2E,
        rot_scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_cache.stride(3),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        v_cache.stride(3),
        k_scale_zero.stride(0),
        k_scale_zero.stride(1),
        group_stride(k_scale_zero) if quant_policy else 0,
        k_scale_zero.stride(3),
        v_scale_zero.stride(0),
        v_scale_zero.stride(1),
        group_stride(v_scale_zero) if quant_policy else 0,
        v_scale_zero.stride(3),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        v_pairs,
        v_pairs.stride(0),
        v_pairs.stride(1),
        group_stride(v_pairs) if v_token_minor else 0,
        GROUP=num_q_heads // num_kv_heads,
        QUANT_POLICY=quant_policy,
        ROTATE=rotate,
        BLOCK_SIZE=k_cache.shape[1],
        HALF_D=half_d,
        BLOCK_DH=max(16, triton.next_power_of_2(half_d)),  # tl.dot needs K >= 16
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        V_TOKEN_MINOR=v_token_minor,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ROT_PRECISION="ieee" if q.dtype == torch.float32 else "fp16",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, Hq, D], the new tokens of all sequences, packed
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D or D // 2]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    cu_seqlens_q: torch.Tensor,  # [B + 1] offsets of each sequence's new tokens in q
    kv_lens: torch.Tensor,  # [B] tokens in cache per sequence, new ones included (already stored)
    scale: float,
    k_scale_zero: torch.Tensor | None = None,  # [num_blocks, Hk, G, block_size, 2]
    v_scale_zero: torch.Tensor | None = None,
    quant_policy: int = 0,
    max_seqlen_q: int | None = None,  # host-side hint; computing it from cu_seqlens_q syncs the device
) -> torch.Tensor:
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if cu_seqlens_q.numel() > 1 else 0
    return prefill_attention_launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, k_scale_zero,
                                    v_scale_zero, quant_policy, max_seqlen_q, **default_config(q))
