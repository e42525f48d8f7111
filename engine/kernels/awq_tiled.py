"""W4A16 matmul over a tile-contiguous repack of AWQ 4-bit weights (x [M, K] fp16/bf16/fp32 @ W [K, N], G input
rows per group): the layout is made for the kernel's load, not for the checkpoint.

Why: the K-packed layout of awq_gemm.py gives each program [BLOCK_N, C / 4] int16 tiles made of 64-byte row
pieces strided by the row length (K / 2 bytes), plus scales and zero points from two other tensors; at batch 1
that kernel reaches ~0.5 of the copy rate where a read-only pass over the same bytes reaches ~0.8 and the dense
GEMV (thin tiles of long contiguous rows) 0.8-1.0. Here every weight tile, with its scales and zero points, is
one contiguous block, and the tiles a program walks along K are adjacent: each program streams one contiguous
range of memory, and each warp's load instruction covers 512 contiguous bytes.

Layout (awq_tile_repack; reference.awq_unpack_tiled decodes it in plain torch), int16
[N_pad / LAYOUT_N, K / C, TILE_ROWS, C / 4] with C = min(G, 128), N padded to a multiple of LAYOUT_N (zero codes,
zero scales) and TILE_ROWS = LAYOUT_N + META_ROWS:
- rows 0 .. LAYOUT_N - 1 of tile [b, c]: output columns b LAYOUT_N + r, input chunk c, exactly as the K-packed
  layout holds them: int16 t (0 <= t < C / 4) holds in bits 4i..4i+3 (i = 0..3) the code of input row
  C c + (C / 4) i + t, so the inline-PTX nibble decoding and the per-nibble MMAs of awq_gemm.py apply unchanged;
- the META_ROWS = ceil(5 LAYOUT_N / C) rows after them, read flat: LAYOUT_N scales (16-bit, in the checkpoint's
  scale dtype) of the chunk's group, then LAYOUT_N / 8 int32 of zero points in natural order (nibble j of int32 w
  = column 8 w + j), then padding. Groups longer than 128 rows repeat their scales and zeros per 128-row chunk.
Bytes: the same as the checkpoint's codes + zeros + scales (plus < 1% padding for group 128, LAYOUT_N 128).

Kernel (awq_tiled_kernel): the tensor-core scheme of awq_gemm.awq_mma_kernel on this layout. M <= 32: weights on
the MMA's M side (SWAP_AB), one K = C / 4 MMA per nibble (SPLIT_DOTS), codes through the MMA as they are and zero
point / scale applied once per group and output (FOLD). Larger M: the tile is dequantized in registers first
((q - z) * s in packed half ops), then one MMA per tile; with SWAP_AB the dequantized weights are the MMA's
register operand (on Hopper a wgmma may take A from registers, B = x from shared memory). Split-K and PDL as in
split_k.py / pdl.py; a program's BLOCK_N divides LAYOUT_N, so its loads never leave the layout: no load masks.
Prefill (M > FUSED_MAX_M): dequantize into an [N, K] weight (awq_tiled_dequantize) and let cuBLAS run the GEMM.
Tile configs: default_config (a first guess to be replaced by benchmarks/bench_awq_tiled.py's sweep).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# the nibble decoders (plain Triton and inline PTX) are shared with the K-packed kernels
from engine.kernels.awq_gemm import _DECODE, _asm_sources, _nibbles, awq_repack, k_chunk
from engine.kernels.pdl import launch_options, release_next, wait_for_previous
from engine.kernels.reference import awq_unpack
from engine.kernels.split_k import num_sms, split_k, split_k_epilogue, split_locks

FUSED_MAX_M = 256  # above: dequantize + cuBLAS (as awq_gemm)
LAYOUT_N = 128  # output columns per layout tile: programs use BLOCK_N = 32, 64 or 128


# ---- layout -----------------------------------------------------------------------------------------------
def meta_rows(layout_n: int, chunk: int) -> int:
    """Rows of C / 4 int16 after a tile's codes: layout_n scales + layout_n / 8 int32 zeros = 5 layout_n / 4 int16."""
    return triton.cdiv(5 * layout_n, chunk)


def tiled_shape(N: int, K: int, group_size: int, layout_n: int = LAYOUT_N) -> tuple[int, int, int, int]:
    C = k_chunk(group_size)
    return triton.cdiv(N, layout_n), K // C, layout_n + meta_rows(layout_n, C), C // 4


@torch.no_grad()
def awq_tile_repack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                    layout_n: int = LAYOUT_N) -> torch.Tensor:
    """AutoAWQ GEMM tensors (qweight int32 [K, N / 8], qzeros int32 [K / G, N / 8], scales [K / G, N] fp16/bf16)
    -> the tile-contiguous int16 [N_pad / layout_n, K / C, TILE_ROWS, C / 4] above, on qweight's device."""
    K, N = qweight.shape[0], qweight.shape[1] * 8
    assert scales.dtype in (torch.float16, torch.bfloat16), "scales are stored as 16-bit values"
    assert scales.shape == (K // group_size, N) and qzeros.shape == (K // group_size, N // 8), "shapes"
    assert layout_n % 32 == 0, "layout_n: a multiple of 32"
    nb, kt, tile_rows, cq = tiled_shape(N, K, group_size, layout_n)
    C = cq * 4
    n_pad = nb * layout_n
    codes = awq_repack(qweight, group_size).view(torch.int16).view(N, kt, cq)  # [N, K / C, C / 4] (K-packed)
    out = torch.zeros(nb, kt, tile_rows, cq, dtype=torch.int16, device=qweight.device)
    padded = torch.zeros(n_pad, kt, cq, dtype=torch.int16, device=qweight.device)
    padded[:N] = codes
    out[:, :, :layout_n] = padded.view(nb, layout_n, kt, cq).transpose(1, 2)
    del codes, padded
    chunk_group = torch.arange(kt, device=qweight.device) * C // group_size  # the group of each chunk
    s = torch.zeros(kt, n_pad, dtype=scales.dtype, device=qweight.device)
    s[:, :N] = scales[chunk_group]
    z = torch.zeros(kt, n_pad, dtype=torch.int32, device=qweight.device)
    z[:, :N] = awq_unpack(qzeros)[chunk_group]  # [K / C, N_pad] values 0..15, natural column order
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    z = z.view(kt, nb, layout_n // 8, 8)
    z_words = (z.to(torch.int64) << shifts).sum(-1)  # [K / C, nb, layout_n / 8]: 32-bit patterns
    z_words = (z_words - (z_words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # their int32 reading
    meta = out.view(nb, kt, tile_rows * cq)[:, :, layout_n * cq :]  # [nb, K / C, META_ROWS * C / 4]
    meta[:, :, :layout_n] = s.view(kt, nb, layout_n).transpose(0, 1).view(torch.int16)
    zero_part = z_words.transpose(0, 1).contiguous().view(torch.int16)  # [nb, K / C, layout_n / 4]
    meta[:, :, layout_n : layout_n + layout_n // 4] = zero_part
    return out


# ---- kernels ----------------------------------------------------------------------------------------------
@triton.jit
def _mma(acc, w, x, SWAP_AB: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += w [BLOCK_N, k] . x [BLOCK_M, k] over k; acc is [BLOCK_N, BLOCK_M] with SWAP_AB, else transposed.
    UPCAST: fp32 operands (exact for 16-bit values; the interpreter's bf16 dot is wrong in Triton 3.9)."""
    if UPCAST:
        w = w.to(tl.float32)
        x = x.to(tl.float32)
    if SWAP_AB:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dequant(w, zoff, s, UPCAST: tl.constexpr):
    """w [BLOCK_N, k] (16 + q) -> (q - z) s in w's dtype: packed half ops; UPCAST: the same rounding through fp32
    (the interpreter's bf16 arithmetic is wrong in Triton 3.9)."""
    if UPCAST:
        w = ((w.to(tl.float32) - zoff[:, None]) * s.to(tl.float32)[:, None]).to(w.dtype)
    else:
        w = (w - zoff.to(w.dtype)[:, None]) * s.to(w.dtype)[:, None]
    return w


@triton.jit
def _nibble_mma(acc, w, s, zoff, x_ptrs, mask_m, FOLD: tl.constexpr, SWAP_AB: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One nibble's MMA: w [BLOCK_N, BLOCK_K / 4] against its x slice; without FOLD w (16 + q) is dequantized."""
    x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, BLOCK_K / 4]
    if not FOLD:
        w = _dequant(w, zoff, s, UPCAST)
    return _mma(acc, w, x, SWAP_AB, DOT_PRECISION, UPCAST)


@triton.jit
def _tile_offsets(pid_n, k_tiles, LAYOUT_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr,
                  META_ROWS: tl.constexpr):
    """int16 offsets of k tile 0 of this program's rows: codes [BLOCK_N, BLOCK_KQ], scales [BLOCK_N], and the int32
    offset of the zero-point word of each row; plus the row index in the layout tile (for the zero's nibble)."""
    TILE: tl.constexpr = (LAYOUT_N + META_ROWS) * BLOCK_KQ  # int16 per layout tile
    n0 = pid_n * BLOCK_N
    base = (n0 // LAYOUT_N) * k_tiles * TILE  # layout tile [n0 / LAYOUT_N, 0]
    r = n0 % LAYOUT_N + tl.arange(0, BLOCK_N)  # rows of the layout tile
    w_off = base + r[:, None] * BLOCK_KQ + tl.arange(0, BLOCK_KQ)[None, :]
    meta = base + LAYOUT_N * BLOCK_KQ
    s_off = meta + r
    z_off = (meta + LAYOUT_N) // 2 + r // 8
    return w_off, s_off, z_off, r


@triton.jit(do_not_specialize=["SPLIT_K", "TILES_PER_SPLIT"])
def awq_tiled_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, SPLIT_K, TILES_PER_SPLIT,
    stride_xm, stride_om, stride_on,
    LAYOUT_N: tl.constexpr, META_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr,
    FOLD: tl.constexpr, SPLIT_DOTS: tl.constexpr, DENORM: tl.constexpr, USE_ASM: tl.constexpr,
    ASM0: tl.constexpr, ASM1: tl.constexpr, ASM2: tl.constexpr, ASM3: tl.constexpr, Q_POS: tl.constexpr,
    MAGIC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVICT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """w_ptr / s_ptr / z_ptr: the same tiled buffer as int16 (codes), scale dtype (scales) and int32 (zeros).
    Scales and zeros of the first K tile load before the wait for the previous kernel (PDL); those of the next
    tile one iteration ahead; the code tiles are pipelined by the compiler (num_stages)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BLOCK_KQ: tl.constexpr = BLOCK_K // 4
    TILE: tl.constexpr = (LAYOUT_N + META_ROWS) * BLOCK_KQ  # int16 per layout tile: the step along K
    dtype = x_ptr.dtype.element_ty
    k_tiles = K // BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    w_off, s_off, z_off, r = _tile_offsets(pid_n, k_tiles, LAYOUT_N, BLOCK_N, BLOCK_KQ, META_ROWS)
    w_ptrs = w_ptr + w_off  # [BLOCK_N, BLOCK_KQ] int16, one contiguous block
    s_ptrs = s_ptr + s_off  # [BLOCK_N]
    z_ptrs = z_ptr + z_off  # [BLOCK_N] int32 (8 rows share a word)
    zshift = (r % 8) * 4
    offs_q = tl.arange(0, BLOCK_KQ)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_q[None, :]  # nibble i: + i * BLOCK_KQ
    x_tile_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]  # [BLOCK_M, BLOCK_K]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_begin = pid_k * TILES_PER_SPLIT
    t_end = tl.minimum(t_begin + TILES_PER_SPLIT, k_tiles)
    s_next = tl.load(s_ptrs + t_begin * TILE)
    zp_next = tl.load(z_ptrs + t_begin * (TILE // 2))
    wait_for_previous(USE_PDL)  # x is the previous kernel's output
    release_next(USE_PDL)
    if FOLD:
        xt_next = tl.load(x_tile_ptrs + t_begin * BLOCK_K, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        p = tl.load(w_ptrs + t * TILE, eviction_policy=EVICT)  # [BLOCK_N, BLOCK_KQ] int16
        s, zp = s_next, zp_next
        t_next = tl.minimum(t + 1, t_end - 1)
        s_next = tl.load(s_ptrs + t_next * TILE)
        zp_next = tl.load(z_ptrs + t_next * (TILE // 2))
        if FOLD:
            xt = xt_next
            xt_next = tl.load(x_tile_ptrs + t_next * BLOCK_K, mask=mask_m[:, None], other=0.0)
        z = ((zp >> zshift) & 0xF).to(tl.float32)  # [BLOCK_N]
        if DENORM:
            zoff = z
        else:
            zoff = z + 16.0  # the decoded codes are 16 + q
        w0, w1, w2, w3 = _nibbles(p, Q_POS, MAGIC, dtype, USE_ASM, ASM0, ASM1, ASM2, ASM3)  # [BLOCK_N, BLOCK_KQ]
        if FOLD:  # nibbles 0, 2 and 1, 3 apart: with DENORM they carry different powers of two
            de = tl.zeros_like(acc)
            do = tl.zeros_like(acc)
        else:
            de = acc
            do = acc
        if SPLIT_DOTS:
            xp = x_ptrs + k0
            de = _nibble_mma(de, w0, s, zoff, xp, mask_m, FOLD, SWAP_AB, DOT_PRECISION, UPCAST)
            if FOLD:
                do = _nibble_mma(do, w1, s, zoff, xp + BLOCK_KQ, mask_m, FOLD, SWAP_AB, DOT_PRECISION, UPCAST)
            else:
                de = _nibble_mma(de, w1, s, zoff, xp + BLOCK_KQ, mask_m, FOLD, SWAP_AB, DOT_PRECISION, UPCAST)
            de = _nibble_mma(de, w2, s, zoff, xp + 2 * BLOCK_KQ, mask_m, FOLD, SWAP_AB, DOT_PRECISION, UPCAST)
            if FOLD:
                do = _nibble_mma(do, w3, s, zoff, xp + 3 * BLOCK_KQ, mask_m, FOLD, SWAP_AB, DOT_PRECISION, UPCAST)
            else:
                de = _nibble_mma(de, w3, s, zoff, xp + 3 * BLOCK_KQ, mask_m, FOLD, SWAP_AB, DOT_PRECISION, UPCAST)
        else:  # one MMA over the whole tile: nibble tensors joined into [BLOCK_N, 4, BLOCK_KQ] = natural K order
            w = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [BLOCK_N, BLOCK_KQ, 2, 2]: w_i at 2 d1 + d2 = i
            w = tl.reshape(tl.permute(w, (0, 2, 3, 1)), (BLOCK_N, BLOCK_K))
            if not FOLD:
                w = _dequant(w, zoff, s, UPCAST)
            x = tl.load(x_tile_ptrs + k0, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
            de = _mma(de, w, x, SWAP_AB, DOT_PRECISION, UPCAST)
        if FOLD:  # de, do = sum_k x (q + offset) * 2^-e per output: scale, subtract (z + offset) s sum_k x
            s32 = s.to(tl.float32)
            if DENORM:
                s_e = s32 * 16777216.0  # 2^24
                s_o = s32 * 1048576.0  # 2^20
            else:
                s_e = s32
                s_o = s32
            zs = zoff * s32
            xs = tl.sum(xt.to(tl.float32), axis=1)  # [BLOCK_M]
            if SWAP_AB:
                acc = tl.fma(de, s_e[:, None], tl.fma(do, s_o[:, None], tl.fma(-zs[:, None], xs[None, :], acc)))
            else:
                acc = tl.fma(de, s_e[None, :], tl.fma(do, s_o[None, :], tl.fma(-zs[None, :], xs[:, None], acc)))
        else:
            acc = de
    if SWAP_AB:
        acc = tl.trans(acc)
    split_k_epilogue(acc, offs_m, offs_n, mask_m, mask_n, pid_m * tl.num_programs(1) + pid_n, pid_k, M, N,
                     bias_ptr, out_ptr, ws_ptr, lock_ptr, stride_om, stride_on, SPLIT_K, SPLIT_P2, HAS_BIAS)


@triton.jit
def awq_tiled_dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_on,
    LAYOUT_N: tl.constexpr, META_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    Q_POS: tl.constexpr, MAGIC: tl.constexpr, USE_ASM: tl.constexpr, ASM0: tl.constexpr, ASM1: tl.constexpr,
    ASM2: tl.constexpr, ASM3: tl.constexpr, UPCAST: tl.constexpr,
):
    """Tiled weights -> [N, K] in out's dtype ((q - z) * s rounded once, as reference.awq_dequantize), one
    [BLOCK_N, BLOCK_K] tile per program."""
    pid_n, t = tl.program_id(0), tl.program_id(1)
    BLOCK_KQ: tl.constexpr = BLOCK_K // 4
    TILE: tl.constexpr = (LAYOUT_N + META_ROWS) * BLOCK_KQ
    dtype = out_ptr.dtype.element_ty
    w_off, s_off, z_off, r = _tile_offsets(pid_n, K // BLOCK_K, LAYOUT_N, BLOCK_N, BLOCK_KQ, META_ROWS)
    p = tl.load(w_ptr + w_off + t * TILE)
    s = tl.load(s_ptr + s_off + t * TILE)
    zp = tl.load(z_ptr + z_off + t * (TILE // 2))
    z16 = ((zp >> ((r % 8) * 4)) & 0xF).to(tl.float32) + 16.0
    w0, w1, w2, w3 = _nibbles(p, Q_POS, MAGIC, dtype, USE_ASM, ASM0, ASM1, ASM2, ASM3)
    w0 = _dequant(w0, z16, s, UPCAST)
    w1 = _dequant(w1, z16, s, UPCAST)
    w2 = _dequant(w2, z16, s, UPCAST)
    w3 = _dequant(w3, z16, s, UPCAST)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o = out_ptr + offs_n[:, None] * stride_on + t * BLOCK_K + tl.arange(0, BLOCK_KQ)[None, :]  # nibble i: + i KQ
    m = (offs_n < N)[:, None]
    tl.store(o, w0, mask=m)
    tl.store(o + BLOCK_KQ, w1, mask=m)
    tl.store(o + 2 * BLOCK_KQ, w2, mask=m)
    tl.store(o + 3 * BLOCK_KQ, w3, mask=m)


# ---- launchers --------------------------------------------------------------------------------------------
def default_config(M: int, N: int, K: int, group_size: int) -> dict:
    """Tile shape and launch parameters of awq_tiled_linear. A first guess from awq_gemm.default_config's measured
    shapes (deeper pipelining: the contiguous tiles make each stage cheap); to be replaced by the sweep of
    benchmarks/bench_awq_tiled.py. Up to 32 tokens: weights on the MMA's M side, codes through the MMA (FOLD).
    Above: dequantize in registers, weights as the MMA's register operand (SWAP_AB), split-K only to fill SMs."""
    if M <= 8:
        return dict(BLOCK_M=8, BLOCK_N=128, SWAP_AB=True, FOLD=True, SPLIT_DOTS=True, num_warps=4, num_stages=4,
                    programs_per_sm=4, max_split=64, EVICT="")
    if M <= 32:
        return dict(BLOCK_M=triton.next_power_of_2(M), BLOCK_N=128 if N >= 8192 else 64, SWAP_AB=True, FOLD=True,
                    SPLIT_DOTS=True, num_warps=4, num_stages=4, programs_per_sm=4, max_split=64, EVICT="")
    return dict(BLOCK_M=64 if M <= 64 else 128, BLOCK_N=128, SWAP_AB=True, FOLD=False, SPLIT_DOTS=False,
                num_warps=8 if M > 64 else 4, num_stages=3, programs_per_sm=2, max_split=4, EVICT="")


def _buffer_views(packed: torch.Tensor, scale_dtype: torch.dtype):
    return packed, packed.view(scale_dtype), packed.view(torch.int32)


def awq_tiled_linear(x: torch.Tensor, packed: torch.Tensor, n_out: int, group_size: int,
                     scale_dtype: torch.dtype = torch.float16, bias: torch.Tensor | None = None,
                     layout_n: int = LAYOUT_N, config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ W4 (tiled buffer from awq_tile_repack, n_out output columns) (+ bias [n_out]) -> [M, n_out] in
    x's dtype. scale_dtype: the dtype of the scales the buffer was packed from. `config` overrides entries of
    default_config (benchmarks, tests)."""
    assert x.dim() == 2 and packed.dtype == torch.int16 and packed.is_contiguous(), "x [M, K], int16 tiled buffer"
    M, K = x.shape
    C = k_chunk(group_size)
    assert K % group_size == 0 and C % 32 == 0, f"K={K}, group size {group_size}: need groups of 32, 64 or >= 128"
    assert packed.shape == tiled_shape(n_out, K, group_size, layout_n), "tiled buffer shape"
    assert packed.numel() < 2**31, "int32 offsets"
    assert bias is None or bias.shape == (n_out,), "bias [N]"
    if x.stride(1) != 1:
        x = x.contiguous()
    if M > FUSED_MAX_M:
        out = x @ awq_tiled_dequantize(packed, n_out, group_size, scale_dtype, x.dtype, layout_n).t()
        return out if bias is None else out + bias
    cfg = default_config(M, n_out, K, group_size)
    cfg.update(config or {})
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    assert layout_n % block_n == 0, f"BLOCK_N {block_n} must divide the layout's {layout_n} columns"
    m_tiles = triton.cdiv(M, block_m)
    n_tiles = triton.cdiv(n_out, block_n)
    tiles = m_tiles * n_tiles
    split, per_split = split_k(tiles, K // C, cfg["programs_per_sm"] * num_sms(x.device), cfg["max_split"])
    out = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    ws = torch.empty(split, M, n_out, dtype=torch.float32, device=x.device) if split > 1 else out
    locks = split_locks(x.device, tiles) if split > 1 else out
    split_p2 = 1 if split == 1 else (16 if split <= 16 else 64)
    q_pos, magic = _DECODE[x.dtype]
    fold = cfg["FOLD"]
    split_dots = cfg["SPLIT_DOTS"] and C // 4 >= 16  # the MMA's minimum K
    use_asm = x.is_cuda and x.dtype != torch.float32
    denorm = use_asm and fold and split_dots and x.dtype == torch.float16 and cfg.get("DENORM", True)
    asm = _asm_sources(None if denorm else q_pos, magic)
    upcast = not x.is_cuda and x.dtype == torch.bfloat16  # the interpreter (see _mma)
    w16, s16, z32 = _buffer_views(packed, scale_dtype)
    awq_tiled_kernel[(m_tiles, n_tiles, split)](
        x, w16, s16, z32, bias if bias is not None else out, out, ws, locks, M, n_out, K, split, per_split,
        x.stride(0), out.stride(0), out.stride(1),
        LAYOUT_N=layout_n, META_ROWS=meta_rows(layout_n, C), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=C,
        SPLIT_P2=split_p2, HAS_BIAS=bias is not None, SWAP_AB=cfg["SWAP_AB"], FOLD=fold, SPLIT_DOTS=split_dots,
        DENORM=denorm, USE_ASM=use_asm, ASM0=asm[0], ASM1=asm[1], ASM2=asm[2], ASM3=asm[3], Q_POS=q_pos,
        MAGIC=magic, DOT_PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        EVICT=cfg.get("EVICT", "") if x.is_cuda else "", num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"] if x.is_cuda else 1, **launch_options(x))
    return out


def awq_tiled_dequantize(packed: torch.Tensor, n_out: int, group_size: int, scale_dtype: torch.dtype = torch.float16,
                         dtype: torch.dtype | None = None, layout_n: int = LAYOUT_N) -> torch.Tensor:
    """Tiled weights -> [n_out, K] in `dtype` (default: scale_dtype)."""
    nb, kt, tile_rows, cq = packed.shape
    C, K = cq * 4, kt * cq * 4
    assert packed.dtype == torch.int16 and packed.shape == tiled_shape(n_out, K, group_size, layout_n), "shape"
    dtype = dtype or scale_dtype
    out = torch.empty(n_out, K, dtype=dtype, device=packed.device)
    q_pos, magic = _DECODE[dtype]
    asm = _asm_sources(q_pos, magic)
    w16, s16, z32 = _buffer_views(packed, scale_dtype)
    block_n = min(64, layout_n)
    awq_tiled_dequantize_kernel[(triton.cdiv(n_out, block_n), kt)](
        w16, s16, z32, out, n_out, K, out.stride(0), LAYOUT_N=layout_n, META_ROWS=meta_rows(layout_n, C),
        BLOCK_N=block_n, BLOCK_K=C, Q_POS=q_pos, MAGIC=magic, USE_ASM=packed.is_cuda and dtype != torch.float32,
        ASM0=asm[0], ASM1=asm[1], ASM2=asm[2], ASM3=asm[3], UPCAST=not packed.is_cuda and dtype == torch.bfloat16)
    return out
