"""Rotary position embedding tables for the rope types real checkpoints use: default, linear, dynamic (NTK,
at the configured maximum length), llama3 and yarn. cos/sin are precomputed for every position once."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.kernels import ops


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the attention factor that scales cos/sin (yarn), for one rope type."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default" or scaling is None:
        return inv_freq.float(), 1.0
    factor = float(scaling.get("factor", 1.0))
    if rope_type == "linear":
        return (inv_freq / factor).float(), 1.0
    if rope_type == "dynamic":
        original = scaling.get("original_max_position_embeddings", max_position)
        base = theta * ((factor * max_position / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return (1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))).float(), 1.0
    if rope_type == "llama3":
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = original / low_freq_factor
        high_freq_wavelen = original / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled).float(), 1.0
    if rope_type == "yarn":
        original = float(scaling.get("original_max_position_embeddings", max_position))
        beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))

        def correction_dim(num_rotations):
            return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
        attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv.float(), float(attention_factor)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, dynamic, llama3, yarn)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [max_pos, D / 2]
        self.register_buffer("cos", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_factor, persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_tokens, head_dim // 2] for a step's positions: gathered once, used by every layer."""
        return self.cos[positions], self.sin[positions]

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        return ops.apply_rotary(q, k, *cos_sin)
