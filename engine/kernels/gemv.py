"""Dense matmul for a few tokens (decode): y [M, N] = x [M, K] @ W^T (+ bias), W [N, K] fp16/bf16 row-major (the
nn.Linear layout). The twin of reference.linear; cuBLAS takes over above GEMV_MAX_M tokens.

At batch 1 a decode step is a chain of such products that each stream a weight matrix once, so what counts is
how close each gets to the memory bandwidth and how little time is lost between them:
- programs tile N (BLOCK_N rows) and split K (split_k.py) so that every SM holds several programs;
- each program streams [BLOCK_N, BLOCK_K] weight tiles with the next tile's load issued before the current one
  is used (registers, by hand: the first tile is in flight before the program waits for the previous kernel);
- programmatic dependent launch (pdl.py): the kernel launches while the previous one finishes and loads its
  first weight tile then, so the gap between kernels is filled with weight traffic;
- products: fp32 multiply-accumulate over [BLOCK_N, BLOCK_K] (one token, DOT=False) or a tensor-core MMA with the
  weights on the MMA's M side and the tokens (padded to 16) on its N side (DOT=True), fp32 accumulation.
Tile configs: default_config (measured, see benchmarks/bench_gemv.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine import envs
from engine.kernels.activation import silu, silu_and_mul
from engine.kernels.pdl import launch_options, release_next, wait_for_previous
from engine.kernels.split_k import num_sms, split_k, split_k_epilogue, split_locks

GEMV_MAX_M = 8  # up to here this kernel; above, cuBLAS


@triton.jit(do_not_specialize=["SPLIT_K", "TILES_PER_SPLIT"])
def gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, SPLIT_K, TILES_PER_SPLIT,
    stride_xm, stride_wn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_P2: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    SILU_MUL: tl.constexpr, USE_PDL: tl.constexpr,
):
    """SILU_MUL: x rows are [gate | up] (2 K wide) and the product's input is silu(gate) * up, computed as
    activation.silu_and_mul does (fp32, rounded once to x's dtype): the MLP's down projection without the
    activation kernel."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    t_begin = pid_k * TILES_PER_SPLIT
    t_end = tl.minimum(t_begin + TILES_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    if EVEN_K:
        w_next = tl.load(w_ptrs + t_begin * BLOCK_K, mask=mask_n[:, None], other=0.0)
    else:
        w_next = tl.load(w_ptrs + t_begin * BLOCK_K, mask=mask_n[:, None] & (offs_k[None, :] < K - t_begin * BLOCK_K),
                         other=0.0)
    wait_for_previous(USE_PDL)  # x is the previous kernel's output; nothing is written before this
    release_next(USE_PDL)
    if DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # one token: summed over K once, at the end
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        w = w_next
        k_next = tl.minimum(t + 1, t_end - 1) * BLOCK_K  # the last iteration reloads its own tile (a cache hit)
        if EVEN_K:
            w_next = tl.load(w_ptrs + k_next, mask=mask_n[:, None], other=0.0)
            mask_x = mask_m[:, None]
        else:
            w_next = tl.load(w_ptrs + k_next, mask=mask_n[:, None] & (offs_k[None, :] < K - k_next), other=0.0)
            mask_x = mask_m[:, None] & (offs_k[None, :] < K - k0)
        x = tl.load(x_ptrs + k0, mask=mask_x, other=0.0)
        if SILU_MUL:
            up = tl.load(x_ptrs + K + k0, mask=mask_x, other=0.0)
            x = (silu(x.to(tl.float32)) * up.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if DOT:
            acc = tl.dot(w, tl.trans(x.to(w.dtype)), acc, input_precision=DOT_PRECISION)
        else:
            acc += w.to(tl.float32) * x.to(tl.float32)  # x: [1, BLOCK_K]
    if DOT:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    else:
        acc = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
    split_k_epilogue(acc, offs_m, offs_n, mask_m, mask_n, pid_n, pid_k, M, N, bias_ptr, out_ptr, ws_ptr,
                     lock_ptr, stride_om, stride_on, SPLIT_K, SPLIT_P2, HAS_BIAS)


def default_config(M: int, N: int, K: int) -> dict:
    """Tile shape and launch parameters of gemv, from CUDA-graph-timed sweeps on an H200 (benchmarks/bench_gemv.py
    --sweep, PDL on; fractions of the 4.25 TB/s copy rate). One token: FMA over thin, long tiles, many programs
    per SM (Llama-2-7B qkv 0.97, o 0.81, gate_up 1.01, down 0.93, lm_head 1.04; cuBLAS 0.84, 0.61, 0.92, 0.81,
    0.96; Llama-3-8B and InternLM2-1.8B shapes in BENCHMARKS.md). 2-8 tokens: MMA tiles, about even with cuBLAS
    except for N <= 8192 (o, down: 5-10% faster), where linear() uses it."""
    if M == 1:
        if K >= 8192:  # down-like: long rows
            if N >= 4096:
                return dict(DOT=False, BLOCK_N=8, BLOCK_K=512, num_warps=8, programs_per_sm=4, max_split=32)
            return dict(DOT=False, BLOCK_N=4, BLOCK_K=1024, num_warps=8, programs_per_sm=4, max_split=32)
        if N <= 4096:  # o-like: a small matrix, few bytes per program
            return dict(DOT=False, BLOCK_N=2, BLOCK_K=512, num_warps=4, programs_per_sm=4, max_split=32)
        if 20000 <= N <= 24576:  # Llama-2-7B's gate_up (22016)
            return dict(DOT=False, BLOCK_N=4, BLOCK_K=2048, num_warps=4, programs_per_sm=8, max_split=32)
        return dict(DOT=False, BLOCK_N=2, BLOCK_K=1024, num_warps=4, programs_per_sm=12, max_split=32)
    return dict(DOT=True, BLOCK_N=64, BLOCK_K=256, num_warps=4, programs_per_sm=2, max_split=32)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: dict | None = None,
         silu_mul: bool = False):
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, for M <= GEMV_MAX_M. silu_mul: x is
    [M, 2 K] = [gate | up] and the input is silu(gate) * up. `config` overrides entries of default_config."""
    M, N, K = x.shape[0], weight.shape[0], weight.shape[1]
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == (2 * K if silu_mul else K), "x [M, K], weight [N, K]"
    assert M <= GEMV_MAX_M and weight.stride(1) == 1, "few tokens, row-major weight"
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = default_config(M, N, K)
    cfg.update(config or {})
    dot = cfg["DOT"] or M > 1
    block_m = max(16 if dot else 1, triton.next_power_of_2(M))
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(N, block_n)
    split, per_split = split_k(tiles, triton.cdiv(K, block_k), cfg["programs_per_sm"] * num_sms(x.device),
                               cfg["max_split"])
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    locks = split_locks(x.device, tiles) if split > 1 else out
    split_p2 = 1 if split == 1 else (16 if split <= 16 else 64)
    gemv_kernel[(tiles, split)](
        x, weight, bias if bias is not None else out, out, ws, locks, M, N, K, split, per_split,
        x.stride(0), weight.stride(0), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_P2=split_p2, HAS_BIAS=bias is not None, DOT=dot,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", EVEN_K=K % block_k == 0,
        SILU_MUL=silu_mul, num_warps=cfg["num_warps"], num_stages=1, **launch_options(x))
    return out


def _gemv_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """x's row count when this kernel should run (see linear), else 0."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    fits = rows == 1 or (rows <= GEMV_MAX_M and weight.shape[0] <= 8192)
    use = (fits and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16)
           and envs.gemv_enabled())
    return rows if use else 0


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """ops.silu_mul_linear on CUDA: linear(silu_and_mul(x)) with the activation inside the GEMV when it runs."""
    rows = _gemv_rows(x, weight)
    if rows:
        return gemv(x.reshape(rows, x.shape[-1]), weight, bias, silu_mul=True).view(*x.shape[:-1], weight.shape[0])
    return F.linear(silu_and_mul(x), weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """ops.linear on CUDA: this kernel for one token, and for up to GEMV_MAX_M tokens when N <= 8192 (where it
    measured faster than cuBLAS), fp16/bf16; cuBLAS otherwise (ENGINE_GEMV=0: always cuBLAS, for A/B runs)."""
    rows = _gemv_rows(x, weight)
    if rows:
        return gemv(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
