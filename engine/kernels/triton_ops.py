"""The Triton kernels as one table under the reference op names; ops.py picks from it (on first CUDA use).

Importing needs only triton (not a GPU): the kernels compile lazily at first launch. This module imports the
kernel files only, never ops.py.
"""

from __future__ import annotations

from engine.kernels.activation import silu_and_mul
from engine.kernels.awq_gemm import awq_linear, awq_linear_k, awq_repack
from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.gemv import linear, silu_mul_linear
from engine.kernels.prefill_attention import paged_prefill_attention
from engine.kernels.rms_norm import rms_norm
from engine.kernels.rotary import apply_rotary
from engine.kernels.store_kv import rotary_store_kv, store_kv

TRITON_OPS: dict[str, object] = dict(
    rms_norm=rms_norm,
    silu_and_mul=silu_and_mul,
    apply_rotary=apply_rotary,
    store_kv=store_kv,
    rotary_store_kv=rotary_store_kv,
    paged_decode_attention=paged_decode_attention,
    paged_prefill_attention=paged_prefill_attention,
    awq_linear=awq_linear,
    awq_linear_k=awq_linear_k,
    awq_repack=awq_repack,
    linear=linear,
    silu_mul_linear=silu_mul_linear,
)
