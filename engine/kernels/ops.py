"""The one ops interface the model code calls. Each op runs its Triton kernel on CUDA tensors and the torch
reference elsewhere (CPU). ENGINE_KERNELS=reference forces the reference everywhere (for A/B checks on GPU).

Signatures and layouts are those of reference.py; a Triton module registers itself in TRITON_OPS under the
same name, so adding a kernel never touches model code.
"""

from __future__ import annotations

import os

import torch

from engine.kernels import reference

TRITON_OPS: dict[str, object] = {}


def _load_triton_ops() -> None:
    try:
        from engine.kernels import triton_ops  # noqa: F401  (registers into TRITON_OPS)
    except ImportError:
        pass


def _pick(name: str, x: torch.Tensor):
    if x.is_cuda and os.environ.get("ENGINE_KERNELS", "auto") != "reference":
        if not TRITON_OPS:
            _load_triton_ops()
        fn = TRITON_OPS.get(name)
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
