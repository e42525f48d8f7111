"""The one ops interface the model code calls. Each op runs its Triton kernel on CUDA tensors and the torch
reference elsewhere (CPU). ENGINE_KERNELS=reference forces the reference everywhere (for A/B checks on GPU).

Signatures and layouts are those of reference.py. The Triton side exports its kernels as one table,
triton_ops.TRITON_OPS, under the same names; ops reads it on first CUDA use (imports go one way: ops -> triton_ops),
so adding a kernel never touches model code.
"""

from __future__ import annotations

import torch

from engine import envs
from engine.kernels import reference

_triton_table: dict | None = None  # triton_ops.TRITON_OPS once read ({} where triton is missing)


def _load_triton_ops() -> dict:
    global _triton_table
    if _triton_table is None:
        try:
            from engine.kernels.triton_ops import TRITON_OPS  # lazy: Triton is needed (and importable) only on CUDA
        except ImportError:
            TRITON_OPS = {}
        _triton_table = TRITON_OPS
    return _triton_table


def __getattr__(name: str):
    if name == "TRITON_OPS":  # ops.TRITON_OPS: the Triton table as ops picks from it
        return _load_triton_ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pick(name: str, x: torch.Tensor):
    if x.is_cuda and not envs.kernels_forced_to_reference():
        fn = (_triton_table if _triton_table is not None else _load_triton_ops()).get(name)
        if fn is not None:
            return fn
    return getattr(reference, name)


def rms_norm(x, weight, eps, residual=None):
    return _pick("rms_norm", x)(x, weight, eps, residual)


def silu_and_mul(x):
    return _pick("silu_and_mul", x)(x)


def apply_rotary(q, k, cos, sin):
    return _pick("apply_rotary", q)(q, k, cos, sin)


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale_zero=None, v_scale_zero=None, quant_policy=0):
    return _pick("store_kv", k)(k, v, k_cache, v_cache, slot_mapping, k_scale_zero, v_scale_zero, quant_policy)


def rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale_zero=None, v_scale_zero=None,
                    quant_policy=0):
    return _pick("rotary_store_kv", q)(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale_zero,
                                       v_scale_zero, quant_policy)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale,
                            k_scale_zero=None, v_scale_zero=None, quant_policy=0, max_seqlen_q=None):
    fn = _pick("paged_prefill_attention", q)
    if fn is reference.paged_prefill_attention:
        return fn(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, k_scale_zero, v_scale_zero,
                  quant_policy)
    return fn(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, k_scale_zero, v_scale_zero,
              quant_policy, max_seqlen_q)


def paged_decode_attention(q, k_cache, v_cache, block_tables, kv_lens, scale,
                           k_scale_zero=None, v_scale_zero=None, quant_policy=0):
    return _pick("paged_decode_attention", q)(q, k_cache, v_cache, block_tables, kv_lens, scale, k_scale_zero,
                                              v_scale_zero, quant_policy)


def linear(x, weight, bias=None):
    return _pick("linear", x)(x, weight, bias)


def silu_mul_linear(x, weight, bias=None):
    return _pick("silu_mul_linear", x)(x, weight, bias)


def awq_linear(x, qweight, qzeros, scales, group_size, bias=None):
    return _pick("awq_linear", x)(x, qweight, qzeros, scales, group_size, bias)


def awq_linear_k(x, qweight_k, qzeros, scales, group_size, bias=None):
    """awq_linear on the K-packed qweight that AWQLinear.post_load makes (GPU only)."""
    return _pick("awq_linear_k", x)(x, qweight_k, qzeros, scales, group_size, bias)


def awq_repack(qweight, group_size):
    """AutoAWQ qweight -> the K-packed layout the Triton W4A16 kernels stream (CUDA only: the reference needs none)."""
    return _load_triton_ops()["awq_repack"](qweight, group_size)
