"""Split-K for the small-M matmul kernels (dense GEMV, W4A16): programs tile N (and M) and split K so that every
SM is busy even for one token; each program's fp32 partial goes to a small workspace and the last program of an
output tile to arrive (a per-tile counter, reset by that program) sums the partials in split order, adds the
bias and stores. One launch, no atomics on the output, no zero-fill or cast kernels, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def split_k_epilogue(acc, offs_m, offs_n, mask_m, mask_n, tile, pid_k, M, N, bias_ptr, out_ptr, ws_ptr,
                     lock_ptr, stride_om, stride_on, SPLIT_K, SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32: this program's partial sum. With one split it is the output; else it goes to
    ws [SPLIT_K, M, N] and the last program of this output tile to arrive sums all splits in split order
    (SPLIT_P2 >= SPLIT_K: a few buckets, so that split counts share compiled kernels)."""
    mask = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_P2 == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]  # split s at + s * M * N
        tl.store(ws_ptrs + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in tl.static_range(SPLIT_P2):  # unrolled: all loads in flight at once
                live = tl.full((1, 1), s, tl.int32) < SPLIT_K
                total += tl.load(ws_ptrs + s * M * N, mask=mask & live, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(lock_ptr + tile, 0)  # ready for the next launch



# ---- launcher helpers ---------------------------------------------------------------------------------------
_NUM_SMS: dict[torch.device, int] = {}
_LOCKS: dict[torch.device, torch.Tensor] = {}
_RETIRED_LOCKS: list[torch.Tensor] = []


def num_sms(device: torch.device) -> int:
    if device not in _NUM_SMS:
        is_cuda = device.type == "cuda"
        _NUM_SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if is_cuda else 4
    return _NUM_SMS[device]


def split_locks(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile arrival counters for the split-K epilogue, zero between launches (the last program resets its own).
    Allocated once per device (the engine's warm-up runs before CUDA graph capture); a larger request allocates a
    larger buffer but keeps the old one alive, since captured CUDA graphs may still point at it."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < n:
        if locks is not None:
            _RETIRED_LOCKS.append(locks)
        locks = torch.zeros(max(n, 8192), dtype=torch.int32, device=device)
        _LOCKS[device] = locks
    return locks


def split_k(tiles: int, k_tiles: int, target_programs: int, max_split: int) -> tuple[int, int]:
    """-> (split, k tiles per split): tiles * split close to target_programs, no empty split."""
    split = max(1, min(k_tiles, max_split, round(target_programs / tiles)))
    per_split = triton.cdiv(k_tiles, split)
    return triton.cdiv(k_tiles, per_split), per_split


