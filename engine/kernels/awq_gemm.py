"""W4A16 matmul over AWQ 4-bit weights (x [M, K] fp16/bf16/fp32 @ W [K, N] stored as 4-bit codes, per-group zero
points and scales, G input rows per group).

Two weight layouts (reference.py holds plain-torch versions of both):
- the AutoAWQ GEMM layout of the checkpoints: qweight int32 [K, N / 8], nibble i of each int32 holding output
  column AWQ_ORDER[i] of its group of 8; qzeros int32 [K / G, N / 8] packed the same way; scales [K / G, N].
- the K-packed layout the kernels stream (AWQLinear repacks qweight into it once, after loading; qzeros and
  scales stay as they are): qweight_k int32 [N, K / 8], row n = output column n, read as int16 [N, K / 4].
  K runs in chunks of C = min(G, 128) rows; int16 t (0 <= t < C / 4) of chunk c holds in bits 4i..4i+3
  (i = 0..3) the code of input row k = C c + (C / 4) i + t. So int32 j holds rows C c + (C / 4) i + 2j (low
  half) and + 2j + 1 (high half): one and-mask turns it into two K-neighbours of nibble i as a pair of halves,
  the register an MMA operand wants. A kernel tile is one chunk: [BLOCK_N, C / 4] int16, whole 64-byte row
  pieces, one group; nibble i of the tile meets the contiguous x slice [k0 + (C / 4) i, k0 + (C / 4) (i + 1)).

Kernels, all on the K-packed layout:
- awq_mma_kernel (every M <= FUSED_MAX_M): tensor cores. Nibbles become halves with inline PTX, two per
  instruction: one and-mask (nibbles 2, 3 after one shift) keeps the codes in the mantissas of two subnormal
  halves (fp16: `q * 2^-24` for nibbles 0, 2, `q * 2^-20` for 1, 3, no magic constant), or a shift and an and/or
  put them into the mantissas of 16.0 (`16 + q`: bf16, and the dequantizing big-M tiles).
  M <= 32 (decode): the weights are the MMA's M side (BLOCK_N rows) and the tokens its N side (SWAP_AB), so one
  token already fills an MMA (N = 8); one K = C / 4 MMA per nibble (SPLIT_DOTS: each decoded nibble tensor is an
  MMA operand as it is); the codes go through the MMA as they are and zero point and scale are applied once per
  group and output (FOLD): sum_k x (q - z) s = s (sum_k x q - z sum_k x). Scales, zeros and the next x tile are
  loaded one K tile ahead; weights and x slices are pipelined by the compiler (num_stages).
  M > 32: the tile is dequantized in registers first ((q - z) * s with packed half ops: exact up to the product's
  rounding, as reference.awq_dequantize), then a plain MMA with the tokens on the M side.
Split-K as in split_k.py (one launch, deterministic). The MMA kernel takes part in programmatic dependent launch
(pdl.py): it launches while the previous kernel finishes and loads its first scales and zero points then.
Prefill (M > FUSED_MAX_M): dequantize once into an fp16/bf16 [N, K] weight and let cuBLAS run the GEMM.
Nothing syncs with the host: the launchers only allocate (torch.empty), so they run inside CUDA graph capture.
Tile configs: default_config (measured, see benchmarks/bench_awq_gemm.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import launch_options, release_next, wait_for_previous
from engine.kernels.split_k import num_sms, split_k, split_k_epilogue, split_locks

FUSED_MAX_M = 256  # up to here the fused kernel beats dequantize + cuBLAS (about even at 256)
MAX_CHUNK = 128

# nibble -> float with value 16 + q: q goes to the top 4 mantissa bits of 16.0 (bit position, bit pattern)
_DECODE = {torch.float32: (19, 0x41800000), torch.float16: (6, 0x4C00), torch.bfloat16: (3, 0x4180)}


# ---- layout -----------------------------------------------------------------------------------------------
def k_chunk(group_size: int) -> int:
    return min(group_size, MAX_CHUNK)


def awq_repack(qweight: torch.Tensor, group_size: int, rows_per_step: int = 512) -> torch.Tensor:
    """AutoAWQ GEMM qweight int32 [K, N / 8] -> K-packed int32 [N, K / 8] (layout above), on qweight's device, a few
    hundred input rows at a time (small temporaries: it runs after the whole model is loaded)."""
    K, N = qweight.shape[0], qweight.shape[1] * 8
    C = k_chunk(group_size)
    assert K % C == 0 and C % 32 == 0, f"K={K}, group size {group_size}: need groups of 32, 64 or >= 128 rows"
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    awq_nibble = torch.tensor((0, 4, 1, 5, 2, 6, 3, 7), device=qweight.device)  # AWQ_REVERSE_ORDER
    out = torch.empty(N, K // 4, dtype=torch.int16, device=qweight.device)
    step = max(C, rows_per_step // C * C)
    for k0 in range(0, K, step):
        rows = min(step, K - k0)
        q = ((qweight[k0 : k0 + rows, :, None] >> shifts) & 0xF)[:, :, awq_nibble]  # [rows, N / 8, 8] natural order
        q = q.reshape(rows // C, 4, C // 4, N).permute(3, 0, 2, 1)  # [N, rows / C, t, i]: k = C c + (C / 4) i + t
        packed = q[..., 0] | (q[..., 1] << 4) | (q[..., 2] << 8) | (q[..., 3] << 12)  # [N, rows / C, C / 4]
        packed = packed - ((packed >> 15) & 1) * 65536  # the int16 reading of these 16 bits
        out[:, k0 // 4 : (k0 + rows) // 4] = packed.reshape(N, rows // 4).to(torch.int16)
    return out.view(torch.int32)


# ---- decoding ---------------------------------------------------------------------------------------------
@triton.jit
def _nibble_as_float(p, NIBBLE: tl.constexpr, Q_POS: tl.constexpr, MAGIC: tl.constexpr, DTYPE: tl.constexpr):
    """int16 tensor -> DTYPE tensor of 16 + (nibble NIBBLE of each element): the nibble is moved to mantissa bits
    Q_POS..Q_POS + 3 and or-ed into the bits of 16.0 (MAGIC)."""
    v = p.to(tl.int32)  # sign-extended: the bits above the nibble are masked off below
    if Q_POS >= 4 * NIBBLE:
        v = v << (Q_POS - 4 * NIBBLE)
    else:
        v = v >> (4 * NIBBLE - Q_POS)
    v = (v & (0xF << Q_POS)) | MAGIC
    if DTYPE == tl.float32:
        f = v.to(tl.float32, bitcast=True)
    else:
        f = v.to(tl.int16).to(DTYPE, bitcast=True)
    return f


def _nibble_asm_source(nibble: int, q_pos: int | None, magic: int = 0) -> str:
    """PTX for _nibble_asm: $1 holds two neighbouring int16 (one int32 of the layout: pack=2 packs them into one
    register), $0 a pair of halves, nibble `nibble` of each:
    - q_pos None (fp16): the code stays in the mantissa of a subnormal half: an and with 0x000F000F (nibbles 0, 2,
      value q * 2^-24) or 0x00F000F0 (nibbles 1, 3, q * 2^-20); nibbles 2, 3 are shifted right by 8 first.
    - else: shift the code to bits q_pos..q_pos + 3 of each half and or it into the bits of 16.0 (magic): 16 + q."""
    ops = ["mov.b32 p, $1;"]
    if q_pos is None:
        if nibble >= 2:
            ops.append("shr.b32 p, p, 8;")
        ops.append(f"and.b32 $0, p, {0x000F000F if nibble % 2 == 0 else 0x00F000F0:#x};")
    else:
        d = q_pos - 4 * nibble
        ops.append(f"shl.b32 p, p, {d};" if d >= 0 else f"shr.b32 p, p, {-d};")
        ops.append(f"and.b32 p, p, {(0xF << q_pos) * 0x10001:#x}; or.b32 $0, p, {magic * 0x10001:#x};")
    return "{ .reg .b32 p; " + " ".join(ops) + " }"


@functools.lru_cache
def _asm_sources(q_pos: int | None, magic: int = 0) -> tuple[str, str, str, str]:
    return tuple(_nibble_asm_source(i, q_pos, magic) for i in range(4))


@triton.jit
def _nibble_asm(p, ASM: tl.constexpr, DTYPE: tl.constexpr):
    """int16 tensor -> DTYPE tensor (see _nibble_asm_source), two elements per instruction."""
    if DTYPE == tl.bfloat16:
        w = tl.inline_asm_elementwise(ASM, "=r,r", [p], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        w = tl.inline_asm_elementwise(ASM, "=r,r", [p], dtype=tl.float16, is_pure=True, pack=2)
    return w


@triton.jit
def _nibbles(p, Q_POS: tl.constexpr, MAGIC: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr,
             ASM0: tl.constexpr, ASM1: tl.constexpr, ASM2: tl.constexpr, ASM3: tl.constexpr):
    """int16 [R, C] -> 4 DTYPE tensors [R, C], one per nibble: 16 + q (or subnormal q with the DENORM asm)."""
    if USE_ASM:
        w0 = _nibble_asm(p, ASM0, DTYPE)
        w1 = _nibble_asm(p, ASM1, DTYPE)
        w2 = _nibble_asm(p, ASM2, DTYPE)
        w3 = _nibble_asm(p, ASM3, DTYPE)
    else:  # the interpreter, fp32
        w0 = _nibble_as_float(p, 0, Q_POS, MAGIC, DTYPE)
        w1 = _nibble_as_float(p, 1, Q_POS, MAGIC, DTYPE)
        w2 = _nibble_as_float(p, 2, Q_POS, MAGIC, DTYPE)
        w3 = _nibble_as_float(p, 3, Q_POS, MAGIC, DTYPE)
    return w0, w1, w2, w3


# ---- tensor-core kernel -----------------------------------------------------------------------------------
@triton.jit
def _mma(acc, w, x, SWAP_AB: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += w [BLOCK_N, k] . x [BLOCK_M, k] over k; acc is [BLOCK_N, BLOCK_M] with SWAP_AB, else transposed."""
    if SWAP_AB:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _nibble_mma(acc, w, s, zoff, x_ptrs, mask_m, FOLD: tl.constexpr, SWAP_AB: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """One nibble's MMA: w [BLOCK_N, BLOCK_K / 4] against its x slice; without FOLD w (16 + q) is dequantized."""
    x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, BLOCK_K / 4]
    if not FOLD:
        w = (w - zoff.to(w.dtype)[:, None]) * s.to(w.dtype)[:, None]
    return _mma(acc, w, x, SWAP_AB, DOT_PRECISION)


@triton.jit(do_not_specialize=["SPLIT_K", "TILES_PER_SPLIT"])
def awq_mma_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, SPLIT_K, TILES_PER_SPLIT,
    stride_xm, stride_qwn, stride_qzg, stride_sg, stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr, FOLD: tl.constexpr,
    SPLIT_DOTS: tl.constexpr, DENORM: tl.constexpr, USE_ASM: tl.constexpr, ASM0: tl.constexpr,
    ASM1: tl.constexpr, ASM2: tl.constexpr, ASM3: tl.constexpr, Q_POS: tl.constexpr, MAGIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    """qweight_ptr: the K-packed weights as int16 [N, K / 4] (stride_qwn in int16). Scales and zero points of the
    first K tile load before the wait for the previous kernel (PDL); the weight tiles are pipelined by the compiler
    (loading them one ahead by hand, so that the first is in flight before the wait, measured 20% slower).
    """
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BLOCK_KQ: tl.constexpr = BLOCK_K // 4  # int16 per row of a tile (one layout chunk: BLOCK_K = C)
    dtype = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, BLOCK_KQ)
    mask_m, mask_n = offs_m < M, offs_n < N
    w_ptrs = qweight_ptr + offs_n[:, None] * stride_qwn + offs_q[None, :]  # [BLOCK_N, BLOCK_KQ]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_q[None, :]  # nibble i: + i * BLOCK_KQ
    x_tile_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]  # [BLOCK_M, BLOCK_K]
    zshift = ((offs_n % 2) * 4 + (offs_n % 8) // 2) * 4  # AWQ_REVERSE_ORDER[n % 8] * 4
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_begin = pid_k * TILES_PER_SPLIT
    t_end = tl.minimum(t_begin + TILES_PER_SPLIT, K // BLOCK_K)
    # scales, zero points and the x tile of the next K tile are loaded one iteration ahead (the weight and x-slice
    # loads, MMA operands, are pipelined by the compiler with num_stages)
    g_next = t_begin * BLOCK_K // GROUP_SIZE
    s_next = tl.load(scales_ptr + g_next * stride_sg + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N]
    zp_next = tl.load(qzeros_ptr + g_next * stride_qzg + offs_n // 8, mask=mask_n, other=0)
    wait_for_previous(USE_PDL)  # x is the previous kernel's output
    release_next(USE_PDL)
    if FOLD:
        xt_next = tl.load(x_tile_ptrs + t_begin * BLOCK_K, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        p = tl.load(w_ptrs + t * BLOCK_KQ, mask=mask_n[:, None], other=0)  # [BLOCK_N, BLOCK_KQ] int16
        s, zp = s_next, zp_next
        t_next = tl.minimum(t + 1, t_end - 1)
        g_next = t_next * BLOCK_K // GROUP_SIZE
        s_next = tl.load(scales_ptr + g_next * stride_sg + offs_n, mask=mask_n, other=0.0)
        zp_next = tl.load(qzeros_ptr + g_next * stride_qzg + offs_n // 8, mask=mask_n, other=0)
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
            de = _nibble_mma(de, w0, s, zoff, xp, mask_m, FOLD, SWAP_AB, DOT_PRECISION)
            if FOLD:
                do = _nibble_mma(do, w1, s, zoff, xp + BLOCK_KQ, mask_m, FOLD, SWAP_AB, DOT_PRECISION)
            else:
                de = _nibble_mma(de, w1, s, zoff, xp + BLOCK_KQ, mask_m, FOLD, SWAP_AB, DOT_PRECISION)
            de = _nibble_mma(de, w2, s, zoff, xp + 2 * BLOCK_KQ, mask_m, FOLD, SWAP_AB, DOT_PRECISION)
            if FOLD:
                do = _nibble_mma(do, w3, s, zoff, xp + 3 * BLOCK_KQ, mask_m, FOLD, SWAP_AB, DOT_PRECISION)
            else:
                de = _nibble_mma(de, w3, s, zoff, xp + 3 * BLOCK_KQ, mask_m, FOLD, SWAP_AB, DOT_PRECISION)
        else:  # one MMA over the whole tile: nibble tensors joined into [BLOCK_N, 4, BLOCK_KQ] = natural K order
            w = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [BLOCK_N, BLOCK_KQ, 2, 2]: w_i at 2 d1 + d2 = i
            w = tl.reshape(tl.permute(w, (0, 2, 3, 1)), (BLOCK_N, BLOCK_K))
            if not FOLD:
                w = (w - zoff.to(dtype)[:, None]) * s.to(dtype)[:, None]
            x = tl.load(x_tile_ptrs + k0, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
            de = _mma(de, w, x, SWAP_AB, DOT_PRECISION)
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


# ---- dequantize (prefill) ---------------------------------------------------------------------------------
@triton.jit
def awq_dequantize_k_kernel(
    qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, N, K, stride_qwn, stride_qzg, stride_sg, stride_on,
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, Q_POS: tl.constexpr,
    MAGIC: tl.constexpr, USE_ASM: tl.constexpr, ASM0: tl.constexpr, ASM1: tl.constexpr, ASM2: tl.constexpr,
    ASM3: tl.constexpr,
):
    """K-packed qweight (int16 [N, K / 4]) -> [N, K] weight in out's dtype, one layout chunk per program column."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    BLOCK_KQ: tl.constexpr = BLOCK_K // 4
    dtype = out_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, BLOCK_KQ)
    mask_n = offs_n < N
    g = pid_k * BLOCK_K // GROUP_SIZE
    p = tl.load(qweight_ptr + offs_n[:, None] * stride_qwn + pid_k * BLOCK_KQ + offs_q[None, :],
                mask=mask_n[:, None], other=0)
    s = tl.load(scales_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(dtype)[:, None]
    zshift = ((offs_n % 2) * 4 + (offs_n % 8) // 2) * 4
    zp = tl.load(qzeros_ptr + g * stride_qzg + offs_n // 8, mask=mask_n, other=0)
    z16 = (((zp >> zshift) & 0xF).to(tl.float32) + 16.0).to(dtype)[:, None]
    w0, w1, w2, w3 = _nibbles(p, Q_POS, MAGIC, dtype, USE_ASM, ASM0, ASM1, ASM2, ASM3)
    o = out_ptr + offs_n[:, None] * stride_on + pid_k * BLOCK_K + offs_q[None, :]  # nibble i: + i * BLOCK_KQ
    m = mask_n[:, None]
    tl.store(o, (w0 - z16) * s, mask=m)
    tl.store(o + BLOCK_KQ, (w1 - z16) * s, mask=m)
    tl.store(o + 2 * BLOCK_KQ, (w2 - z16) * s, mask=m)
    tl.store(o + 3 * BLOCK_KQ, (w3 - z16) * s, mask=m)


# ---- AutoAWQ-layout dequantize (checkpoint tensors as they are) ---------------------------------------------
@triton.jit
def _unpack_awq(packed, BLOCK_N: tl.constexpr):
    """[R, BLOCK_N // 8] int32 in AWQ order -> [R, BLOCK_N] int32 nibbles in natural column order."""
    x = tl.interleave(packed, packed)
    x = tl.interleave(x, x)
    x = tl.interleave(x, x)  # each int32 repeated 8 times: column j reads packed column j // 8
    j = tl.arange(0, BLOCK_N) % 8
    shifts = ((j % 2) * 4 + j // 2) * 4  # AWQ_REVERSE_ORDER[j] * 4
    return (x >> shifts[None, :]) & 0xF


@triton.jit
def awq_dequantize_kernel(
    qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, K, N,
    stride_qwk, stride_qwn, stride_qzg, stride_qzn, stride_sg, stride_sn, stride_ok, stride_on,
    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_pn = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    mask_k, mask_n, mask_pn = offs_k < K, offs_n < N, offs_pn < N // 8
    qw = tl.load(qweight_ptr + offs_k[:, None] * stride_qwk + offs_pn[None, :] * stride_qwn,
                 mask=mask_k[:, None] & mask_pn[None, :], other=0)
    g = offs_k // GROUP_SIZE
    qz = tl.load(qzeros_ptr + g[:, None] * stride_qzg + offs_pn[None, :] * stride_qzn,
                 mask=mask_k[:, None] & mask_pn[None, :], other=0)
    s = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    w = (_unpack_awq(qw, BLOCK_N) - _unpack_awq(qz, BLOCK_N)).to(s.dtype) * s
    tl.store(out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on, w.to(out_ptr.dtype.element_ty),
             mask=mask_k[:, None] & mask_n[None, :])


# ---- launchers --------------------------------------------------------------------------------------------
def default_config(M: int, N: int, K: int, group_size: int) -> dict:
    """Tile shape and launch parameters of awq_linear_k, from CUDA-graph-timed sweeps on an H200 at the Llama-2-7B
    shapes (benchmarks/bench_awq_gemm.py --sweep). Up to 32 tokens: weights on the MMA's M side, codes through the
    MMA as they are (FOLD), 3-4 programs per SM, each over a few K tiles of one N tile (split-K). Above: tiles
    dequantized in registers, then MMA, with tokens on the MMA's M side."""
    wide = N >= 16384  # gate_up-like
    if M <= 8:
        return dict(kernel="mma", BLOCK_M=8, BLOCK_N=128 if M <= 4 or N >= 8192 else 64, SWAP_AB=True, FOLD=True,
                    SPLIT_DOTS=True, num_warps=4, num_stages=3, programs_per_sm=4, max_split=64)
    if M <= 16:
        return dict(kernel="mma", BLOCK_M=16, BLOCK_N=128 if N >= 8192 else 64, SWAP_AB=True, FOLD=True,
                    SPLIT_DOTS=True, num_warps=2, num_stages=3, programs_per_sm=4, max_split=64)
    if M <= 32:
        return dict(kernel="mma", BLOCK_M=32, BLOCK_N=128 if wide else 64, SWAP_AB=True, FOLD=True, SPLIT_DOTS=True,
                    num_warps=4, num_stages=3, programs_per_sm=4 if wide else 3, max_split=64)
    if M <= 128 or not (wide or K >= 8192):
        return dict(kernel="mma", BLOCK_M=64, BLOCK_N=64, SWAP_AB=False, FOLD=False, SPLIT_DOTS=False, num_warps=4,
                    num_stages=3, programs_per_sm=2, max_split=8)
    return dict(kernel="mma", BLOCK_M=256, BLOCK_N=64, SWAP_AB=False, FOLD=False, SPLIT_DOTS=False, num_warps=8,
                num_stages=3, programs_per_sm=2, max_split=8)


def awq_linear_k(x: torch.Tensor, qweight_k, qzeros, scales, group_size: int, bias=None, config=None) -> torch.Tensor:
    """x [M, K] @ W4 (K-packed qweight_k [N, K / 8], AWQ qzeros [K / G, N / 8], scales [K / G, N]) (+ bias) -> [M, N]
    in x's dtype. `config` overrides entries of default_config (benchmarks, tests)."""
    assert x.dim() == 2 and qweight_k.dtype == torch.int32 and qzeros.dtype == torch.int32
    M, K = x.shape
    N = scales.shape[1]
    C = k_chunk(group_size)
    assert qweight_k.shape == (N, K // 8) and scales.shape == (K // group_size, N), "shapes"
    assert qzeros.shape == (K // group_size, N // 8) and K % group_size == 0 and C % 32 == 0, "shapes"
    assert qweight_k.stride(1) == 1 and qzeros.stride(1) == 1 and scales.stride(1) == 1, "row-major weights"
    if x.stride(1) != 1:
        x = x.contiguous()
    if M > FUSED_MAX_M:
        out = x @ awq_dequantize_k(qweight_k, qzeros, scales, group_size, x.dtype).t()
        return out if bias is None else out + bias
    cfg = default_config(M, N, K, group_size)
    cfg.update(config or {})
    block_m = cfg["BLOCK_M"]
    block_n = cfg["BLOCK_N"]
    m_tiles = triton.cdiv(M, block_m)
    tiles = m_tiles * triton.cdiv(N, block_n)
    split, per_split = split_k(tiles, K // C, cfg["programs_per_sm"] * num_sms(x.device), cfg["max_split"])
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    locks = split_locks(x.device, tiles) if split > 1 else out
    has_bias = bias is not None
    q16 = qweight_k.view(torch.int16)  # [N, K / 4]
    args = (x, q16, qzeros, scales, bias if has_bias else out, out, ws, locks, M, N, K, split, per_split,
            x.stride(0), q16.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0), out.stride(1))
    split_p2 = 1 if split == 1 else (16 if split <= 16 else 64)
    common = dict(GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=C, SPLIT_P2=split_p2,
                  HAS_BIAS=has_bias, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"] if x.is_cuda else 1)
    q_pos, magic = _DECODE[x.dtype]
    fold = cfg["FOLD"]
    split_dots = cfg["SPLIT_DOTS"] and C // 4 >= 16  # the MMA's minimum K
    use_asm = x.is_cuda and x.dtype != torch.float32
    denorm = use_asm and fold and split_dots and x.dtype == torch.float16 and cfg.get("DENORM", True)
    asm = _asm_sources(None if denorm else q_pos, magic)
    awq_mma_kernel[(m_tiles, triton.cdiv(N, block_n), split)](
        *args, **common, SWAP_AB=cfg["SWAP_AB"], FOLD=fold, SPLIT_DOTS=split_dots, DENORM=denorm,
        USE_ASM=use_asm, ASM0=asm[0], ASM1=asm[1], ASM2=asm[2], ASM3=asm[3], Q_POS=q_pos, MAGIC=magic,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **launch_options(x))
    return out


def awq_dequantize_k(qweight_k, qzeros, scales, group_size: int, dtype=None) -> torch.Tensor:
    """K-packed weights -> [N, K] in `dtype` (default: scales' dtype)."""
    N, K = qweight_k.shape[0], qweight_k.shape[1] * 8
    dtype = dtype or scales.dtype
    out = torch.empty(N, K, dtype=dtype, device=qweight_k.device)
    q_pos, magic = _DECODE[dtype]
    C = k_chunk(group_size)
    q16 = qweight_k.view(torch.int16)
    asm = _asm_sources(q_pos, magic)
    awq_dequantize_k_kernel[(triton.cdiv(N, 64), K // C)](
        q16, qzeros, scales, out, N, K, q16.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=group_size, BLOCK_N=64, BLOCK_K=C, Q_POS=q_pos, MAGIC=magic,
        USE_ASM=qweight_k.is_cuda and dtype != torch.float32, ASM0=asm[0], ASM1=asm[1], ASM2=asm[2], ASM3=asm[3])
    return out


def awq_dequantize(qweight, qzeros, scales, group_size: int, dtype=None) -> torch.Tensor:
    """AutoAWQ-layout weights -> [K, N] in `dtype` (default: scales' dtype)."""
    K, N = qweight.shape[0], scales.shape[1]
    out = torch.empty(K, N, dtype=dtype or scales.dtype, device=qweight.device)
    BLOCK_K, BLOCK_N = 32, 128
    grid = (triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))
    awq_dequantize_kernel[grid](qweight, qzeros, scales, out, K, N, qweight.stride(0), qweight.stride(1),
                                qzeros.stride(0), qzeros.stride(1), scales.stride(0), scales.stride(1),
                                out.stride(0), out.stride(1), GROUP_SIZE=group_size, BLOCK_K=BLOCK_K,
                                BLOCK_N=BLOCK_N)
    return out


def awq_linear(x: torch.Tensor, qweight, qzeros, scales, group_size: int, bias=None) -> torch.Tensor:
    """x [M, K] @ W4 [K, N] (+ bias) -> [M, N] in x's dtype, AutoAWQ-layout weights (ops.awq_linear's signature).
    Repacks qweight on every call: fine for tests and one-off calls; AWQLinear repacks once at load time and
    calls awq_linear_k."""
    if x.shape[0] > FUSED_MAX_M:
        out = x @ awq_dequantize(qweight, qzeros, scales, group_size, x.dtype)
        return out if bias is None else out + bias
    return awq_linear_k(x, awq_repack(qweight, group_size), qzeros, scales, group_size, bias)
