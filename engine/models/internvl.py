"""InternVL (2.5 / 3) for the paged engine: the InternViT vision tower, pixel shuffle (downsample 0.5), the MLP
projector (LayerNorm, linear, GELU, linear) and the Qwen2 / Llama / InternLM2 decoder of llama.py.

- Images are cut into tiles (transformers' GotOcr2 image processor, PIL flavour, `crop_to_patches` on as
  InternVLProcessor runs it): the grid of `min_patches`..`max_patches` tiles whose aspect ratio is closest to the
  image's, plus a thumbnail of the whole image when there is more than one tile. Every tile gives
  (tile / patch * downsample)^2 tokens (256 for 448-pixel tiles), so an item's `image_size` (the original height
  and width) fixes its token count before the model runs.
- In the prompt each image is `<img>` + one `<IMG_CONTEXT>` per token + `</img>`: the chat template writes the
  image's marker, the prompter wraps it (the processor's `image_wrap`) and expands it.

Layouts that load, mapped onto the same modules:
- transformers' `InternVLForConditionalGeneration` (the `-hf` checkpoints): `model.vision_tower.*`,
  `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*` (or without the `model.` container);
  the image processor from preprocessor_config.json.
- the original remote-code `InternVLChatModel` (OpenGVLab/InternVL2_5-*, InternVL3-*): `vision_model.*` (fused
  `attn.qkv`), `mlp1.0/1/3`, `language_model.*` with an InternLM2, Qwen2 or Llama decoder (its config in
  `llm_config`), read without running the folder's code; tiling from config.json (`min_dynamic_patch`,
  `max_dynamic_patch`, `use_thumbnail`, `force_image_size`, ImageNet mean / std as its code has them), `<image>` as
  the template's marker and its conversation template (`template`: internvl2_5, internlm2-chat) as the chat
  template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InvalidImageError, ModelLoadError, UnsupportedModelError
from engine.layers.linear import Linear
from engine.models.internlm2 import convert_tensor as internlm2_tensor
from engine.models.llama import LlamaForCausalLM, plain_linear
from engine.models.spec import ModelEntry, ModelSpec, no_extra_tensors, parse_decoder_spec

HF_ARCH = "InternVLForConditionalGeneration"
ORIGINAL_ARCH = "InternVLChatModel"
TEXT_ARCHS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "internlm2": "InternLM2ForCausalLM"}
CONTEXT_TOKEN, START_TOKEN, END_TOKEN = "<IMG_CONTEXT>", "<img>", "</img>"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the original code's conversation templates (its conversation.py), as chat templates: ChatML with a default system
_SYSTEM = {
    "internvl2_5": ("你是书生·万象，英文名是InternVL，"
                    "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"),
    "internlm2-chat": ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
                       "英文名叫InternVL, 是一个有用无害的人工智能助手。"),
}
_ACTS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "silu": F.silu, "relu": F.relu}


def conversation_template(system: str) -> str:
    """ChatML with `system` when the messages bring none (the original's MPT-style separators)."""
    return ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% else %}{% set system = " + json.dumps(system, ensure_ascii=False) + " %}{% endif %}"
            "<|im_start|>system\n{{ system }}<|im_end|>\n"
            "{% for message in messages %}{% if message['role'] != 'system' %}"
            "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---- tiling (GotOcr2 / InternVL's dynamic_preprocess, rewritten) -----------------------------------------------
@lru_cache(maxsize=256)
def tile_grid(image_size: tuple[int, int], min_tiles: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(columns, rows) of tiles whose aspect ratio is closest to the image's (height, width); among equally close
    grids, the larger one while the image covers more than half of it."""
    height, width = image_size
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


@dataclass
class InternVision:
    """The vision half of an InternVL config, resolved."""

    layout: str  # "hf" or "original"
    text_arch: str  # the decoder: Qwen2ForCausalLM, LlamaForCausalLM, InternLM2ForCausalLM
    width: int
    depth: int
    num_heads: int
    mlp_hidden: int
    act: str
    norm_type: str  # "layer_norm" | "rms_norm"
    eps: float
    qkv_bias: bool
    qk_norm: bool
    final_norm: bool  # -hf use_mean_pooling false: a LayerNorm after the last layer
    tile: int  # pixels per tile side (the tower's image size)
    patch_size: int
    num_channels: int
    feature_layer: int
    downsample: float
    projector_act: str
    text_hidden: int
    min_tiles: int = 1
    max_tiles: int = 12
    crop: bool = True  # dynamic tiling (InternVLProcessor's crop_to_patches / the original's dynamic_image_size)
    thumbnail: bool = True
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    image_token_id: int | None = None
    processor_folder: Path | None = None
    chat_template: str | None = None  # the original layout's conversation template (engine/tokenizer.py uses it)
    sizing = "dynamic tiling"

    @property
    def family(self) -> str:
        return "InternVL, " + ("-hf layout" if self.layout == "hf" else "original layout")

    @property
    def tower_name(self) -> str:
        return (f"InternViT/{self.patch_size} ({self.depth} layers, width {self.width}), {self.tile}-px tiles, "
                f"{self.min_tiles}–{self.max_tiles} + thumbnail")

    @property
    def patches_per_side(self) -> int:
        return self.tile // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return int(self.patches_per_side * self.downsample) ** 2

    @property
    def layers_run(self) -> int:
        return self.feature_layer if self.feature_layer >= 0 else self.depth + 1 + self.feature_layer

    @property
    def token_range(self) -> tuple[int, int]:
        """(fewest, most) tokens one image takes: the smallest and the largest grid (plus the thumbnail)."""
        if not self.crop or self.max_tiles <= 1:
            return self.tokens_per_tile, self.tokens_per_tile
        return (self.num_tiles_of(self.min_tiles) * self.tokens_per_tile,
                self.num_tiles_of(self.max_tiles) * self.tokens_per_tile)

    def num_tiles_of(self, grid_tiles: int) -> int:
        return grid_tiles + (1 if self.thumbnail and grid_tiles > 1 else 0)

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        if not self.crop or self.max_tiles <= 1:
            return 1
        cols, rows = tile_grid(tuple(image_size), self.min_tiles, self.max_tiles, self.tile)
        return self.num_tiles_of(cols * rows)

    def num_features(self, image_size: tuple[int, int]) -> int:
        return self.num_tiles(image_size) * self.tokens_per_tile


# ---- config ---------------------------------------------------------------------------------------------------
def complete_config(cfg: dict) -> dict:
    """The original layout keeps the decoder's config in `llm_config`: read it as the text part. -hf: the top-level
    tie_word_embeddings (transformers' default True when absent) decides, as in transformers."""
    archs = cfg.get("architectures") or []
    if ORIGINAL_ARCH in archs and "llm_config" in cfg and "text_config" not in cfg:
        return {**cfg, "text_config": dict(cfg["llm_config"])}
    if HF_ARCH in archs and cfg.get("text_config") is not None:
        tie = bool(cfg.get("tie_word_embeddings", True))
        return {**cfg, "text_config": {**cfg["text_config"], "tie_word_embeddings": tie}}
    return cfg


def _text_arch(text_cfg: dict, arch: str) -> str:
    if arch == ORIGINAL_ARCH:
        for a in text_cfg.get("architectures") or []:
            if a in TEXT_ARCHS.values():
                return a
    model_type = text_cfg.get("model_type", "qwen2")
    if model_type in TEXT_ARCHS:
        return TEXT_ARCHS[model_type]
    raise UnsupportedModelError(f"{arch} with a {text_cfg.get('architectures') or model_type!r} language model is not "
                                f"supported (supported: {', '.join(TEXT_ARCHS.values())})")


def parse_spec(text_cfg: dict, arch: str) -> ModelSpec:
    text_arch = _text_arch(text_cfg, arch)
    spec = parse_decoder_spec(text_cfg, text_arch, family="internvl")
    spec.architecture = arch
    return spec


def _token_id(path: Path, token: str) -> int | None:
    """An added token's id read from the folder's tokenizer files (no tokenizer is built here)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        file = path / name
        if not file.is_file():
            continue
        data = json.loads(file.read_text())
        if name == "added_tokens.json" and token in data:
            return int(data[token])
        for entry in data.get("added_tokens") or []:
            if entry.get("content") == token:
                return int(entry["id"])
        for key, entry in (data.get("added_tokens_decoder") or {}).items():
            if entry.get("content") == token:
                return int(key)
    return None


def resolve(spec: ModelSpec, path: Path, vision_tower: str | None = None) -> InternVision:
    if vision_tower:
        raise ModelLoadError(f"{spec.architecture} keeps its vision tower in the model folder; --vision-tower is for "
                             "original-layout LLaVA checkpoints")
    raw = spec.raw
    v = raw.get("vision_config") or {}
    text_arch = _text_arch({**raw, **(raw.get("text_config") or {})}, spec.architecture)
    if spec.architecture == HF_ARCH:
        from transformers import InternVLVisionConfig

        v = {**InternVLVisionConfig().to_dict(), **v}
        size, patch = v["image_size"], v["patch_size"]
        tile = int(size[0] if isinstance(size, list | tuple) else size)
        patch = int(patch[0] if isinstance(patch, list | tuple) else patch)
        pre = _processor_settings(path)
        pre_size = pre.get("size") or {}
        if pre_size and (pre_size.get("height"), pre_size.get("width")) != (tile, tile):
            raise UnsupportedModelError(f"{path}: preprocessor_config.json's tile size {pre_size} differs from the "
                                        f"vision tower's image size {tile}")
        select = raw.get("vision_feature_select_strategy", "default")
        if select != "default":
            raise UnsupportedModelError(f"{path}: vision_feature_select_strategy {select!r} is not supported")
        vision = InternVision(
            layout="hf", text_arch=text_arch, width=int(v["hidden_size"]), depth=int(v["num_hidden_layers"]),
            num_heads=int(v["num_attention_heads"]), mlp_hidden=int(v["intermediate_size"]), act=v["hidden_act"],
            norm_type=v.get("norm_type", "layer_norm"), eps=float(v.get("layer_norm_eps", 1e-6)),
            qkv_bias=bool(v.get("attention_bias", False)), qk_norm=bool(v.get("use_qk_norm", False)),
            final_norm=not v.get("use_mean_pooling", True), tile=tile, patch_size=patch,
            num_channels=int(v.get("num_channels", 3)), feature_layer=int(raw.get("vision_feature_layer", -1)),
            downsample=float(raw.get("downsample_ratio", 0.5)),
            projector_act=raw.get("projector_hidden_act", "gelu"), text_hidden=spec.hidden_size,
            min_tiles=int(pre.get("min_patches", 1)), max_tiles=int(pre.get("max_patches", 12)), crop=True,
            image_mean=tuple(pre.get("image_mean") or IMAGENET_MEAN),
            image_std=tuple(pre.get("image_std") or IMAGENET_STD),
            image_token_id=raw.get("image_token_id", _token_id(path, CONTEXT_TOKEN)), processor_folder=path)
    else:
        if raw.get("ps_version", "v2") != "v2":
            raise UnsupportedModelError(f"{path}: ps_version {raw.get('ps_version')!r} is not supported (v2 is)")
        tile = int(raw.get("force_image_size") or v.get("image_size", 448))
        if int(v.get("image_size", tile)) != tile:
            raise UnsupportedModelError(f"{path}: force_image_size {tile} differs from the tower's image size")
        template = raw.get("template")
        vision = InternVision(
            layout="original", text_arch=text_arch, width=int(v["hidden_size"]), depth=int(v["num_hidden_layers"]),
            num_heads=int(v["num_attention_heads"]), mlp_hidden=int(v["intermediate_size"]),
            act=v.get("hidden_act", "gelu"), norm_type=v.get("norm_type", "layer_norm"),
            eps=float(v.get("layer_norm_eps", 1e-6)), qkv_bias=bool(v.get("qkv_bias", True)),
            qk_norm=bool(v.get("qk_normalization", False)), final_norm=False, tile=tile,
            patch_size=int(v.get("patch_size", 14)), num_channels=int(v.get("num_channels", 3)),
            feature_layer=int(raw.get("select_layer", -1)), downsample=float(raw.get("downsample_ratio", 0.5)),
            projector_act="gelu", text_hidden=spec.hidden_size, min_tiles=int(raw.get("min_dynamic_patch", 1)),
            max_tiles=int(raw.get("max_dynamic_patch", 12)), crop=bool(raw.get("dynamic_image_size", True)),
            thumbnail=bool(raw.get("use_thumbnail", True)), image_token_id=_token_id(path, CONTEXT_TOKEN),
            processor_folder=None,
            chat_template=conversation_template(_SYSTEM[template]) if template in _SYSTEM else None)
    _check(vision, path)
    return vision


def _processor_settings(path: Path) -> dict:
    file = path / "preprocessor_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _check(vision: InternVision, path: Path) -> None:
    for act in (vision.act, vision.projector_act):
        if act not in _ACTS:
            raise UnsupportedModelError(f"{path}: activation {act!r} is not supported ({', '.join(_ACTS)})")
    if vision.norm_type not in ("layer_norm", "rms_norm"):
        raise UnsupportedModelError(f"{path}: vision norm_type {vision.norm_type!r} is not supported")
    side = vision.patches_per_side * vision.downsample
    if vision.tile % vision.patch_size or side != int(side) or vision.downsample <= 0:
        raise UnsupportedModelError(f"{path}: {vision.tile}-pixel tiles of {vision.patch_size}-pixel patches do not "
                                    f"pixel-shuffle by {vision.downsample}")
    if not 0 < vision.layers_run <= vision.depth:
        raise UnsupportedModelError(f"{path}: vision feature layer {vision.feature_layer} is outside the tower")
    if vision.image_token_id is None:
        raise ModelLoadError(f"{path}: the tokenizer has no {CONTEXT_TOKEN} token (InternVL's image placeholder)")


# ---- tensor names -----------------------------------------------------------------------------------------------
_HF_CONTAINERS = (("model.language_model.", "model."), ("model.vision_tower.", "vision_tower."),
                  ("model.multi_modal_projector.", "multi_modal_projector."))
_ORIGINAL_TOWER = (  # original InternViT name piece -> this module's (the -hf names)
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("encoder.layers.", "encoder.layer."),
    (".attn.proj.", ".attention.projection_layer."),
    (".attn.q_norm.", ".attention.q_norm."),
    (".attn.k_norm.", ".attention.k_norm."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
    (".ls1", ".lambda_1"),
    (".ls2", ".lambda_2"),
)
_ORIGINAL_PROJECTOR = {"mlp1.0.": "multi_modal_projector.layer_norm.", "mlp1.1.": "multi_modal_projector.linear_1.",
                       "mlp1.3.": "multi_modal_projector.linear_2."}


def _tower_layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "encoder" and parts[2] == "layer":
        return int(parts[3])
    return None


def convert_tensor(name: str, tensor: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """Either layout's tensor -> this module's names (the loader has already cut a leading `language_model.`)."""
    vision: InternVision = spec.vision
    for old, new in _HF_CONTAINERS:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if name.startswith("vision_model."):  # the original tower
        name = "vision_tower." + name[len("vision_model."):]
        for old, new in _ORIGINAL_TOWER:
            name = name.replace(old, new)
        if ".attn.qkv." in name:
            parts = tensor.chunk(3, dim=0)
            return [(name.replace(".attn.qkv.", f".attention.{p}."), t) for p, t in zip(("q_proj", "k_proj",
                                                                                           "v_proj"), parts)
                    if (_tower_layer(name) or 0) < vision.layers_run]
    for old, new in _ORIGINAL_PROJECTOR.items():
        if name.startswith(old):
            return [(new + name[len(old):], tensor)]
    if name.startswith("vision_tower."):
        layer = _tower_layer(name)
        if layer is not None and layer >= vision.layers_run:
            return []  # past the feature layer: not built
        if name.startswith("vision_tower.layernorm.") and not (vision.final_norm and vision.feature_layer == -1):
            return []
        return [(name, tensor)]
    if name.startswith("multi_modal_projector."):
        return [(name, tensor)]
    if spec.tie_word_embeddings and name in ("lm_head.weight", "output.weight"):
        return []  # tied: transformers uses the embeddings (a saved copy may differ)
    if vision.text_arch == "InternLM2ForCausalLM":
        return internlm2_tensor(name, tensor, spec)
    return [(name, tensor)]


# ---- vision tower -------------------------------------------------------------------------------------------------
class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _norm(vision: InternVision, dim: int, dtype) -> nn.Module:
    if vision.norm_type == "rms_norm":
        return _RMSNorm(dim, vision.eps, dtype)
    norm = nn.LayerNorm(dim, eps=vision.eps, dtype=dtype)
    norm.requires_grad_(False)
    return norm


def _linear(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


class VisionAttention(nn.Module):
    def __init__(self, vision: InternVision, dtype):
        super().__init__()
        h = vision.width
        self.num_heads, self.head_dim = vision.num_heads, h // vision.num_heads
        self.qkv_proj = Linear(h, 3 * h, vision.qkv_bias, dtype, shard_sizes=[h, h, h])  # q/k/v_proj load into it
        self.projection_layer = Linear(h, h, True, dtype)
        self.q_norm = _RMSNorm(h, 1e-6, dtype) if vision.qk_norm else None
        self.k_norm = _RMSNorm(h, 1e-6, dtype) if vision.qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = _linear(self.qkv_proj, x).split(h, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, n, d]
        return _linear(self.projection_layer, out.transpose(1, 2).reshape(b, n, h))


class VisionMLP(nn.Module):
    def __init__(self, vision: InternVision, dtype):
        super().__init__()
        self.act = _ACTS[vision.act]
        self.fc1 = Linear(vision.width, vision.mlp_hidden, True, dtype)
        self.fc2 = Linear(vision.mlp_hidden, vision.width, True, dtype)

    def forward(self, x):
        return _linear(self.fc2, self.act(_linear(self.fc1, x)))


class VisionLayer(nn.Module):
    def __init__(self, vision: InternVision, dtype):
        super().__init__()
        self.layernorm_before = _norm(vision, vision.width, dtype)
        self.attention = VisionAttention(vision, dtype)
        self.layernorm_after = _norm(vision, vision.width, dtype)
        self.mlp = VisionMLP(vision, dtype)
        self.lambda_1 = nn.Parameter(torch.ones(vision.width, dtype=dtype), requires_grad=False)
        self.lambda_2 = nn.Parameter(torch.ones(vision.width, dtype=dtype), requires_grad=False)

    def forward(self, x):
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class VisionEmbeddings(nn.Module):
    def __init__(self, vision: InternVision, dtype):
        super().__init__()
        w, n = vision.width, vision.patches_per_side**2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w, dtype=dtype), requires_grad=False)
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(vision.num_channels, w, vision.patch_size, vision.patch_size,
                                                     dtype=dtype)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n + 1, w, dtype=dtype), requires_grad=False)
        self.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        proj = self.patch_embeddings.projection
        x = proj(pixels.to(proj.weight.dtype)).flatten(2).transpose(1, 2)  # [tiles, patches, width]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embeddings


class VisionEncoder(nn.Module):
    def __init__(self, vision: InternVision, dtype):
        super().__init__()
        self.layer = nn.ModuleList(VisionLayer(vision, dtype) for _ in range(vision.layers_run))


class InternViT(nn.Module):
    """Tiles [n, 3, tile, tile] -> the feature layer's hidden states [n, 1 + patches, width] (transformers'
    `hidden_states[feature_layer]`; the last layer's `last_hidden_state`, through `layernorm` where it has one)."""

    def __init__(self, vision: InternVision, dtype):
        super().__init__()
        self.embeddings = VisionEmbeddings(vision, dtype)
        self.encoder = VisionEncoder(vision, dtype)
        self.layernorm = (_norm(vision, vision.width, dtype) if vision.final_norm and vision.feature_layer == -1
                          else None)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return x if self.layernorm is None else self.layernorm(x)


class InternVLProjector(nn.Module):
    def __init__(self, vision: InternVision, dtype):
        super().__init__()
        merged = vision.width * int(1 / vision.downsample) ** 2
        self.layer_norm = nn.LayerNorm(merged, eps=1e-5, dtype=dtype)
        self.layer_norm.requires_grad_(False)
        self.act = _ACTS[vision.projector_act]
        self.linear_1 = Linear(merged, vision.text_hidden, True, dtype)
        self.linear_2 = Linear(vision.text_hidden, vision.text_hidden, True, dtype)

    def forward(self, x):
        return _linear(self.linear_2, self.act(_linear(self.linear_1, self.layer_norm(x))))


def pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """[n, side, side, c] -> [n, side * scale, side * scale, c / scale^2], InternVL's ps_version v2 order."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / scale**2)).permute(0, 2, 1, 3)
    return x.contiguous()


# ---- model ------------------------------------------------------------------------------------------------------
class InternVLForConditionalGeneration(LlamaForCausalLM):
    """The decoder plus InternViT and the projector; the runner writes `encode_images`' rows over the image tokens'
    embeddings (`embed_input_ids`)."""

    is_multimodal = True

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, make_linear=plain_linear):
        super().__init__(spec, dtype, make_linear)
        vision: InternVision = spec.vision
        if vision is None:
            raise ModelLoadError("an InternVL model needs its vision spec resolved (engine.loader.read_model_spec)")
        self.vision = vision
        self.vision_tower = InternViT(vision, dtype)
        self.multi_modal_projector = InternVLProjector(vision, dtype)

    @property
    def vision_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in (self.vision_tower, self.multi_modal_projector)
                   for p in m.parameters())

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def check_items(self, mm_items) -> None:
        """Refuse, before the request runs, images whose size, token count and tiles disagree (a RequestInput
        built by hand); those from the prompter always agree."""
        v = self.vision
        for item in mm_items:
            if item.features is not None:
                if tuple(item.features.shape) != (item.length, self.spec.hidden_size):
                    raise InvalidImageError(f"image features of shape {tuple(item.features.shape)}, expected "
                                            f"({item.length}, {self.spec.hidden_size})")
                continue
            if item.image_size is None:
                raise InvalidImageError("an InternVL image item needs image_size (its height and width)")
            tiles = v.num_tiles(tuple(item.image_size))
            if tiles * v.tokens_per_tile != item.length:
                raise InvalidImageError(f"an image of {item.image_size[0]}x{item.image_size[1]} pixels has "
                                        f"{tiles * v.tokens_per_tile} tokens, the prompt holds {item.length}")
            shape = tuple(item.pixel_values.shape) if item.pixel_values is not None else None
            if shape != (tiles, v.num_channels, v.tile, v.tile):
                raise InvalidImageError(f"an image's tiles have shape {shape}, expected "
                                        f"({tiles}, {v.num_channels}, {v.tile}, {v.tile})")

    def encode_images(self, items) -> list[torch.Tensor]:
        """MultiModalItems -> their projected features, [item.length, hidden] each; every tile of every image runs
        through the tower in one batch."""
        weight = self.multi_modal_projector.linear_1.weight
        out: list[torch.Tensor | None] = [item.features for item in items]
        todo = [i for i, item in enumerate(items) if item.features is None]
        if todo:
            tiles = [items[i].pixel_values for i in todo]
            pixels = torch.cat(tiles).to(device=weight.device, dtype=weight.dtype)  # [num_tiles, 3, tile, tile]
            feats = self.vision_tower(pixels)[:, 1:]  # the CLS row dropped
            side = self.vision.patches_per_side
            feats = pixel_shuffle(feats.reshape(feats.shape[0], side, side, -1), self.vision.downsample)
            feats = self.multi_modal_projector(feats.reshape(feats.shape[0], -1, feats.shape[-1]))
            for i, f in zip(todo, feats.split([t.shape[0] for t in tiles])):
                out[i] = f.reshape(-1, f.shape[-1])
        for item, f in zip(items, out):
            if f.shape[0] != item.length:
                raise ValueError(f"an image gave {f.shape[0]} feature rows for {item.length} placeholder tokens")
        return [f.to(weight.dtype) for f in out]


def build(spec: ModelSpec, dtype: torch.dtype, make_linear=plain_linear) -> InternVLForConditionalGeneration:
    return InternVLForConditionalGeneration(spec, dtype, make_linear)


# ---- images -> tiles ------------------------------------------------------------------------------------------------
def hf_image_processor_class():
    """transformers' GotOcr2 image processor class (InternVL's), the PIL one where there is a choice (the default one
    needs torchvision in transformers >= 5)."""
    import transformers

    for name in ("GotOcr2ImageProcessorPil", "GotOcr2ImageProcessor"):
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ModelLoadError("transformers has no GotOcr2ImageProcessor (needed to prepare InternVL images)")


_NOT_SETTINGS = ("image_processor_type", "processor_class", "auto_map", "_processor_class")


class InternVLImageProcessor:
    """RGB PIL image -> (tiles [num_tiles, 3, tile, tile], its (height, width)), through transformers' GotOcr2 image
    processor with the folder's settings (-hf: preprocessor_config.json; original: config.json's tiling) and
    `crop_to_patches` on, as InternVLProcessor runs it."""

    image_wrap = (START_TOKEN, END_TOKEN)  # around each image's tokens (engine/vision_input.py)

    def __init__(self, vision: InternVision):
        self.vision = vision
        self.image_marker = CONTEXT_TOKEN if vision.layout == "hf" else "<image>"  # the chat template's image slot
        self.image_text = self.image_marker + "\n"
        settings = {"size": {"height": vision.tile, "width": vision.tile}, "image_mean": list(vision.image_mean),
                    "image_std": list(vision.image_std), "min_patches": vision.min_tiles,
                    "max_patches": vision.max_tiles}
        if vision.layout == "hf" and vision.processor_folder is not None:
            saved = _processor_settings(vision.processor_folder)
            settings.update({k: v for k, v in saved.items() if k not in _NOT_SETTINGS})
        settings["crop_to_patches"] = vision.crop
        try:
            self.hf = hf_image_processor_class()(**settings)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{vision.processor_folder}: the image processor could not be built "
                                 f"({type(e).__name__}: {e})") from e

    def num_features(self, image_size: tuple[int, int]) -> int:
        return self.vision.num_features(image_size)

    def __call__(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        size = (image.height, image.width)
        tiles = self.hf(images=image, return_tensors="pt")["pixel_values"]  # [num_tiles, 3, tile, tile]
        if not self.vision.thumbnail and tiles.shape[0] > 1:
            tiles = tiles[:-1]  # the processor always adds the thumbnail; this checkpoint was trained without it
        expected = self.vision.num_tiles(size)
        if tiles.shape[0] != expected:
            raise ValueError(f"the image processor cut {tiles.shape[0]} tiles, expected {expected}")
        return tiles.float().contiguous(), size


def image_processor(spec: ModelSpec) -> InternVLImageProcessor:
    return InternVLImageProcessor(spec.vision)


class _Multimodal:
    """The hooks the registry, the loader and the engine call (engine/models/spec.py's ModelEntry)."""

    complete_config = staticmethod(complete_config)
    resolve = staticmethod(resolve)
    extra_tensors = staticmethod(no_extra_tensors)
    image_processor = staticmethod(image_processor)
    image_marker = CONTEXT_TOKEN


ENTRY = ModelEntry("internvl", parse_spec, build, convert_tensor, ignored_prefixes=(), multimodal=_Multimodal())
