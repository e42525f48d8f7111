"""AWQLinear: a drop-in for Linear holding 4-bit AWQ weights (AutoAWQ GEMM layout, see kernels/reference.py).

Checkpoint tensors load as they are (`qweight`, `qzeros`, `scales`, optional `bias`); fused linears (qkv,
gate_up) concatenate their shards along the output dimension, which in this layout is dim 1 with 8 output
features per int32. Once the model is loaded, `post_load()` (called by the loader for every module that has it,
the dummy-weights path included) repacks qweight on a GPU into the K-packed layout of kernels/awq_gemm.py
(int32 [out, in / 8], input rows in chunks of min(G, 128): int32 j of chunk c holds rows C c + (C / 8) i + j in
its nibbles i = 0..7), which the W4A16 Triton kernels stream with contiguous loads; qzeros and scales keep the
checkpoint layout. On CPU nothing is repacked and the forward runs the torch reference (dequantize, matmul).
Modules listed in `modules_to_not_convert` stay plain Linear layers.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import ops
from engine.layers.linear import Linear


class AWQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group_size: int,
                 shard_sizes: list[int] | None = None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"AWQ group size {group_size} does not divide in_features {in_features}")
        if out_features % 8:
            raise ValueError(f"AWQ needs out_features divisible by 8, got {out_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.shard_sizes = shard_sizes or [out_features]
        self.k_packed = False  # qweight in the checkpoint layout until post_load repacks it
        groups = in_features // group_size

        def param(shape, dtype_, pack):
            p = nn.Parameter(torch.empty(shape, dtype=dtype_), requires_grad=False)
            p.output_dim, p.output_pack = 1, pack
            return p

        self.qweight = param((in_features, out_features // 8), torch.int32, 8)
        self.qzeros = param((groups, out_features // 8), torch.int32, 8)
        self.scales = param((groups, out_features), torch.float16 if dtype == torch.float32 else dtype, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
            self.bias.output_dim, self.bias.output_pack = 0, 1
        else:
            self.register_parameter("bias", None)

    @torch.no_grad()
    def post_load(self) -> None:
        """Repack qweight into the kernels' K-packed layout (GPU only; groups of 32, 64 or a multiple of 128)."""
        if self.k_packed or not self.qweight.is_cuda:
            return
        packed = ops.awq_repack(self.qweight.data, self.group_size)
        self.qweight = nn.Parameter(packed, requires_grad=False)
        self.k_packed = True

    def forward(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        """silu_mul: x is [..., 2 * in_features] = [gate | up] and the input is silu(gate) * up. Here the activation
        stays a kernel of its own: inside the W4A16 kernel it measured slower (H200, Llama-2-7B, batch-1 step
        without attention: 2.07 vs 1.74 ms, benchmarks/bench_gemv.py)."""
        if silu_mul:
            x = ops.silu_and_mul(x)
        if self.k_packed:
            return ops.awq_linear_k(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias)
        return ops.awq_linear(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias)


def awq_linear_factory(quantization_config: dict, dtype: torch.dtype):
    bits = quantization_config.get("bits", quantization_config.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"AWQ checkpoints with {bits}-bit weights are not supported (4-bit GEMM layout only)")
    version = str(quantization_config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported (the GEMM layout is)")
    group_size = quantization_config.get("group_size", quantization_config.get("q_group_size", 128))
    skip = quantization_config.get("modules_to_not_convert") or []

    def make(in_features, out_features, bias, dtype_, shard_sizes=None, prefix=""):
        # checkpoint names of the fused modules' shards (q_proj/k_proj/v_proj, gate_proj/up_proj) count too
        names = {prefix, prefix.replace("qkv_proj", "q_proj"), prefix.replace("gate_up_proj", "gate_proj")}
        if any(s and s in name for s in skip for name in names):
            return Linear(in_features, out_features, bias, dtype_, shard_sizes)
        return AWQLinear(in_features, out_features, bias, dtype_, group_size, shard_sizes)

    return make
