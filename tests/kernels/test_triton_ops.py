"""triton_ops.py registers every Triton op in ops.TRITON_OPS with exactly the reference signature."""

from __future__ import annotations

import inspect

from engine.kernels import ops, reference

OP_NAMES = ["rms_norm", "silu_and_mul", "apply_rotary", "store_kv", "rotary_store_kv", "paged_decode_attention",
            "paged_prefill_attention", "linear", "silu_mul_linear"]


def test_registers_all_ops_with_reference_signatures():
    from engine.kernels import triton_ops  # noqa: F401  (fills ops.TRITON_OPS)

    assert set(OP_NAMES) <= set(ops.TRITON_OPS)
    for name in OP_NAMES:
        ref_params = list(inspect.signature(getattr(reference, name)).parameters.values())
        params = list(inspect.signature(ops.TRITON_OPS[name]).parameters.values())
        if name == "paged_prefill_attention":  # one extra trailing host-side hint
            assert params[-1].name == "max_seqlen_q" and params[-1].default is None
            params = params[:-1]
        assert [(p.name, p.default) for p in params] == [(p.name, p.default) for p in ref_params], name
