"""CLIP vision tower (ViT) for LLaVA: patch embedding, class token, learned positions, pre-norm encoder layers with
attention through torch SDPA. Only the layers up to the one LLaVA selects are built (ViT-L/14-336 with
select layer -2 runs 23 of its 24 layers); the final post-layernorm is never used.

Module names mirror transformers' CLIPVisionModel (`vision_model.embeddings.*`, `vision_model.pre_layrnorm`,
`vision_model.encoder.layers.N.*`), so checkpoint tensors load by name; q/k/v load into one fused qkv_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import Linear

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class CLIPVisionSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int  # in the checkpoint
    num_heads: int
    image_size: int
    patch_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    @classmethod
    def from_config(cls, cfg: dict) -> CLIPVisionSpec:
        cfg = cfg.get("vision_config", cfg) if "vision_config" in cfg and "hidden_size" not in cfg else cfg
        spec = cls(
            hidden_size=cfg.get("hidden_size", 768),
            intermediate_size=cfg.get("intermediate_size", 3072),
            num_layers=cfg.get("num_hidden_layers", 12),
            num_heads=cfg.get("num_attention_heads", 12),
            image_size=cfg.get("image_size", 224),
            patch_size=cfg.get("patch_size", 32),
            hidden_act=cfg.get("hidden_act", "quick_gelu"),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
            num_channels=cfg.get("num_channels", 3),
        )
        if spec.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {spec.hidden_act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        return spec

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.num_patches_per_side**2 + 1


def _layer_norm(hidden: int, eps: float, dtype) -> nn.LayerNorm:
    norm = nn.LayerNorm(hidden, eps=eps, dtype=dtype)
    norm.requires_grad_(False)
    return norm


class CLIPAttention(nn.Module):
    def __init__(self, spec: CLIPVisionSpec, dtype):
        super().__init__()
        h = spec.hidden_size
        self.num_heads, self.head_dim = spec.num_heads, h // spec.num_heads
        self.qkv_proj = Linear(h, 3 * h, True, dtype, shard_sizes=[h, h, h])
        self.out_proj = Linear(h, h, True, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        qkv = F.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)  # [b, n, 3h]
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [b, heads, n, d] each
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, n, d]
        return F.linear(out.transpose(1, 2).reshape(b, n, h), self.out_proj.weight, self.out_proj.bias)


class CLIPMLP(nn.Module):
    def __init__(self, spec: CLIPVisionSpec, dtype):
        super().__init__()
        self.act = _ACTIVATIONS[spec.hidden_act]
        self.fc1 = Linear(spec.hidden_size, spec.intermediate_size, True, dtype)
        self.fc2 = Linear(spec.intermediate_size, spec.hidden_size, True, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(x, self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, spec: CLIPVisionSpec, dtype):
        super().__init__()
        self.layer_norm1 = _layer_norm(spec.hidden_size, spec.layer_norm_eps, dtype)
        self.self_attn = CLIPAttention(spec, dtype)
        self.layer_norm2 = _layer_norm(spec.hidden_size, spec.layer_norm_eps, dtype)
        self.mlp = CLIPMLP(spec, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, spec: CLIPVisionSpec, dtype):
        super().__init__()
        self.patch_size = spec.patch_size
        self.class_embedding = nn.Parameter(torch.empty(spec.hidden_size, dtype=dtype), requires_grad=False)
        self.patch_embedding = nn.Conv2d(spec.num_channels, spec.hidden_size, spec.patch_size, spec.patch_size,
                                         bias=False, dtype=dtype)
        self.position_embedding = nn.Embedding(spec.num_positions, spec.hidden_size, dtype=dtype)
        self.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [b, h, side, side]
        patches = patches.flatten(2).transpose(1, 2)  # [b, side * side, h]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # [b, num_positions, h]


class CLIPEncoder(nn.Module):
    def __init__(self, spec: CLIPVisionSpec, num_layers: int, dtype):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(spec, dtype) for _ in range(num_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, spec: CLIPVisionSpec, num_layers: int, dtype):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(spec, dtype)
        self.pre_layrnorm = _layer_norm(spec.hidden_size, spec.layer_norm_eps, dtype)  # transformers' spelling
        self.encoder = CLIPEncoder(spec, num_layers, dtype)


class CLIPVisionTower(nn.Module):
    """Hidden states of the selected layers: transformers' `hidden_states[layer]` (index 0 = the embeddings after
    pre_layrnorm, index i = the output of layer i; negative indices count from the checkpoint's last layer),
    concatenated along features when several layers are selected."""

    def __init__(self, spec: CLIPVisionSpec, select_layers: list[int], dtype):
        super().__init__()
        self.spec = spec
        self.select_layers = [i if i >= 0 else spec.num_layers + 1 + i for i in select_layers]
        if not all(0 <= i <= spec.num_layers for i in self.select_layers):
            raise ValueError(f"vision feature layer(s) {select_layers} outside a {spec.num_layers}-layer tower")
        self.num_layers_run = max(self.select_layers)
        self.vision_model = CLIPVisionTransformer(spec, self.num_layers_run, dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))  # [b, num_positions, h]
        selected = {0: x} if 0 in self.select_layers else {}
        for i, layer in enumerate(vm.encoder.layers, start=1):
            x = layer(x)
            if i in self.select_layers:
                selected[i] = x
        return torch.cat([selected[i] for i in self.select_layers], dim=-1)  # [b, num_positions, h * num_selected]

    def keeps_tensor(self, name: str) -> bool:
        """Whether a checkpoint tensor under `vision_model.` has a place here (deeper layers and post_layernorm
        are not built)."""
        if name.startswith("vision_model.encoder.layers."):
            return int(name.split(".")[3]) < self.num_layers_run
        return not name.startswith("vision_model.post_layernorm")
