"""Linear layers that load from checkpoints, including fused (packed) ones such as qkv and gate_up.

A fused linear's output is the concatenation of its shards' outputs. Every parameter declares which of
its dimensions runs along the output features and how many output features one element there spans
(`output_dim`, `output_pack`), so the loader can copy a shard into place for any weight format
(a plain [out, in] weight, or AWQ's packed qweight [in, out / 8]).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import ops


class Linear(nn.Module):
    """y = x W^T + b, W: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 shard_sizes: list[int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shard_sizes = shard_sizes or [out_features]
        assert sum(self.shard_sizes) == out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.output_dim, self.weight.output_pack = 0, 1
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
            self.bias.output_dim, self.bias.output_pack = 0, 1
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        """silu_mul: x is [..., 2 * in_features] = [gate | up] and the input is silu(gate) * up (the gated MLP's
        activation, fused into the matmul's kernel where one runs)."""
        if silu_mul:
            return ops.silu_mul_linear(x, self.weight, self.bias)
        return ops.linear(x, self.weight, self.bias)


def load_shard(param: torch.Tensor, loaded: torch.Tensor, shard_sizes: list[int], shard_id: int) -> None:
    """Copy one shard (e.g. k_proj of a fused qkv_proj) into its slice of the fused parameter."""
    dim, pack = getattr(param, "output_dim", 0), getattr(param, "output_pack", 1)
    offset = sum(shard_sizes[:shard_id]) // pack
    size = shard_sizes[shard_id] // pack
    target = param.data.narrow(dim, offset, size)
    if target.shape != loaded.shape:
        raise ValueError(
            f"shard {shard_id}: checkpoint tensor {tuple(loaded.shape)} does not fit {tuple(target.shape)}"
        )
    target.copy_(loaded)
