"""LLaVA-1.5 and LLaVA-NeXT (1.6) for the paged engine: the Llama-family decoder of llama.py (Llama / Mistral /
Qwen2 text configs), a CLIP vision tower (clip.py), the projector (linear_1, act, linear_2) and, for NeXT, the
anyres tiling with unpadding and the learned image_newline.

Checkpoint layouts that load:
- llava-hf (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`), tower inside the folder, in
  any of transformers' spellings: `language_model.model.*` / `language_model.lm_head.*` /
  `vision_tower.vision_model.*` / `multi_modal_projector.*` / `image_newline` (hub, transformers 4),
  `vision_tower.*` without `vision_model.` (as transformers 5 saves it), and `model.language_model.*` /
  `model.vision_tower.*` / `model.multi_modal_projector.*` / `model.image_newline` / `lm_head.*`.
- the original liuhaotian layout (`LlavaLlamaForCausalLM`, `LlavaMistralForCausalLM`): a Llama config plus
  `mm_*` keys, `model.mm_projector.0/.2` (mlp2x_gelu) or `model.mm_projector` (linear), `model.image_newline`
  (1.6), and the tower in a separate CLIP checkpoint named by `mm_vision_tower` (a hub id or a folder;
  `EngineConfig.vision_tower` / `--vision-tower PATH` points at a downloaded one). A tower saved inside the
  folder (`model.vision_tower.vision_tower.*`) is used when present.

An image's feature count (its placeholder tokens) is fixed by its size before the model runs
(`LlavaImageProcessor.num_features`); `encode_images` produces exactly that many rows, the way transformers'
modeling_llava(_next) does: select layer, drop CLS ("default") or keep it ("full"), project, and for NeXT split
the tiles, put them back on their grid, cut the padding, add image_newline at the end of each row.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine import checkpoint
from engine.errors import ModelLoadError, UnsupportedModelError
from engine.layers.linear import Linear
from engine.models.clip import CLIPVisionSpec, CLIPVisionTower
from engine.models.llama import LlamaForCausalLM, plain_linear
from engine.models.spec import ModelEntry, ModelSpec, parse_decoder_spec
from engine.vision.preprocess import PreprocessConfig, best_grid

HF_ARCHS = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
ORIGINAL_ARCHS = {"LlavaLlamaForCausalLM": "LlamaForCausalLM", "LlavaMistralForCausalLM": "MistralForCausalLM"}
TEXT_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
IMAGE_MARKER = "<image>"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The towers original-layout checkpoints name, so a folder that embeds its tower loads without the CLIP folder
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14),
}
_ACTS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


# ---- geometry (transformers' image_processing_utils / modeling_llava_next, rewritten) --------------------------
def select_best_resolution(original_size: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) of the grid pinpoints that keeps most of the image's pixels, then wastes least."""
    return best_grid(*original_size, pinpoints)


def unpadded_shape(original_size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """The feature grid (rows, cols) left once the padding that letterboxed the image into height x width is cut."""
    orig_h, orig_w = original_size
    if orig_w / orig_h > width / height:
        new_h = int(round(orig_h * (width / orig_w), 7))
        height -= 2 * ((height - new_h) // 2)
    else:
        new_w = int(round(orig_w * (height / orig_h), 7))
        width -= 2 * ((width - new_w) // 2)
    return height, width


@dataclass
class LlavaVision:
    """The vision half of a LLaVA checkpoint, resolved (tower found, its config read)."""

    layout: str  # "hf" (llava-hf) or "original" (liuhaotian)
    clip: CLIPVisionSpec
    feature_layers: list[int]
    select_strategy: str  # "default": drop the CLS row; "full": keep it
    projector_layers: int  # 2: linear_1, act, linear_2 (mlp2x_gelu); 1: linear (LLaVA v1)
    projector_act: str
    projector_bias: bool
    text_hidden: int
    anyres: bool  # NeXT / 1.6 tiling with unpadding and image_newline
    grid_pinpoints: list[tuple[int, int]] = field(default_factory=list)
    pad_to_square: bool = False  # original 1.5: image_aspect_ratio "pad"
    image_token_id: int | None = None  # llava-hf: the tokenizer's <image> id; original: None (a placeholder id)
    tower_folder: Path | None = None  # a separate CLIP checkpoint; None: the tower's weights are in the model folder
    processor_folder: Path | None = None  # where preprocessor_config.json is looked for

    @property
    def layers_run(self) -> int:
        return max(i if i >= 0 else self.clip.num_layers + 1 + i for i in self.feature_layers)

    @property
    def patches_per_side(self) -> int:
        return self.clip.image_size // self.clip.patch_size

    @property
    def rows_per_tile(self) -> int:
        return self.patches_per_side**2 + (1 if self.select_strategy == "full" else 0)

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        if not self.anyres:
            return 1
        h, w = select_best_resolution(image_size, self.grid_pinpoints)
        tile = self.clip.image_size
        return -(-h // tile) * -(-w // tile) + 1  # the grid plus the base (whole-image) tile

    def num_features(self, image_size: tuple[int, int]) -> int:
        """Placeholder tokens (feature rows) of one image of (height, width) pixels."""
        if not self.anyres:
            return self.rows_per_tile
        side = self.patches_per_side
        h, w = select_best_resolution(image_size, self.grid_pinpoints)
        rows, cols = unpadded_shape(image_size, side * (h // self.clip.image_size), side * (w // self.clip.image_size))
        return side * side + rows * (cols + 1)


# ---- config ---------------------------------------------------------------------------------------------------
def complete_config(cfg: dict) -> dict:
    """llava-hf config.json files are partial (transformers fills the rest from its defaults): fill them the same
    way, keeping every value the file has. Original-layout configs are complete Llama configs: kept as they are."""
    archs = cfg.get("architectures") or []
    if not any(a in HF_ARCHS for a in archs):
        return cfg
    try:
        from transformers import LlavaConfig, LlavaNextConfig

        config_class = LlavaNextConfig if "LlavaNextForConditionalGeneration" in archs else LlavaConfig
        full = config_class(**json.loads(json.dumps(cfg))).to_dict()
    except Exception:  # noqa: BLE001 - an old transformers, or a config it rejects: parse what the file has
        return cfg
    out = {**full, **{k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}}
    for part in ("text_config", "vision_config"):
        out[part] = {**(full.get(part) or {}), **(cfg.get(part) or {})}
    return out


def parse_spec(text_cfg: dict, arch: str) -> ModelSpec:
    if arch in ORIGINAL_ARCHS:
        text_arch = ORIGINAL_ARCHS[arch]
    else:
        model_type = text_cfg.get("model_type", "llama")
        text_arch = TEXT_ARCHS.get(model_type)
        if text_arch is None:
            raise UnsupportedModelError(f"{arch} with a {model_type!r} language model is not supported "
                                        f"(supported: {', '.join(TEXT_ARCHS)})")
    spec = parse_decoder_spec(text_cfg, text_arch, family="llava")
    spec.architecture = arch
    return spec


def _pinpoints(value) -> list[tuple[int, int]]:
    if isinstance(value, str):
        value = ast.literal_eval(value)
    return [(int(h), int(w)) for h, w in value or []]


def _clip_config(folder: Path) -> dict:
    cfg = checkpoint.read_config(folder)
    if cfg.get("model_type") not in (None, "clip", "clip_vision_model") and "vision_config" not in cfg:
        raise UnsupportedModelError(f"{folder}: the vision tower is a {cfg.get('model_type')!r} model; only CLIP "
                                    "towers are supported")
    return cfg


def _tower_missing(path: Path, source: str, reason: str, arch: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: this LLaVA checkpoint ({arch}, the original layout) keeps its vision tower in a separate CLIP "
        f"checkpoint: config.json names mm_vision_tower = {source!r}, {reason}. Download that checkpoint "
        f"(e.g. `huggingface-cli download {source} --local-dir clip-tower`) and pass its folder with "
        "--vision-tower PATH (EngineConfig(vision_tower=PATH), or pipeline(MODEL, vision_tower=PATH))")


def find_tower(path: Path, source: str, arch: str, override: bool, need_weights: bool = True) -> Path:
    """The folder of a separate CLIP checkpoint: the override as given, else mm_vision_tower as a folder (absolute
    or inside the model folder) or a hub id (downloaded when the hub is reachable). need_weights=False: a folder
    with the tower's config.json is enough (its weights are inside the model folder)."""
    if override:
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file() or not checkpoint.checkpoint_files(folder):
            if checkpoint.is_hub_id(source) and not folder.exists():
                return checkpoint.resolve_model_path(source)
            raise ModelLoadError(f"vision tower {source!r} is not a CLIP checkpoint folder (it needs config.json "
                                 "and *.safetensors or *.bin weights)")
        return folder
    for folder in (Path(source).expanduser(), path / source, path / Path(source).name):
        if (folder / "config.json").is_file() and (not need_weights or checkpoint.checkpoint_files(folder)):
            return folder
    if not checkpoint.is_hub_id(source):
        raise _tower_missing(path, source, "which is not a checkpoint folder here", arch)
    try:
        return checkpoint.resolve_model_path(source)
    except ModelLoadError as e:
        raise _tower_missing(path, source, f"which is not a local folder and could not be fetched from the hub "
                                           f"({e})", arch) from None


def _checkpoint_has(path: Path, prefix: str) -> bool:
    for index in (path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json"):
        if index.is_file():
            return any(k.startswith(prefix) for k in json.loads(index.read_text()).get("weight_map", {}))
    files = checkpoint.checkpoint_files(path)
    if not files:
        return False  # no weights (load_format="dummy", or the loader's own check says so)
    if files[0].suffix == ".safetensors":
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                if any(k.startswith(prefix) for k in fh.keys()):
                    return True
        return False
    return any(name.startswith(prefix) for name, _ in checkpoint.iter_checkpoint(path))


def resolve(spec: ModelSpec, path: Path, vision_tower: str | None = None) -> LlavaVision:
    """Read the vision half of the config and find the tower's weights; errors name what is missing."""
    raw, arch = spec.raw, spec.architecture
    tower_folder = find_tower(path, vision_tower, arch, override=True) if vision_tower else None
    if arch in HF_ARCHS:
        vcfg = _clip_config(tower_folder) if tower_folder else raw.get("vision_config") or {}
        if vcfg.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise UnsupportedModelError(f"{path}: the vision tower is {vcfg.get('model_type')!r}; only CLIP "
                                        "towers are supported")
        layers = raw.get("vision_feature_layer", -2)
        fields = dict(
            layout="hf", select_strategy=raw.get("vision_feature_select_strategy", "default"), projector_layers=2,
            projector_act=raw.get("projector_hidden_act", "gelu"),
            projector_bias=bool(raw.get("multimodal_projector_bias", True)),
            anyres=arch == "LlavaNextForConditionalGeneration",
            grid_pinpoints=_pinpoints(raw.get("image_grid_pinpoints")),
            image_token_id=raw.get("image_token_id", raw.get("image_token_index")), processor_folder=path)
    else:
        source = raw.get("mm_vision_tower") or raw.get("vision_tower")
        if not source and not tower_folder:
            raise ModelLoadError(f"{path}: {arch} config.json names no mm_vision_tower; pass --vision-tower PATH")
        if raw.get("mm_use_im_start_end"):
            raise UnsupportedModelError(f"{path}: mm_use_im_start_end checkpoints are not supported")
        projector = raw.get("mm_projector_type", "linear")
        if projector not in ("linear", "mlp2x_gelu"):
            raise UnsupportedModelError(f"{path}: mm_projector_type {projector!r} is not supported "
                                        "(linear, mlp2x_gelu are)")
        aspect = str(raw.get("image_aspect_ratio", "square"))
        anyres = aspect.startswith("anyres")
        if anyres and raw.get("mm_patch_merge_type", "flat") != "spatial_unpad":
            raise UnsupportedModelError(f"{path}: anyres with mm_patch_merge_type "
                                        f"{raw.get('mm_patch_merge_type')!r} is not supported (spatial_unpad is)")
        select = raw.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise UnsupportedModelError(f"{path}: mm_vision_select_feature {select!r} is not supported")
        embedded = tower_folder is None and _checkpoint_has(path, "model.vision_tower.")
        config_folder = tower_folder
        if config_folder is None and not (embedded and source in KNOWN_TOWERS):
            config_folder = find_tower(path, source, arch, override=False, need_weights=not embedded)
        vcfg = _clip_config(config_folder) if config_folder else dict(KNOWN_TOWERS[source])
        tower_folder = None if embedded else config_folder  # None: the weights are in the model folder
        layers = raw.get("mm_vision_select_layer", -2)
        fields = dict(
            layout="original", select_strategy="default" if select == "patch" else "full",
            projector_layers=1 if projector == "linear" else 2, projector_act="gelu", projector_bias=True,
            anyres=anyres, pad_to_square=aspect == "pad", image_token_id=None,
            # LLaVA's own code reads the pinpoints as (width, height), transformers as (height, width): the set is
            # symmetric, but ties between a grid and its transpose go to the first listed, so keep LLaVA's order
            grid_pinpoints=[(w, h) for h, w in _pinpoints(raw.get("image_grid_pinpoints"))],
            processor_folder=config_folder or path)
    vision = LlavaVision(clip=CLIPVisionSpec.from_config(vcfg), text_hidden=spec.hidden_size,
                         feature_layers=list(layers) if isinstance(layers, list) else [layers],
                         tower_folder=tower_folder, **fields)
    _check(vision, path)
    return vision


def _check(vision: LlavaVision, path: Path) -> None:
    if vision.select_strategy not in ("default", "full"):
        raise UnsupportedModelError(f"{path}: vision_feature_select_strategy {vision.select_strategy!r} is not "
                                    "supported")
    if vision.projector_act not in _ACTS:
        raise UnsupportedModelError(f"{path}: projector activation {vision.projector_act!r} is not supported")
    if not vision.anyres:
        return
    size = vision.clip.image_size
    if vision.select_strategy != "default":
        raise UnsupportedModelError(f"{path}: LLaVA-NeXT with the 'full' feature strategy is not supported")
    if not vision.grid_pinpoints:
        raise ModelLoadError(f"{path}: an anyres LLaVA config needs image_grid_pinpoints")
    if any(h % size or w % size for h, w in vision.grid_pinpoints):
        raise UnsupportedModelError(f"{path}: image_grid_pinpoints must be multiples of the tower's image size {size}")


# ---- tensor names ---------------------------------------------------------------------------------------------
_CONTAINERS = (
    ("model.vision_tower.vision_tower.", "vision_tower."),  # original layout, tower saved inside
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.mm_projector.", "mm_projector."),
    ("model.language_model.", "model."),
    ("model.image_newline", "image_newline"),
)
_PROJECTOR = {  # original layout: nn.Sequential(Linear, GELU, Linear), or one Linear
    "mm_projector.0.": "multi_modal_projector.linear_1.",
    "mm_projector.2.": "multi_modal_projector.linear_2.",
    "mm_projector.": "multi_modal_projector.linear_1.",
}
_TOWER_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def _tower_tensor(rest: str, tensor, vision: LlavaVision) -> list[tuple[str, torch.Tensor]]:
    """A CLIP tensor name without its container (`vision_model.X` or `X`) -> the module's name, or nothing for the
    parts the tower does not build (deeper layers, post_layernorm, the text half of a CLIPModel)."""
    if not rest.startswith("vision_model."):
        if not rest.startswith(_TOWER_PARTS):
            return []  # text_model.*, visual_projection, text_projection, logit_scale
        rest = "vision_model." + rest
    if "position_ids" in rest or rest.startswith("vision_model.post_layernorm"):
        return []
    if rest.startswith("vision_model.encoder.layers.") and int(rest.split(".")[3]) >= vision.layers_run:
        return []
    return [(f"vision_tower.{rest}", tensor)]


def convert_tensor(name: str, tensor: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """Any of the spellings above -> this module's names (the loader has already cut a leading
    `language_model.`)."""
    vision: LlavaVision = spec.vision
    for old, new in _CONTAINERS:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if name == "image_newline":
        return [("image_newline.weight", tensor)]
    if name.startswith("mm_projector."):
        for old, new in _PROJECTOR.items():
            if name.startswith(old):
                return [(new + name[len(old):], tensor)]
    if name.startswith("vision_tower."):
        if vision.tower_folder is not None:
            return []  # the tower comes from the separate checkpoint
        return _tower_tensor(name[len("vision_tower."):], tensor, vision)
    return [(name, tensor)]


def extra_tensors(spec: ModelSpec):
    """The separate tower checkpoint's tensors, in the module's names."""
    vision: LlavaVision = spec.vision
    if vision.tower_folder is None:
        return
    for name, tensor in checkpoint.iter_checkpoint(vision.tower_folder):
        yield from _tower_tensor(name, tensor, vision)


# ---- module ---------------------------------------------------------------------------------------------------
class ImageNewline(nn.Module):
    """NeXT's learned end-of-row vector (a top-level parameter in the checkpoint, held here as `.weight`)."""

    def __init__(self, hidden: int, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden, dtype=dtype), requires_grad=False)


class LlavaProjector(nn.Module):
    def __init__(self, vision: LlavaVision, dtype):
        super().__init__()
        in_features = vision.clip.hidden_size * len(vision.feature_layers)
        self.act = _ACTS[vision.projector_act]
        self.linear_1 = Linear(in_features, vision.text_hidden, vision.projector_bias, dtype)
        self.linear_2 = (Linear(vision.text_hidden, vision.text_hidden, vision.projector_bias, dtype)
                         if vision.projector_layers == 2 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.linear_1.weight, self.linear_1.bias)
        if self.linear_2 is None:
            return x
        return F.linear(self.act(x), self.linear_2.weight, self.linear_2.bias)


class LlavaForConditionalGeneration(LlamaForCausalLM):
    """The Llama-family decoder plus the vision tower and projector; the runner writes `encode_images`' rows over
    the placeholder tokens' embeddings (`embed_input_ids`) and passes them as inputs_embeds."""

    is_multimodal = True

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, make_linear=plain_linear):
        super().__init__(spec, dtype, make_linear)
        vision: LlavaVision = spec.vision
        if vision is None:
            raise ModelLoadError("a LLaVA model needs its vision spec resolved (engine.loader.read_model_spec)")
        self.vision = vision
        self.vision_tower = CLIPVisionTower(vision.clip, vision.feature_layers, dtype)
        self.multi_modal_projector = LlavaProjector(vision, dtype)
        self.image_newline = ImageNewline(spec.hidden_size, dtype) if vision.anyres else None

    @property
    def vision_bytes(self) -> int:
        parts = [self.vision_tower, self.multi_modal_projector] + ([self.image_newline] if self.anyres else [])
        return sum(p.numel() * p.element_size() for m in parts for p in m.parameters())

    @property
    def anyres(self) -> bool:
        return self.vision.anyres

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [num_tokens, hidden]

    def encode_images(self, items) -> list[torch.Tensor]:
        """MultiModalItems -> their projected features, [item.length, hidden] each; every tile of every image runs
        through the tower in one batch."""
        weight = self.multi_modal_projector.linear_1.weight
        out: list[torch.Tensor | None] = [item.features for item in items]
        todo = [i for i, item in enumerate(items) if item.features is None]
        if todo:
            tiles = [items[i].pixel_values if items[i].pixel_values.dim() == 4 else items[i].pixel_values[None]
                     for i in todo]
            if weight.is_cuda:  # pixels prepared on an image worker's stream: keep their memory until this one is done
                for t in tiles:
                    if t.is_cuda:
                        t.record_stream(torch.cuda.current_stream(weight.device))
            pixels = torch.cat(tiles).to(device=weight.device, dtype=weight.dtype)  # [num_tiles, 3, H, W]
            feats = self.vision_tower(pixels)  # [num_tiles, num_positions, h * num_layers]
            if self.vision.select_strategy == "default":
                feats = feats[:, 1:]
            feats = self.multi_modal_projector(feats)  # [num_tiles, rows_per_tile, hidden]
            for i, f in zip(todo, feats.split([t.shape[0] for t in tiles])):
                out[i] = self._pack(f, items[i].image_size) if self.anyres else f.reshape(-1, f.shape[-1])
        for item, f in zip(items, out):
            if f.shape[0] != item.length:
                raise ValueError(f"an image gave {f.shape[0]} feature rows for {item.length} placeholder tokens")
        return [f.to(weight.dtype) for f in out]

    def _pack(self, feats: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """NeXT: [num_tiles, side * side, hidden] (base tile first) -> [num_features, hidden]: the base tile's rows,
        then the grid's rows with the padding cut, each row ended by image_newline."""
        side, tile = self.vision.patches_per_side, self.vision.clip.image_size
        h, w = select_best_resolution(tuple(image_size), self.vision.grid_pinpoints)
        grid_h, grid_w = h // tile, w // tile
        base, grid = feats[0], feats[1:]
        hidden = grid.shape[-1]
        grid = grid.reshape(grid_h, grid_w, side, side, hidden).permute(4, 0, 2, 1, 3)  # [hid, gh, side, gw, side]
        grid = grid.reshape(hidden, grid_h * side, grid_w * side)
        rows, cols = unpadded_shape(tuple(image_size), grid_h * side, grid_w * side)
        top, left = (grid.shape[1] - rows) // 2, (grid.shape[2] - cols) // 2
        grid = grid[:, top : top + rows, left : left + cols]
        newline = self.image_newline.weight.to(grid.dtype)[:, None, None].expand(hidden, rows, 1)
        grid = torch.cat([grid, newline], dim=-1)  # [hidden, rows, cols + 1]
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)], dim=0)


def build(spec: ModelSpec, dtype: torch.dtype, make_linear=plain_linear) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration(spec, dtype, make_linear)


# ---- images -> pixels ---------------------------------------------------------------------------------------------
def hf_image_processor_class(anyres: bool):
    """transformers' image processor class for LLaVA (NeXT: anyres), the PIL one where there is a choice."""
    import transformers

    names = ("LlavaNextImageProcessorPil", "LlavaNextImageProcessor") if anyres else (
        "CLIPImageProcessorPil", "CLIPImageProcessor")
    for name in names:  # the PIL ones first: the default ones need torchvision in transformers >= 5
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ModelLoadError(f"transformers has no {names[-1]} (needed to prepare images)")


class LlavaImageProcessor:
    """RGB PIL image -> (pixel_values [3, H, W] or anyres tiles [num_tiles, 3, H, W], (height, width)), through
    transformers' image processor built from the checkpoint's preprocessor_config.json (or the tower's defaults);
    `num_features` gives the placeholder count of an image of a given size."""

    def __init__(self, vision: LlavaVision):
        self.vision = vision
        cls = hf_image_processor_class(vision.anyres)
        size = vision.clip.image_size
        settings = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
                    "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}
        folder = vision.processor_folder
        if folder is not None and (folder / "preprocessor_config.json").is_file():
            saved = json.loads((folder / "preprocessor_config.json").read_text())
            settings = {k: v for k, v in saved.items() if k not in ("image_processor_type", "processor_class",
                                                                    "auto_map", "_processor_class")}
        if vision.anyres:
            settings["image_grid_pinpoints"] = [list(p) for p in vision.grid_pinpoints]
        try:
            self.hf = cls(**settings)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{folder}: the image processor could not be built ({type(e).__name__}: {e})") from e
        self.image_mean = tuple(getattr(self.hf, "image_mean", None) or OPENAI_CLIP_MEAN)

    def num_features(self, image_size: tuple[int, int]) -> int:
        return self.vision.num_features(image_size)

    def torch_config(self) -> PreprocessConfig:
        """The same preprocessing as tensor ops (engine/vision/preprocess.py), for the GPU."""
        fill = tuple(int(x * 255) for x in self.image_mean) if self.vision.pad_to_square else None
        pinpoints = (getattr(self.hf, "image_grid_pinpoints", None) or []) if self.vision.anyres else []
        return PreprocessConfig.from_hf(self.hf, pinpoints, fill)

    def __call__(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.vision.pad_to_square and image.width != image.height:
            image = self._expand_to_square(image)
        size = (image.height, image.width)
        pixels = self.hf(image, return_tensors="pt")["pixel_values"]  # [1, 3, H, W] or [1, tiles, 3, H, W]
        if self.vision.anyres:
            pixels = pixels[0, : self.vision.num_tiles(size)]
        else:
            pixels = pixels[0]
        return pixels.float().contiguous(), size

    def _expand_to_square(self, image):
        """Original LLaVA-1.5's image_aspect_ratio "pad": centre the image on a square of the mean colour."""
        from PIL import Image

        side = max(image.width, image.height)
        fill = tuple(int(x * 255) for x in self.image_mean)
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return square


def image_processor(spec: ModelSpec) -> LlavaImageProcessor:
    return LlavaImageProcessor(spec.vision)


class _Multimodal:
    """The hooks the registry, the loader and the engine call for LLaVA (engine/models/spec.py's ModelEntry)."""

    complete_config = staticmethod(complete_config)
    resolve = staticmethod(resolve)
    extra_tensors = staticmethod(extra_tensors)
    image_processor = staticmethod(image_processor)
    image_marker = IMAGE_MARKER


ENTRY = ModelEntry("llava", parse_spec, build, convert_tensor, ignored_prefixes=(), multimodal=_Multimodal())
