"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the kernel
before it on the stream is still finishing, so the launch and the first loads of constant data (weights) overlap
the previous kernel's tail. A kernel that takes part calls `wait_for_previous` before it reads anything an
earlier kernel wrote and before it writes anything, and `release_next` to let the next kernel launch early.

On by default on sm_90+ GPUs when the installed Triton can launch with it; ENGINE_PDL=0 turns it off (A/B
benchmarks). Under the interpreter and on older GPUs the kernels compile without the instructions.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from engine import envs


@functools.lru_cache
def _triton_supports_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.lru_cache
def _device_supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels working on `t` should be launched with PDL."""
    if not t.is_cuda or not envs.pdl_allowed():
        return False
    return _triton_supports_pdl() and _device_supports_pdl(t.device.index or 0)


def launch_options(t: torch.Tensor) -> dict:
    """Keyword arguments for a Triton launch: USE_PDL for the kernel, launch_pdl for the driver."""
    on = pdl_enabled(t)
    return dict(USE_PDL=True, launch_pdl=True) if on else dict(USE_PDL=False)


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Block until the previous kernel on the stream has finished and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_next(USE_PDL: tl.constexpr):
    """Let the next kernel on the stream launch once every program of this one got here (or ended)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
