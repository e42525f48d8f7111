"""W4A16 matmul over AWQ GEMM-layout weights (layout in reference.py: qweight int32 [K, N / 8], nibble i of
each int32 holding column AWQ_ORDER[i] of its group of 8; qzeros [K / G, N / 8]; scales [K / G, N]).

- M <= 256 tokens (decode batches): one fused kernel. int4 weights are unpacked and dequantized in
  registers tile by tile, multiplied with tl.dot accumulating in fp32; split-K spreads K over extra programs so
  all SMs stream weights even at batch 1, partial sums meet through fp32 atomics.
- larger M (prefill): dequantize the weight once into fp16/bf16 (awq_dequantize_kernel) and let cuBLAS run
  the GEMM, which is compute-bound there, so reading the weight twice costs little.
The weights are used in the checkpoint's layout as loaded: no repacking.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FUSED_MAX_M = 256  # up to here the fused kernel (weights re-read once per 64 rows) beats dequantize + cuBLAS


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
def awq_gemm_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qwk, stride_qwn, stride_qzg, stride_qzn, stride_sg, stride_sn,
    stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_pn = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    mask_m, mask_n, mask_pn = offs_m < M, offs_n < N, offs_pn < N // 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K * SPLIT_K)
    for t in range(k_tiles):
        k0 = (t * SPLIT_K + pid_k) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        qw = tl.load(qweight_ptr + offs_k[:, None] * stride_qwk + offs_pn[None, :] * stride_qwn,
                     mask=mask_k[:, None] & mask_pn[None, :], other=0)  # [BLOCK_K, BLOCK_N // 8]
        g = k0 // GROUP_SIZE  # BLOCK_K divides GROUP_SIZE: one group per tile
        qz = tl.load(qzeros_ptr + g * stride_qzg + offs_pn[None, :] * stride_qzn, mask=mask_pn[None, :], other=0)
        s = tl.load(scales_ptr + g * stride_sg + offs_n[None, :] * stride_sn, mask=mask_n[None, :], other=0.0)
        w = (_unpack_awq(qw, BLOCK_N) - _unpack_awq(qz, BLOCK_N)).to(s.dtype) * s  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x.to(s.dtype), w, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask)


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


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def awq_dequantize(qweight, qzeros, scales, group_size: int, dtype=None) -> torch.Tensor:
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
    """x [M, K] @ W4 [K, N] (+ bias) -> [M, N] in x's dtype."""
    assert x.dim() == 2 and qweight.dtype == torch.int32 and qzeros.dtype == torch.int32
    M, K = x.shape
    N = scales.shape[1]
    assert qweight.shape == (K, N // 8) and scales.shape == (K // group_size, N) and qzeros.shape == (K // group_size,
                                                                                                   N // 8)
    if M > FUSED_MAX_M:
        out = x @ awq_dequantize(qweight, qzeros, scales, group_size, x.dtype)
        return out if bias is None else out + bias
    BLOCK_M = 16 if M <= 16 else (32 if M <= 32 else 64)
    BLOCK_N = 128 if N >= 128 else 64
    BLOCK_K = min(64, group_size)
    assert group_size % BLOCK_K == 0 and N % 8 == 0
    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    k_blocks = triton.cdiv(K, BLOCK_K)
    split_k = 1
    while tiles * split_k < 2 * _num_sms(x.device) and split_k * 2 <= min(16, k_blocks):
        split_k *= 2
    if split_k == 1:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), split_k)
    awq_gemm_kernel[grid](
        x, qweight, qzeros, scales, out, M, N, K,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
        scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
        GROUP_SIZE=group_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=split_k,
        DOT_PRECISION="ieee" if scales.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=3 if x.is_cuda else 1,
    )
    out = out.to(x.dtype)
    return out if bias is None else out + bias
