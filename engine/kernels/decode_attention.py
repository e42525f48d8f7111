"""Triton paged decode attention: one new query token per sequence over its whole paged KV cache.

Flash-decoding in one launch, grid (batch, kv_heads, splits). A program takes every query head of one kv head (GQA:
K/V are loaded once per group, the group's heads are the rows of a tl.dot, padded to 16) and one contiguous slice of
the context, and runs an online softmax over it. Splits are as long as the sequence's own context needs (a whole
number of tiles); the programs of splits past its end leave at once (CUDA graphs size the split count for the
longest context, so at short contexts most are empty), and a context that fits one split is written directly. With a
single split (large batch x kv_heads already fills the GPU) it writes the output directly. With several, it writes
the slice's normalized fp32 partial output and log-sum-exp (base 2) to a workspace, and the last program of its
(sequence, kv head) to arrive merges all splits' partials by their log-sum-exp and writes the output: the split-K
scheme of split_k.py. Arrival is counted in a persistent per-device int32 buffer (one counter per (sequence, kv
head), zero between launches: the merging program resets its own). Each program's stores are made visible by a CTA
barrier and the counter's acq_rel atomic; the merging program reads the partials through L2 (.cg), in split order
whichever program arrives last, so the result is deterministic. The split count is a runtime argument (one compiled
kernel serves a single split, one every count from 2 to MERGE_CHUNK, one each further MERGE_CHUNK) picked from
shapes alone, so a launch needs no device sync and can be captured in a CUDA graph; the workspace comes from
torch.empty, and the counters are allocated before capture. The kernel takes part in programmatic dependent launch
(pdl.py): it waits for the previous kernel before its first load or store (the counters too: the previous launch's
merging programs reset them) and lets the next kernel launch at once.

Head vectors are handled as two halves (d < D/2, d >= D/2), the int4 packing of reference.py, so one code path
serves all cache formats: q.k = q_lo.k_lo + q_hi.k_hi. Quantized caches hold Hadamard-rotated vectors
(reference.kv_rotates): the program rotates q once before the loop (qH . kH = q . k) and its normalized output once
after it (fp16 tensor-core dots, the output split into fp16 + residual; an fp32 FMA dot spilled registers). int4
caches have a (scale, min) pair per half, so the halves' score dots are scaled apart and P is scaled per half.

Quantized caches (x = code * scale + min per token and head) are never dequantized element by element: the
per-token affine map moves onto the small operands,
    q.k_n         = scale_n * (q . code_n) + min_n * sum(q)       (a [heads, tokens] fix-up of the scores)
    sum_n p_n v_n = (p * scale) @ codes + sum_n p_n * min_n         (P is scaled before the P @ V dot)
so the [tokens, D] code tiles only have to become 16-bit dot operands, which is done with integer ops:
code | 0x6400 read as fp16 is exactly 1024 + code (inline PTX: two byte permutes per four codes). V's 1024 is
subtracted in fp16x2 (exact) together with the codes' midpoint (128 / 8: centered codes, the min takes
midpoint * scale, so rounding P to fp16 leaves no error common to all of head_dim, which the rotation back would
gather into one output element); K keeps it and the score fix-up takes 1024 * scale * sum(q) off instead (the
tensor cores' fp32 accumulation of V's offset would not be exact enough; K's rounding stays far below the
softmax's). The old path converted every code with int->float instructions (a quarter of the integer rate),
did the affine math on [tokens, D] fp32 tiles, read per-token scales with strided scalar loads that the
software pipeliner skipped, and gathered V's codes from shared memory byte by byte: 3-4x slower than fp16 KV.
16-bit models (fp16 and bf16) share fp16 dots on quantized caches (scale and min are stored in fp16 anyway);
fp32 models convert codes directly and use ieee fp32 dots.

Memory access (reference.py layouts): a tile never straddles a KV block when the block size is a multiple of
BLOCK_N (the engine's case), so its block id is one broadcast load and its rows are contiguous. K is read
transposed ([d, token], d contiguous) and quantized V token-minor ([token, d] with tokens contiguous), so both
dots get their 8-bit codes from shared memory in whole words; each tile's (scale, min) pairs are contiguous and
come in as one int32 (int64 for fp32 models) per token. Every load is software-pipelined, and quantized loads are
unmasked (they stay inside allocated blocks; tokens past the context get -inf scores and zero P weight).
"""

from __future__ import annotations

import functools

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
from engine.kernels.pdl import launch_options, release_next, wait_for_previous
from engine.kernels.reference import KV_GROUPS

DEFAULT_SM_COUNT = 4  # stands in for the multiprocessor count off-GPU (TRITON_INTERPRET): keeps CPU grids small
PROGRAMS_PER_SM = 4  # programs to aim for per multiprocessor: enough loads in flight to saturate HBM
MIN_SPLIT_TILES = 2  # ... but no split shorter than this many tiles
MAX_SPLITS = 64
MERGE_CHUNK = 16  # splits merged per unrolled step (one [MERGE_CHUNK, D / 2] fp32 tile per half and head)
MIN_ARRIVAL_COUNTERS = 1 << 14  # (sequence, kv head) counters allocated up front: max batch 256 x 64 kv heads


@triton.jit
def _codes_to_dot(codes, DOT_DTYPE: tl.constexpr, CVT: tl.constexpr, KEEP_OFFSET: tl.constexpr,
                  CENTER: tl.constexpr):
    """uint8 codes (0..255) -> exactly equal DOT_DTYPE values: code + 1024 with KEEP_OFFSET (CVT > 0; code with
    CVT 0), else the centered code - CENTER (CENTER 128 for 8-bit codes, 8 for 4-bit ones: the P @ V dot's rounding
    of P then leaves no common-mode error across head_dim, which the Hadamard rotation back would pile onto one
    output element). CVT 0: a plain conversion. 1: (code | 0x6400) read as fp16 is exactly 1024 + code, and
    subtracting 1024 + CENTER is exact too. 2: the same in PTX, four codes at a time (two byte permutes, and two
    fp16x2 subtractions unless KEEP_OFFSET; CUDA only). The int->float conversion instructions run at a quarter of
    the integer rate."""
    if CVT == 2:
        if KEEP_OFFSET:
            x = tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 magic;
                mov.b32 magic, 0x64646464;
                prmt.b32 $0, $2, magic, 0x4140;
                prmt.b32 $1, $2, magic, 0x4342;
                }""",
                constraints="=r,=r,r",
                args=[codes],
                dtype=tl.float16,
                is_pure=True,
                pack=4,
            )
        else:
            tl.static_assert(CENTER == 128, "PTX conversion of centered 8-bit codes only")
            x = tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 magic, offset;
                mov.b32 magic, 0x64646464;
                mov.b32 offset, 0x64806480;
                prmt.b32 $0, $2, magic, 0x4140;
                prmt.b32 $1, $2, magic, 0x4342;
                sub.f16x2 $0, $0, offset;
                sub.f16x2 $1, $1, offset;
                }""",
                constraints="=r,=r,r",
                args=[codes],
                dtype=tl.float16,
                is_pure=True,
                pack=4,
            )
    elif CVT == 1:
        x = (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
        if not KEEP_OFFSET:
            x = x - (1024.0 + CENTER)
    else:
        x = codes.to(DOT_DTYPE)
        if not KEEP_OFFSET:
            x = x - CENTER
    return x


@triton.jit
def _nibbles_to_dot(packed, DOT_DTYPE: tl.constexpr, CVT: tl.constexpr, KEEP_OFFSET: tl.constexpr):
    """uint8 bytes of two 4-bit codes -> (low nibbles, high nibbles) as _codes_to_dot converts codes (centered:
    code - 8)."""
    if CVT == 2 and KEEP_OFFSET:
        lo, hi = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 magic, l, h;
            mov.b32 magic, 0x64646464;
            and.b32 l, $4, 0x0F0F0F0F;
            shr.u32 h, $4, 4;
            and.b32 h, h, 0x0F0F0F0F;
            prmt.b32 $0, l, magic, 0x4140;
            prmt.b32 $1, l, magic, 0x4342;
            prmt.b32 $2, h, magic, 0x4140;
            prmt.b32 $3, h, magic, 0x4342;
            }""",
            constraints="=r,=r,=r,=r,r",
            args=[packed],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=4,
        )
    elif CVT == 2:
        lo, hi = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 magic, offset, l, h;
            mov.b32 magic, 0x64646464;
            mov.b32 offset, 0x64086408;
            and.b32 l, $4, 0x0F0F0F0F;
            shr.u32 h, $4, 4;
            and.b32 h, h, 0x0F0F0F0F;
            prmt.b32 $0, l, magic, 0x4140;
            prmt.b32 $1, l, magic, 0x4342;
            prmt.b32 $2, h, magic, 0x4140;
            prmt.b32 $3, h, magic, 0x4342;
            sub.f16x2 $0, $0, offset;
            sub.f16x2 $1, $1, offset;
            sub.f16x2 $2, $2, offset;
            sub.f16x2 $3, $3, offset;
            }""",
            constraints="=r,=r,=r,=r,r",
            args=[packed],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=4,
        )
    else:
        lo = _codes_to_dot(packed & 0xF, DOT_DTYPE, CVT, KEEP_OFFSET, 8)
        hi = _codes_to_dot(packed >> 4, DOT_DTYPE, CVT, KEEP_OFFSET, 8)
    return lo, hi


@triton.jit
def _load_codes(ptrs, hi_offset, QUANT_POLICY: tl.constexpr, DOT_DTYPE: tl.constexpr, CVT: tl.constexpr,
                KEEP_OFFSET: tl.constexpr):
    """(lo, hi) halves of a tile of stored head vectors as DOT_DTYPE codes (_codes_to_dot). Unmasked: callers only
    pass addresses inside allocated blocks, and codes of tokens past the context are neutralized downstream."""
    if QUANT_POLICY == 4:
        lo, hi = _nibbles_to_dot(tl.load(ptrs), DOT_DTYPE, CVT, KEEP_OFFSET)  # element d low nibble, d + D/2 high
    else:
        lo = _codes_to_dot(tl.load(ptrs), DOT_DTYPE, CVT, KEEP_OFFSET, 128)
        hi = _codes_to_dot(tl.load(ptrs + hi_offset), DOT_DTYPE, CVT, KEEP_OFFSET, 128)
    return lo, hi


@triton.jit
def _merge_splits(partial_ptr, lse_ptr, out_ptr, heads, num_splits, stride_ph, stride_ps, stride_lseh, stride_oh,
                  GROUP: tl.constexpr, HALF_D: tl.constexpr, BLOCK_DH: tl.constexpr, MERGE_CHUNK: tl.constexpr,
                  MERGE_STEPS: tl.constexpr):
    """The output rows of `heads` (GROUP query heads; pointers already offset to the sequence) from the partials
    of num_splits <= MERGE_STEPS * MERGE_CHUNK splits: out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse).
    Splits are summed in a fixed order (chunk by chunk, a fixed tree within a chunk). Partials other programs wrote
    are read through L2 (.cg): L1 is not coherent across multiprocessors."""
    offs_s = tl.arange(0, MERGE_CHUNK)
    offs_d = tl.arange(0, BLOCK_DH)
    mask_d = offs_d < HALF_D
    for g in tl.static_range(GROUP):
        head = heads + g
        lse_ptrs = lse_ptr + head * stride_lseh + offs_s
        lse_max = tl.full([MERGE_CHUNK], float("-inf"), tl.float32)
        for c in tl.static_range(MERGE_STEPS):
            mask_s = c * MERGE_CHUNK + offs_s < num_splits
            lse = tl.load(lse_ptrs + c * MERGE_CHUNK, mask=mask_s, other=float("-inf"), cache_modifier=".cg")
            lse_max = tl.maximum(lse_max, lse)
        lse_max = tl.max(lse_max, axis=0)
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty (kv_len 0): output 0
        denom = tl.zeros([MERGE_CHUNK], tl.float32)
        out_lo = tl.zeros([BLOCK_DH], tl.float32)
        out_hi = tl.zeros([BLOCK_DH], tl.float32)
        part_ptrs = partial_ptr + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :]
        for c in tl.static_range(MERGE_STEPS):  # unrolled: every chunk's loads can be in flight at once
            mask_s = c * MERGE_CHUNK + offs_s < num_splits
            lse = tl.load(lse_ptrs + c * MERGE_CHUNK, mask=mask_s, other=float("-inf"), cache_modifier=".cg")
            weights = tl.exp2(lse - lse_max)  # [MERGE_CHUNK]; empty splits weigh 0
            denom += weights
            mask = mask_s[:, None] & mask_d[None, :]
            ptrs = part_ptrs + c * MERGE_CHUNK * stride_ps
            lo = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")  # [MERGE_CHUNK, BLOCK_DH]
            hi = tl.load(ptrs + HALF_D, mask=mask, other=0.0, cache_modifier=".cg")
            out_lo += tl.sum(lo * weights[:, None], axis=0)
            out_hi += tl.sum(hi * weights[:, None], axis=0)
        denom = tl.sum(denom, axis=0)
        denom = tl.where(denom > 0.0, denom, 1.0)
        out_ptrs = out_ptr + head * stride_oh + offs_d
        tl.store(out_ptrs, (out_lo / denom).to(out_ptr.dtype.element_ty), mask=mask_d)
        tl.store(out_ptrs + HALF_D, (out_hi / denom).to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit(do_not_specialize=["num_splits"])  # one compiled kernel for every count (not 1 / multiples of 16)
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_sz_ptr,
    v_sz_ptr,
    block_table_ptr,
    kv_lens_ptr,
    out_ptr,  # the output [B, Hq, D]
    partial_ptr,  # SPLIT: fp32 partial outputs [B, Hq, num_splits, D] (a workspace)
    lse_ptr,  # SPLIT: [B, Hq, num_splits] fp32, log2-sum-exp2 of each split's scaled scores
    arrivals_ptr,  # SPLIT: int32 counters, one per (sequence, kv head), zero between launches
    qk_scale,  # softmax scale * log2(e)
    rot_scale,  # ROTATE: 1 / sqrt(head_dim), the Hadamard matrix's scale
    num_splits,  # a runtime value: split counts share a compiled kernel (per MERGE_STEPS)
    stride_qb,
    stride_qh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    stride_kszb,
    stride_kszh,
    stride_kszg,
    stride_vszb,
    stride_vszh,
    stride_vszg,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lseb,
    stride_lseh,
    GROUP: tl.constexpr,
    QUANT_POLICY: tl.constexpr,
    GROUPS: tl.constexpr,  # quantized: (scale, min) pairs per head vector, 1 or 2 (one per half)
    ROTATE: tl.constexpr,  # the cache holds Hadamard-rotated vectors: q is rotated, the output rotated back
    BLOCK_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: partials, merged by the last program of each (sequence, kv head)
    MERGE_CHUNK: tl.constexpr,
    MERGE_STEPS: tl.constexpr,  # SPLIT: cdiv(num_splits, MERGE_CHUNK)
    DOT_DTYPE: tl.constexpr,  # operand type of both dots
    CVT: tl.constexpr,  # quantized: how codes become dot operands (_codes_to_dot)
    DOT_PRECISION: tl.constexpr,
    ROT_PRECISION: tl.constexpr,  # the rotations: "ieee" (fp32 models) or anything else (fp16 dots)
    USE_PDL: tl.constexpr,
):
    # q is the previous kernel's output (block tables and kv lengths are treated as such too), and the counters
    # and workspace are only safe to touch once the previous launch is done: wait before any load or store
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    kv_len = tl.load(kv_lens_ptr + batch).to(tl.int32)
    split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N  # a whole number of tiles
    # splits that hold tokens: with a short context (CUDA graphs size num_splits for the longest) the tail splits
    # are empty, and their programs leave at once: no partials, no arrival, nothing for the merge to read
    live = tl.cdiv(kv_len, tl.maximum(split_len, 1))
    live = tl.maximum(live, 1)  # kv_len 0: split 0 alone writes the (zero) output
    if split >= live:
        return
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)

    offs_h = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + offs_h  # [BLOCK_H] query heads of this kv head
    mask_h = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_DH)
    mask_hd = mask_h[:, None] & (offs_d[None, :] < HALF_D)
    q_ptrs = q_ptr + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]  # [BLOCK_H, BLOCK_DH]
    q_lo = tl.load(q_ptrs, mask=mask_hd, other=0.0)
    q_hi = tl.load(q_ptrs + HALF_D, mask=mask_hd, other=0.0)
    if ROTATE:  # q H . k H = q . k
        if ROT_PRECISION == "ieee":
            q_lo, q_hi = rotate_halves(q_lo.to(tl.float32), q_hi.to(tl.float32), rot_scale, HALF_D, "ieee")
        else:  # q becomes fp16 for the dots anyway (DOT_DTYPE)
            q_lo, q_hi = rotate_halves_fp16(q_lo, q_hi, rot_scale, HALF_D, False, 0)
    q_lo = q_lo.to(DOT_DTYPE)
    q_hi = q_hi.to(DOT_DTYPE)
    if QUANT_POLICY != 0:
        q_sum_lo = tl.sum(q_lo.to(tl.float32), axis=1)  # [BLOCK_H], one per half (GROUPS 2: each has its own min)
        q_sum_hi = tl.sum(q_hi.to(tl.float32), axis=1)
        if GROUPS == 1:
            q_sum_lo += q_sum_hi
        # sum_n p_n and sum_n p_n * min_n (per group) kept per lane and reduced once after the loop (no per-tile
        # reductions)
        l_acc = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        p_min_lo_acc = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        if GROUPS == 2:
            p_min_hi_acc = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
    if CVT != 0:
        K_OFFSET: tl.constexpr = 1024.0  # K codes enter the dot as 1024 + code (_codes_to_dot, KEEP_OFFSET)
    else:
        K_OFFSET: tl.constexpr = 0.0
    if QUANT_POLICY == 4:  # V codes enter the dot centered: code - V_CENTER (_codes_to_dot)
        V_CENTER: tl.constexpr = 8.0
    else:
        V_CENTER: tl.constexpr = 128.0

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc_lo = tl.zeros([BLOCK_H, BLOCK_DH], tl.float32)
    acc_hi = tl.zeros([BLOCK_H, BLOCK_DH], tl.float32)
    block_table_ptr += batch * stride_btb
    k_cache_ptr += kv_head * stride_kch
    v_cache_ptr += kv_head * stride_vch
    k_sz_ptr += kv_head * stride_kszh
    v_sz_ptr += kv_head * stride_vszh
    offs_t = tl.arange(0, BLOCK_N)

    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_t
        mask_n = offs_n < end
        if BLOCK_SIZE % BLOCK_N == 0:
            # the tile lies inside one block (start_n is a multiple of BLOCK_N): one broadcast block id, unmasked
            # (start_n < kv_len, so the entry exists), contiguous token rows
            block_ids = tl.load(block_table_ptr + start_n // BLOCK_SIZE + offs_t * 0).to(tl.int64)
        else:
            block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        tok = offs_n % BLOCK_SIZE
        k_rows = block_ids * stride_kcb + tok * stride_kcs  # [BLOCK_N]
        v_rows = block_ids * stride_vcb + tok * stride_vcs
        v_ptrs = v_cache_ptr + v_rows[:, None] + offs_d[None, :] * stride_vcd  # [BLOCK_N, BLOCK_DH]

        if QUANT_POLICY == 0:
            k_ptrs = k_cache_ptr + k_rows[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_DH]
            mask_nd = mask_n[:, None] & (offs_d[None, :] < HALF_D)
            k_lo = tl.load(k_ptrs, mask=mask_nd, other=0.0).to(DOT_DTYPE)
            k_hi = tl.load(k_ptrs + HALF_D, mask=mask_nd, other=0.0).to(DOT_DTYPE)
            v_lo = tl.load(v_ptrs, mask=mask_nd, other=0.0).to(DOT_DTYPE)
            v_hi = tl.load(v_ptrs + HALF_D * stride_vcd, mask=mask_nd, other=0.0).to(DOT_DTYPE)
            s = tl.dot(q_lo, tl.trans(k_lo), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
            s = tl.dot(q_hi, tl.trans(k_hi), s, input_precision=DOT_PRECISION)
            s = s * qk_scale
        else:
            # All loads unmasked: tokens past the context sit in allocated blocks (the tail of the last block, or
            # block 0 for masked block-table entries); their scores are masked to -inf and their P weights zeroed.
            # K is read transposed ([d, token]) so the codes can go from shared memory to the dot in 4-byte words.
            k_t_ptrs = k_cache_ptr + k_rows[None, :] + offs_d[:, None]  # [BLOCK_DH, BLOCK_N]
            k_lo, k_hi = _load_codes(k_t_ptrs, HALF_D, QUANT_POLICY, DOT_DTYPE, CVT, True)  # [BLOCK_DH, BLOCK_N]
            v_lo, v_hi = _load_codes(v_ptrs, HALF_D * stride_vcd, QUANT_POLICY, DOT_DTYPE, CVT, False)
            # (scale, min) pairs of each group, contiguous inside a block, each read as one integer twice their
            # width: [BLOCK_N]
            k_pairs_at = k_sz_ptr + block_ids * stride_kszb + tok
            v_pairs_at = v_sz_ptr + block_ids * stride_vszb + tok
            k_scale_lo, k_min_lo = split_pairs(tl.load(k_pairs_at))
            v_scale_lo, v_min_lo = split_pairs(tl.load(v_pairs_at))
            v_min_lo = v_min_lo + V_CENTER * v_scale_lo  # v = (code - V_CENTER) * scale + (min + V_CENTER * scale)
            s = tl.dot(q_lo, k_lo, input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]: q . (K_OFFSET + code)
            if GROUPS == 1:  # one (scale, min) for the whole vector
                s = tl.dot(q_hi, k_hi, s, input_precision=DOT_PRECISION)
            else:  # the halves' dots scaled on their own
                k_scale_hi, k_min_hi = split_pairs(tl.load(k_pairs_at + stride_kszg))
                v_scale_hi, v_min_hi = split_pairs(tl.load(v_pairs_at + stride_vszg))
                v_min_hi = v_min_hi + V_CENTER * v_scale_hi
                s_hi = tl.dot(q_hi, k_hi, input_precision=DOT_PRECISION)
                k_scale_hi = k_scale_hi * qk_scale
                k_bias_hi = k_min_hi * qk_scale - K_OFFSET * k_scale_hi
                s_hi = s_hi * k_scale_hi[None, :] + q_sum_hi[:, None] * k_bias_hi[None, :]
            k_scale_lo = k_scale_lo * qk_scale
            k_bias_lo = k_min_lo * qk_scale - K_OFFSET * k_scale_lo
            s = s * k_scale_lo[None, :] + q_sum_lo[:, None] * k_bias_lo[None, :]
            if GROUPS == 2:
                s += s_hi
        s = tl.where(mask_n[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        m_i = m_new
        if QUANT_POLICY == 0:
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p_lo = p.to(DOT_DTYPE)
            p_hi = p_lo
        else:
            # past-the-context scales and mins may be anything (NaN)
            v_scale_lo = tl.where(mask_n, v_scale_lo, 0.0)
            v_min_lo = tl.where(mask_n, v_min_lo, 0.0)
            l_acc = l_acc * alpha[:, None] + p
            p_min_lo_acc = p_min_lo_acc * alpha[:, None] + p * v_min_lo[None, :]
            p_lo = (p * v_scale_lo[None, :]).to(DOT_DTYPE)
            if GROUPS == 1:
                p_hi = p_lo
            else:
                v_scale_hi = tl.where(mask_n, v_scale_hi, 0.0)
                v_min_hi = tl.where(mask_n, v_min_hi, 0.0)
                p_min_hi_acc = p_min_hi_acc * alpha[:, None] + p * v_min_hi[None, :]
                p_hi = (p * v_scale_hi[None, :]).to(DOT_DTYPE)
        acc_lo = tl.dot(p_lo, v_lo, acc_lo * alpha[:, None], input_precision=DOT_PRECISION)
        acc_hi = tl.dot(p_hi, v_hi, acc_hi * alpha[:, None], input_precision=DOT_PRECISION)

    if QUANT_POLICY != 0:
        l_i = tl.sum(l_acc, axis=1)
        p_min_lo = tl.sum(p_min_lo_acc, axis=1)
        acc_lo += p_min_lo[:, None]
        if GROUPS == 1:
            acc_hi += p_min_lo[:, None]
        else:
            acc_hi += tl.sum(p_min_hi_acc, axis=1)[:, None]
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # an empty split leaves l = 0: its output is 0, its lse -inf
    acc_lo = acc_lo / l_safe[:, None]
    acc_hi = acc_hi / l_safe[:, None]
    if ROTATE:  # the output in the cache's rotated basis: rotate it back (H H = I), once normalized
        if ROT_PRECISION == "ieee":
            acc_lo, acc_hi = rotate_halves(acc_lo, acc_hi, rot_scale, HALF_D, "ieee")
        else:  # on fp16 tensor cores: the fp32 FMA dot would spill registers
            acc_lo, acc_hi = rotate_halves_fp16(acc_lo, acc_hi, rot_scale, HALF_D, True, 1)
    if not SPLIT or live == 1:  # one split holds the whole context: its output is final
        out_ptrs = out_ptr + batch * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, acc_lo.to(out_ptr.dtype.element_ty), mask=mask_hd)
        tl.store(out_ptrs + HALF_D, acc_hi.to(out_ptr.dtype.element_ty), mask=mask_hd)
    else:
        partial_ptr += batch * stride_pb
        lse_ptr += batch * stride_lseb
        part_ptrs = partial_ptr + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :]
        tl.store(part_ptrs, acc_lo, mask=mask_hd)
        tl.store(part_ptrs + HALF_D, acc_hi, mask=mask_hd)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + heads * stride_lseh + split, lse, mask=mask_h)
        # The last program of this (sequence, kv head) to arrive merges. The barrier orders every thread's stores
        # before the counter's release; its acquire orders the merging program's loads after all other programs'
        # releases.
        tl.debug_barrier()
        counter = arrivals_ptr + batch * tl.num_programs(1) + kv_head
        count = tl.atomic_add(counter, 1, sem="acq_rel")
        if count == live - 1:
            _merge_splits(partial_ptr, lse_ptr, out_ptr + batch * stride_ob, kv_head * GROUP, live, stride_ph,
                          stride_ps, stride_lseh, stride_oh, GROUP, HALF_D, BLOCK_DH, MERGE_CHUNK, MERGE_STEPS)
            tl.store(counter, 0)  # ready for the next launch (and the next CUDA graph replay)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def default_config(q: torch.Tensor, block_size: int | None = None, quant_policy: int = 0) -> dict:
    """Tile sizes: 64-token tiles, double-buffered, on GPU (32 for fp32, whose dots run on FMAs and would spill);
    16 under the interpreter, so tiny CPU tests still cross tiles. Quantized caches run 2 warps per program (fewer
    cross-warp reductions per tile; measured 3-10% faster than 4 on an H200). A tile is shrunk to the KV block size
    when that is a smaller power of two (>= 16), so tiles never straddle blocks."""
    if not q.is_cuda:
        cfg = {"block_n": 16, "num_warps": 4, "num_stages": 1}
    elif q.dtype == torch.float32:
        cfg = {"block_n": 32, "num_warps": 4, "num_stages": 2}
    else:
        cfg = {"block_n": 64, "num_warps": 2 if quant_policy else 4, "num_stages": 2}
    if block_size is not None and 16 <= block_size < cfg["block_n"] and block_size & (block_size - 1) == 0:
        cfg["block_n"] = block_size
    return cfg


def pick_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int, device: torch.device) -> int:
    """Split the context until batch x kv_heads x splits programs fill the GPU (about PROGRAMS_PER_SM per
    multiprocessor, rounding down so a launch does not spill a small second wave), keeping every split at least
    MIN_SPLIT_TILES tiles long. Uses shapes only (no device sync), so it is CUDA-graph safe; `max_context` is an
    upper bound (the block table's width in tokens). Measured on an H200 at ctx 8k (CUDA-graph timing): B=1 is
    fastest at 16 splits with 32 kv heads and 64 with 8, B=16 at 1 and 4, for fp16 and quantized caches alike."""
    wanted = PROGRAMS_PER_SM * _sm_count(device) // max(batch * num_kv_heads, 1)
    return max(1, min(wanted, triton.cdiv(max_context, MIN_SPLIT_TILES * block_n), MAX_SPLITS))


def _dot_types(q: torch.Tensor, quant_policy: int):
    """(DOT_DTYPE, CVT, DOT_PRECISION) for the query's dtype and device and the cache format."""
    if q.dtype == torch.float32:
        return tl.float32, 0, "ieee"
    if quant_policy == 0:
        return (tl.float16 if q.dtype == torch.float16 else tl.bfloat16), 0, "tf32"
    return tl.float16, 2 if q.is_cuda else 1, "tf32"  # inline PTX on CUDA; its pure-Triton twin interpreted


_ARRIVALS: dict[torch.device, torch.Tensor] = {}
_RETIRED_ARRIVALS: list[torch.Tensor] = []


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """The split merge's per-(sequence, kv head) arrival counters: int32, zero between launches (the merging program
    resets its own). Allocated once per device, before CUDA graph capture (the engine warms up every captured batch
    size first); a larger buffer, if ever needed, replaces it outside capture and the old one is kept alive, since
    graphs captured earlier still point at it. Kernels of one launch use disjoint counters, and launches on a stream
    run one after the other (PDL included: the kernel waits for the previous one before touching them)."""
    counters = _ARRIVALS.get(device)
    if counters is None or counters.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode attention: run a batch this large once before CUDA graph capture "
                               "(the arrival counters must be allocated and zeroed outside the graph)")
        if counters is not None:
            _RETIRED_ARRIVALS.append(counters)
        counters = torch.zeros(max(n, MIN_ARRIVAL_COUNTERS), dtype=torch.int32, device=device)
        _ARRIVALS[device] = counters
    return counters


def decode_attention_launch(
    q, k_cache, v_cache, block_tables, kv_lens, scale, k_scale_zero, v_scale_zero, quant_policy,
    num_splits: int, block_n: int, num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:
    """paged_decode_attention with explicit split count and tiling (tests and benchmarks force these)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    check_attention_inputs(q, k_cache, v_cache, k_scale_zero, v_scale_zero, block_tables, kv_lens, quant_policy)
    assert num_splits >= 1
    if quant_policy:
        k_pairs, v_pairs = as_pairs(k_scale_zero), as_pairs(v_scale_zero)  # [nb, Hk, G, block_size] int32 / int64
    else:
        k_pairs, v_pairs = k_cache, v_cache  # unused placeholders (QUANT_POLICY=0)

    out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)  # [B, Hq, D]
    if batch == 0:
        return out
    group = num_q_heads // num_kv_heads
    half_d = head_dim // 2
    if num_splits > 1:
        # one workspace: partial outputs [B, Hq, splits, D], then log-sum-exps [B, Hq, splits]
        n_part = batch * num_q_heads * num_splits * head_dim
        ws = torch.empty(n_part + batch * num_q_heads * num_splits, dtype=torch.float32, device=q.device)
        partial = ws[:n_part].view(batch, num_q_heads, num_splits, head_dim)
        lse = ws[n_part:].view(batch, num_q_heads, num_splits)
        arrivals = arrival_counters(q.device, batch * num_kv_heads)
    else:
        partial, lse, arrivals = out.unsqueeze(2), out, kv_lens  # unused placeholders with a single split
    dot_dtype, cvt, precision = _dot_types(q, quant_policy)
    rotate, rot_scale = rotation_args(head_dim, quant_policy)

    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        k_pairs,
        v_pairs,
        block_tables,
        kv_lens,
        out,
        partial,
        lse,
        arrivals,
        scale * LOG2E,
        rot_scale,
        num_splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        v_cache.stride(3),
        k_pairs.stride(0),
        k_pairs.stride(1),
        group_stride(k_pairs) if quant_policy else 0,
        v_pairs.stride(0),
        v_pairs.stride(1),
        group_stride(v_pairs) if quant_policy else 0,
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        GROUP=group,
        QUANT_POLICY=quant_policy,
        GROUPS=KV_GROUPS[quant_policy] if quant_policy else 1,
        ROTATE=rotate,
        BLOCK_SIZE=k_cache.shape[1],
        HALF_D=half_d,
        BLOCK_DH=max(16, triton.next_power_of_2(half_d)),  # tl.dot needs K >= 16
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16: pad the head group
        BLOCK_N=block_n,
        SPLIT=num_splits > 1,
        MERGE_CHUNK=MERGE_CHUNK,
        MERGE_STEPS=triton.cdiv(num_splits, MERGE_CHUNK) if num_splits > 1 else 1,
        DOT_DTYPE=dot_dtype,
        CVT=cvt,
        DOT_PRECISION=precision,
        ROT_PRECISION="ieee" if q.dtype == torch.float32 else "fp16",
        num_warps=num_warps,
        num_stages=num_stages,
        **launch_options(q),
    )
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D or D // 2]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    kv_lens: torch.Tensor,  # [B], the new token included
    scale: float,
    k_scale_zero: torch.Tensor | None = None,  # [num_blocks, Hk, G, block_size, 2]
    v_scale_zero: torch.Tensor | None = None,
    quant_policy: int = 0,
) -> torch.Tensor:
    cfg = default_config(q, k_cache.shape[1], quant_policy)
    max_context = block_tables.shape[1] * k_cache.shape[1]  # an upper bound known without a device sync
    num_splits = pick_num_splits(q.shape[0], k_cache.shape[2], max_context, cfg["block_n"], q.device)
    return decode_attention_launch(q, k_cache, v_cache, block_tables, kv_lens, scale, k_scale_zero, v_scale_zero,
                                   quant_policy, num_splits, **cfg)
