"""Qwen2-VL and Qwen2.5-VL for the paged engine: the Qwen2 decoder of llama.py with M-RoPE, and the vision tower
(a ViT over 14x14 patches of two time steps, 2-D rotary positions, the 2x2 patch merger).

- Images keep their own size: the image processor (transformers' Qwen2VLImageProcessor, PIL flavour, built from
  the folder's preprocessor_config.json: min_pixels / max_pixels, patch and merge sizes) resizes each to multiples of
  patch * merge (28) pixels and flattens it into [num_patches, 3 * 2 * 14 * 14] patches, four per merged token.
  An item's `image_size` is that resized (height, width): the grid of patches follows from it, and so do the token
  count and the M-RoPE positions.
- The tower: full attention in every block (2-VL: LayerNorm, a GELU MLP), or window attention with full-attention
  blocks at `fullatt_block_indexes` (2.5-VL: RMSNorm, a SwiGLU MLP; tokens are reordered window by window and put
  back after the merger). Images of different sizes go through in one batch, unpadded: full attention runs image by
  image, window attention as one batch of all images' windows (padded to the largest, the padding masked).
- M-RoPE: the decoder's rotary frequencies are split by `mrope_section` over three position streams (time, height,
  width). Text tokens have the same position in all three; an image's tokens sit at (start, start + row, start +
  col), and the text after it continues from start + max(rows, cols). The runner gives prefill steps 3-row
  positions (`mrope_positions`), and decode steps one row: the token index + the sequence's `mrope_delta`, where all
  three streams agree, so decode uses the text models' path (CUDA graphs included).

Checkpoint spellings that load: the hub's (`model.*`, `visual.*`, `lm_head.*`) and transformers >= 4.52's
(`model.language_model.*`, `model.visual.*`); config.json flat (hub: text keys at the top, rope_scaling
{"type": "mrope", "mrope_section"}) or nested (transformers 5: `text_config` with rope_parameters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InvalidImageError, ModelLoadError, UnsupportedModelError
from engine.layers.rotary import RotaryEmbedding
from engine.models.llama import LlamaForCausalLM, plain_linear
from engine.models.spec import ModelEntry, ModelSpec, no_extra_tensors, parse_decoder_spec

ARCHS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
IMAGE_MARKER = "<|image_pad|>"
# transformers' defaults for the keys a hub vision_config may leave out (the 7B sizes)
VISION_DEFAULTS = {
    "Qwen2VLForConditionalGeneration": dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu",
                                            mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14,
                                            spatial_merge_size=2, temporal_patch_size=2),
    "Qwen2_5_VLForConditionalGeneration": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420,
                                               num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                                               temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                                               fullatt_block_indexes=[7, 15, 23, 31]),
}
_ACTS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "silu": F.silu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class QwenVision:
    """The vision half of a Qwen2(.5)-VL config."""

    v25: bool  # Qwen2.5-VL: window attention, RMSNorm, SwiGLU
    depth: int
    width: int  # the tower's hidden size
    num_heads: int
    mlp_hidden: int
    act: str
    out_hidden: int  # the language model's hidden size (the merger's output)
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    rope_theta: float
    window_size: int = 0  # 2.5: pixels per window side
    fullatt_blocks: tuple[int, ...] = ()
    mrope_section: tuple[int, ...] = ()
    image_token_id: int | None = None
    processor_folder: Path | None = None
    min_pixels: int = 56 * 56  # the image processor's, as preprocessor_config.json gives them
    max_pixels: int = 28 * 28 * 1280
    sizing = "native resolution"  # how the token count follows the image (the Chat tab's card)

    @property
    def family(self) -> str:
        return "Qwen2.5-VL" if self.v25 else "Qwen2-VL"

    @property
    def tower_name(self) -> str:
        return (f"{self.family} ViT/{self.patch_size} ({self.depth} layers, width {self.width}), "
                f"{self.min_pixels:,}–{self.max_pixels:,} pixels")

    @property
    def token_range(self) -> tuple[int, int]:
        """(fewest, most) tokens one image takes: min_pixels / max_pixels over one token's 28 x 28 pixels."""
        per_token = self.unit**2
        return max(1, -(-self.min_pixels // per_token)), max(1, self.max_pixels // per_token)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def unit(self) -> int:
        """Pixels per merged token side (28)."""
        return self.patch_size * self.merge_size

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of merged tokens of an image resized to image_size = (height, width) pixels."""
        return image_size[0] // self.unit, image_size[1] // self.unit

    def num_features(self, image_size: tuple[int, int]) -> int:
        rows, cols = self.grid(image_size)
        return rows * cols


# ---- config ---------------------------------------------------------------------------------------------------
def complete_config(cfg: dict) -> dict:
    """transformers 5 nests the text keys in `text_config`, the hub's files keep them at the top: both read the same
    (language_model_config merges the text part over the top). Top-level tie_word_embeddings wins, as in
    transformers (the nested text_config carries its own default)."""
    text = cfg.get("text_config")
    if text and "tie_word_embeddings" in cfg:
        cfg = {**cfg, "text_config": {**text, "tie_word_embeddings": cfg["tie_word_embeddings"]}}
    return cfg


def _mrope_section(cfg: dict) -> list[int] | None:
    for key in ("rope_parameters", "rope_scaling"):
        section = (cfg.get(key) or {}).get("mrope_section")
        if section:
            return [int(s) for s in section]
    return None


def parse_spec(text_cfg: dict, arch: str) -> ModelSpec:
    cfg = dict(text_cfg)
    scaling = dict(cfg.get("rope_scaling") or {})
    scaling.pop("mrope_section", None)
    if scaling.get("rope_type", scaling.get("type", "default")) in ("mrope", "default"):
        cfg["rope_scaling"] = None
    else:
        raise UnsupportedModelError(f"{arch}: rope_scaling {scaling} is not supported with M-RoPE")
    params = dict(cfg.get("rope_parameters") or {})
    if params.get("rope_type", "default") not in ("default", "mrope"):
        raise UnsupportedModelError(f"{arch}: rope_parameters {params} are not supported with M-RoPE")
    params.pop("mrope_section", None)
    params["rope_type"] = "default"
    cfg["rope_parameters"] = params
    spec = parse_decoder_spec(cfg, "Qwen2ForCausalLM", family="qwen2_vl")  # Qwen2: q/k/v bias
    spec.architecture = arch
    return spec


def resolve(spec: ModelSpec, path: Path, vision_tower: str | None = None) -> QwenVision:
    if vision_tower:
        raise ModelLoadError(f"{spec.architecture} keeps its vision tower in the model folder; --vision-tower is for "
                             "original-layout LLaVA checkpoints")
    raw, arch = spec.raw, spec.architecture
    v = {**VISION_DEFAULTS[arch], **(raw.get("vision_config") or {})}
    v25 = arch == "Qwen2_5_VLForConditionalGeneration"
    text = {**raw, **(raw.get("text_config") or {})}
    section = _mrope_section(text) or [16, 24, 24]
    if sum(section) != spec.head_dim // 2:
        raise ModelLoadError(f"{path}: mrope_section {section} must sum to head_dim / 2 = {spec.head_dim // 2}")
    act = v.get("hidden_act", "silu")
    if act not in _ACTS:
        raise UnsupportedModelError(f"{path}: vision activation {act!r} is not supported ({', '.join(_ACTS)})")
    width = int(v["hidden_size"] if v25 else v["embed_dim"])
    out_hidden = int(v["out_hidden_size"] if v25 else v["hidden_size"])
    if out_hidden != spec.hidden_size:
        raise ModelLoadError(f"{path}: the vision merger's output ({out_hidden}) differs from the language model's "
                             f"hidden size ({spec.hidden_size})")
    vision = QwenVision(
        v25=v25, depth=int(v["depth"]), width=width, num_heads=int(v["num_heads"]),
        mlp_hidden=int(v["intermediate_size"]) if v25 else int(width * v["mlp_ratio"]), act=act,
        out_hidden=out_hidden, patch_size=int(v["patch_size"]), temporal_patch_size=int(v["temporal_patch_size"]),
        merge_size=int(v["spatial_merge_size"]), in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        window_size=int(v.get("window_size", 0)) if v25 else 0,
        fullatt_blocks=tuple(int(i) for i in v.get("fullatt_block_indexes", ())) if v25 else (),
        mrope_section=tuple(section), image_token_id=raw.get("image_token_id"), processor_folder=path,
        **_pixel_bounds(path))
    if v25 and (vision.window_size % vision.unit or vision.window_size < vision.unit):
        raise UnsupportedModelError(f"{path}: window_size {vision.window_size} is not a multiple of {vision.unit}")
    return vision


def _pixel_bounds(path: Path) -> dict:
    """min_pixels / max_pixels of the folder's preprocessor_config.json (hub: top-level keys; transformers 5:
    size.shortest_edge / size.longest_edge); transformers' defaults where it has none."""
    file = path / "preprocessor_config.json"
    saved = json.loads(file.read_text()) if file.is_file() else {}
    size = saved.get("size") or {}
    out = {}
    for key, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        value = saved.get(key, size.get(size_key))
        if value is not None:
            out[key] = int(value)
    return out


# ---- tensor names -----------------------------------------------------------------------------------------------
_CONTAINERS = (("model.language_model.", "model."), ("model.visual.", "visual."))
# the tower's SwiGLU names would collide with the decoder's fused gate_up shards (loader's packed_modules_mapping)
_VISION_MLP = ((".mlp.gate_proj.", ".mlp.gate."), (".mlp.up_proj.", ".mlp.up."), (".mlp.down_proj.", ".mlp.down."))


def convert_tensor(name: str, tensor: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    for old, new in _CONTAINERS:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if name.startswith("visual."):
        if name == "visual.patch_embed.proj.weight":  # Conv3d with kernel == stride: a linear over flat patches
            return [(name, tensor.reshape(tensor.shape[0], -1))]
        for old, new in _VISION_MLP:
            name = name.replace(old, new)
    return [(name, tensor)]


# ---- vision tower -------------------------------------------------------------------------------------------------
class _RMSNorm(nn.Module):
    def __init__(self, dim: int, dtype, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _norm(vision: QwenVision, dim: int, dtype) -> nn.Module:
    return _RMSNorm(dim, dtype) if vision.v25 else nn.LayerNorm(dim, eps=1e-6, dtype=dtype)


def _linear(i: int, o: int, dtype, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(i, o, bias=bias, dtype=dtype)
    layer.requires_grad_(False)
    return layer


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, vision: QwenVision, dtype):
        super().__init__()
        self.num_heads, self.head_dim = vision.num_heads, vision.width // vision.num_heads
        self.qkv = _linear(vision.width, 3 * vision.width, dtype)
        self.proj = _linear(vision.width, vision.width, dtype)

    def forward(self, x, cos, sin, segments):
        """segments: [(lo, hi), ...] rows attending among themselves (one image each), or Windows."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x.dtype)
        if isinstance(segments, Windows):  # all windows of all images as one padded batch
            w = segments
            q, k, v = (t[w.index].transpose(1, 2) for t in (q, k, v))  # [windows, heads, size, head_dim]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=w.key_mask)
            out = out.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)[w.valid]
        else:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, n, head_dim]
            out = torch.empty_like(q)
            for lo, hi in segments:  # one image at a time
                out[:, lo:hi] = F.scaled_dot_product_attention(q[None, :, lo:hi], k[None, :, lo:hi],
                                                               v[None, :, lo:hi])[0]  # 4-D: the flash kernel
            out = out.transpose(0, 1)
        return self.proj(out.reshape(n, -1))


@dataclass
class Windows:
    """2.5-VL's window attention as one batch: window i holds rows index[i] (padded to the largest window by
    repeating its first row), key_mask [windows, 1, 1, size] hides the padding, valid picks the real rows back out
    (windows are contiguous and in row order, so they come back in place)."""

    index: torch.Tensor
    key_mask: torch.Tensor | None
    valid: torch.Tensor

    @staticmethod
    def of(sizes: list[int], device) -> Windows:
        size = max(sizes)
        lengths = torch.tensor(sizes)
        starts = torch.cumsum(lengths, 0) - lengths
        slot = torch.arange(size)
        valid = slot[None, :] < lengths[:, None]  # [windows, size]
        index = starts[:, None] + torch.where(valid, slot[None, :], 0)
        mask = None if bool(valid.all()) else valid[:, None, None, :].to(device)
        return Windows(index.to(device), mask, valid.reshape(-1).to(device))


class VisionMLP(nn.Module):
    def __init__(self, vision: QwenVision, dtype):
        super().__init__()
        self.act = _ACTS[vision.act]
        self.swiglu = vision.v25
        if self.swiglu:
            self.gate = _linear(vision.width, vision.mlp_hidden, dtype)
            self.up = _linear(vision.width, vision.mlp_hidden, dtype)
            self.down = _linear(vision.mlp_hidden, vision.width, dtype)
        else:
            self.fc1 = _linear(vision.width, vision.mlp_hidden, dtype)
            self.fc2 = _linear(vision.mlp_hidden, vision.width, dtype)

    def forward(self, x):
        if self.swiglu:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, vision: QwenVision, dtype):
        super().__init__()
        self.norm1 = _norm(vision, vision.width, dtype)
        self.norm2 = _norm(vision, vision.width, dtype)
        self.attn = VisionAttention(vision, dtype)
        self.mlp = VisionMLP(vision, dtype)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, vision: QwenVision, dtype):
        super().__init__()
        self.proj = _linear(vision.patch_dim, vision.width, dtype, bias=False)  # the checkpoint's Conv3d, flattened

    def forward(self, patches):
        return self.proj(patches)


class PatchMerger(nn.Module):
    def __init__(self, vision: QwenVision, dtype):
        super().__init__()
        self.hidden = vision.width * vision.merge_size**2
        self.ln_q = _norm(vision, vision.width, dtype)
        self.mlp = nn.Sequential(_linear(self.hidden, self.hidden, dtype), nn.GELU(),
                                 _linear(self.hidden, vision.out_hidden, dtype))

    def forward(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.hidden))


def window_order(rows: int, cols: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """2.5-VL: the merged tokens of a rows x cols grid, window by window (row-major windows of window x window
    tokens, clipped at the edges), and each window's token count."""
    grid = torch.arange(rows * cols).view(rows, cols)
    order, sizes = [], []
    for r in range(0, rows, window):
        for c in range(0, cols, window):
            block = grid[r : r + window, c : c + window].reshape(-1)
            order.append(block)
            sizes.append(block.numel())
    return torch.cat(order), sizes


class QwenVisionTower(nn.Module):
    def __init__(self, vision: QwenVision, dtype):
        super().__init__()
        self.vision = vision
        self.patch_embed = PatchEmbed(vision, dtype)
        self.blocks = nn.ModuleList(VisionBlock(vision, dtype) for _ in range(vision.depth))
        self.merger = PatchMerger(vision, dtype)
        head_dim = vision.width // vision.num_heads
        rot = head_dim // 2  # half of the head rotates with the row, half with the column
        self.register_buffer("inv_freq", 1.0 / (vision.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float)
                                                                       / rot)), persistent=False)

    def _positions(self, rows: int, cols: int) -> torch.Tensor:
        """[num_patches, 2] (row, col) of each patch, in the processor's order: merge groups of m x m patches."""
        m = self.vision.merge_size
        r = torch.arange(rows * m).view(-1, 1).expand(-1, cols * m)
        c = torch.arange(cols * m).view(1, -1).expand(rows * m, -1)
        def grouped(t):
            return t.reshape(rows, m, cols, m).transpose(1, 2).reshape(-1)
        return torch.stack([grouped(r), grouped(c)], dim=-1)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """patches [sum of num_patches, patch_dim] of images whose merged grids are `grids` ((rows, cols) each) ->
        merged features [sum of rows * cols, out_hidden], image by image in the processor's token order."""
        v, device = self.vision, patches.device
        unit = v.merge_size**2
        x = self.patch_embed(patches)
        pos = torch.cat([self._positions(r, c) for r, c in grids]).to(device)
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [n, head_dim / 2]: rows' then columns'
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [n, 1, head_dim]
        full, window_sizes, order, offset = [], [], [], 0
        for rows, cols in grids:
            n = rows * cols * unit
            full.append((offset, offset + n))
            if v.v25:
                tokens, sizes = window_order(rows, cols, v.window_size // v.unit)
                order.append(tokens + offset // unit)
                window_sizes += [size * unit for size in sizes]
            offset += n
        windows = Windows.of(window_sizes, device) if v.v25 else None
        if v.v25:  # reorder the patches window by window (four patches of a merged token stay together)
            token_order = torch.cat(order).to(device)
            patch_order = (token_order[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
            x, emb = x[patch_order], emb[patch_order]
        cos, sin = emb.cos(), emb.sin()
        for i, block in enumerate(self.blocks):
            segments = windows if v.v25 and i not in v.fullatt_blocks else full
            x = block(x, cos, sin, segments)
        out = self.merger(x)
        if v.v25:
            out = out[torch.argsort(token_order)]
        return out


# ---- model ------------------------------------------------------------------------------------------------------
class MRotaryEmbedding(RotaryEmbedding):
    """The decoder's rotary tables, looked up with 1-row positions (text, decode) as usual, or with 3-row positions
    [3, num_tokens] (t, h, w), each frequency taking its stream's position (mrope_section)."""

    def __init__(self, head_dim: int, max_position: int, theta: float, section: tuple[int, ...]):
        super().__init__(head_dim, max_position, theta, None)
        stream = torch.repeat_interleave(torch.arange(len(section)), torch.tensor(section))
        self.register_buffer("stream", stream, persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return self.cos[positions], self.sin[positions]
        index = self.stream.view(1, 1, -1).expand(1, positions.shape[1], -1)
        cos = self.cos[positions].gather(0, index)[0]  # [num_tokens, head_dim / 2]
        sin = self.sin[positions].gather(0, index)[0]
        return cos, sin


def mrope_delta(vision: QwenVision, mm_items) -> int:
    """Rope position minus token index for the text after all of a prompt's images."""
    delta = 0
    for item in mm_items:
        rows, cols = _item_grid(vision, item)
        delta += max(rows, cols) - item.length
    return delta


def _item_grid(vision: QwenVision, item) -> tuple[int, int]:
    if item.image_size is None:
        raise ValueError("a Qwen2-VL image item needs image_size (its resized height and width)")
    rows, cols = vision.grid(item.image_size)
    if rows * cols != item.length:
        raise ValueError(f"an image of {item.image_size[0]}x{item.image_size[1]} pixels has {rows * cols} tokens, "
                         f"the prompt holds {item.length}")
    return rows, cols


def mrope_positions(vision: QwenVision, mm_items, start: int, stop: int) -> torch.Tensor:
    """[3, stop - start] (t, h, w) rope positions of a prompt's tokens [start, stop)."""
    out = torch.arange(start, stop).view(1, -1).repeat(3, 1)
    shift = 0  # rope position - token index, for text after the images seen so far
    for item in mm_items:
        if item.offset >= stop:
            break
        rows, cols = _item_grid(vision, item)
        lo, hi = max(start, item.offset), min(stop, item.end)
        if lo < hi:  # the image's own tokens: (start, start + row, start + col)
            local = torch.arange(lo - item.offset, hi - item.offset)
            base = item.offset + shift
            out[0, lo - start : hi - start] = base
            out[1, lo - start : hi - start] = base + local // cols
            out[2, lo - start : hi - start] = base + local % cols
        step = max(rows, cols) - item.length
        shift += step
        after = max(item.end, start)
        if after < stop:  # the text after it continues from start + max(rows, cols)
            out[:, after - start :] += step
    return out


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    """The Qwen2 decoder with M-RoPE plus the vision tower (`visual`); the runner writes `encode_images`' rows over
    the image tokens' embeddings and gives prefill steps 3-row positions (`uses_mrope`)."""

    is_multimodal = True
    uses_mrope = True

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, make_linear=plain_linear):
        super().__init__(spec, dtype, make_linear)
        vision: QwenVision = spec.vision
        if vision is None:
            raise ModelLoadError("a Qwen2-VL model needs its vision spec resolved (engine.loader.read_model_spec)")
        self.vision = vision
        self.model.rotary = MRotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta,
                                             vision.mrope_section)
        self.visual = QwenVisionTower(vision, dtype)

    @property
    def vision_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.visual.parameters())

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def mrope_positions(self, mm_items, start: int, stop: int) -> torch.Tensor:
        return mrope_positions(self.vision, mm_items, start, stop)

    def mrope_delta(self, mm_items) -> int:
        return mrope_delta(self.vision, mm_items)

    def check_items(self, mm_items) -> None:
        """Refuse, before the request runs, images whose size, token count and patches disagree (a RequestInput
        built by hand); those from the prompter always agree."""
        unit = self.vision.merge_size**2
        for item in mm_items:
            try:
                rows, cols = _item_grid(self.vision, item)
            except ValueError as e:
                raise InvalidImageError(str(e)) from None
            if item.pixel_values is not None and tuple(item.pixel_values.shape) != (rows * cols * unit,
                                                                                    self.vision.patch_dim):
                raise InvalidImageError(f"an image's patches have shape {tuple(item.pixel_values.shape)}, expected "
                                        f"({rows * cols * unit}, {self.vision.patch_dim})")
            if item.features is not None and item.features.shape[-1] != self.spec.hidden_size:
                raise InvalidImageError(f"image features of width {item.features.shape[-1]}, expected "
                                        f"{self.spec.hidden_size}")

    def encode_images(self, items) -> list[torch.Tensor]:
        """MultiModalItems -> their merged features, [item.length, hidden] each; all images in one tower pass."""
        weight = self.visual.patch_embed.proj.weight
        out: list[torch.Tensor | None] = [item.features for item in items]
        todo = [i for i, item in enumerate(items) if item.features is None]
        if todo:
            grids = [_item_grid(self.vision, items[i]) for i in todo]
            unit = self.vision.merge_size**2
            for i, (rows, cols) in zip(todo, grids):
                shape = tuple(items[i].pixel_values.shape)
                if shape != (rows * cols * unit, self.vision.patch_dim):
                    raise ValueError(f"an image's patches have shape {shape}, expected "
                                     f"({rows * cols * unit}, {self.vision.patch_dim})")
            patches = torch.cat([items[i].pixel_values for i in todo]).to(device=weight.device, dtype=weight.dtype)
            feats = self.visual(patches, grids)
            for i, f in zip(todo, feats.split([r * c for r, c in grids])):
                out[i] = f
        for item, f in zip(items, out):
            if f.shape[0] != item.length:
                raise ValueError(f"an image gave {f.shape[0]} feature rows for {item.length} placeholder tokens")
        return [f.to(weight.dtype) for f in out]


def build(spec: ModelSpec, dtype: torch.dtype, make_linear=plain_linear) -> Qwen2VLForConditionalGeneration:
    return Qwen2VLForConditionalGeneration(spec, dtype, make_linear)


# ---- images -> patches ------------------------------------------------------------------------------------------
def hf_image_processor_class():
    """transformers' Qwen2-VL image processor class (2.5-VL uses the same), the PIL one where there is a choice (the
    default one needs torchvision in transformers >= 5)."""
    import transformers

    for name in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor"):
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ModelLoadError("transformers has no Qwen2VLImageProcessor (needed to prepare images)")


_NOT_SETTINGS = ("image_processor_type", "processor_class", "auto_map", "_processor_class")


class QwenImageProcessor:
    """RGB PIL image -> (patches [num_patches, 3 * 2 * 14 * 14], resized (height, width)), through transformers'
    image processor built from the folder's preprocessor_config.json (min_pixels / max_pixels as saved)."""

    image_marker = IMAGE_MARKER  # the chat template's image slot (engine/vision_input.py expands it)
    image_text = "<|vision_start|>" + IMAGE_MARKER + "<|vision_end|>"  # an image in a prompt without the template

    def __init__(self, vision: QwenVision):
        self.vision = vision
        settings = {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
                    "merge_size": vision.merge_size}
        folder = vision.processor_folder
        if folder is not None and (folder / "preprocessor_config.json").is_file():
            saved = json.loads((folder / "preprocessor_config.json").read_text())
            settings.update({k: v for k, v in saved.items() if k not in _NOT_SETTINGS})
        try:
            self.hf = hf_image_processor_class()(**settings)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{folder}: the image processor could not be built ({type(e).__name__}: {e})") from e
        sizes = (int(self.hf.patch_size), int(self.hf.temporal_patch_size), int(self.hf.merge_size))
        if sizes != (vision.patch_size, vision.temporal_patch_size, vision.merge_size):
            raise ModelLoadError(f"{folder}: preprocessor_config.json's patch / temporal / merge sizes {sizes} differ "
                                 f"from the vision config's")

    def num_features(self, image_size: tuple[int, int]) -> int:
        return self.vision.num_features(image_size)

    def __call__(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        out = self.hf(images=image, return_tensors="pt")
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        if t != 1:
            raise ValueError(f"an image gave {t} time steps")
        p = self.vision.patch_size
        return out["pixel_values"].float().contiguous(), (h * p, w * p)


def image_processor(spec: ModelSpec) -> QwenImageProcessor:
    return QwenImageProcessor(spec.vision)


class _Multimodal:
    """The hooks the registry, the loader and the engine call (engine/models/spec.py's ModelEntry)."""

    complete_config = staticmethod(complete_config)
    resolve = staticmethod(resolve)
    extra_tensors = staticmethod(no_extra_tensors)
    image_processor = staticmethod(image_processor)
    image_marker = IMAGE_MARKER


ENTRY = ModelEntry("qwen2_vl", parse_spec, build, convert_tensor, ignored_prefixes=(), multimodal=_Multimodal())

