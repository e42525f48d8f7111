"""Tiny LLaVA checkpoints with random weights, for the tests: llava-hf folders (LLaVA-1.5 and LLaVA-NeXT, built with
transformers' own classes, so `LlavaForConditionalGeneration.from_pretrained(path)` is the reference), and the
original liuhaotian layout (LlavaLlamaForCausalLM config, `model.mm_projector.0/.2`, the CLIP tower in a separate
folder) written from the same weights.

The tokenizer is the local byte-level BPE (studio.demo_model) plus `<image>` as an added special token; its chat
template is llava-hf's (a list of image / text parts per message). Weights are drawn at unit activation scale so
a mix-up shows in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from studio.demo_model import build_tokenizer, special_token_ids

IMAGE_TOKEN = "<image>"
# llava-1.5-7b-hf's chat template (images of a message first, then its text)
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, rms_norm_eps=1e-5)
LLAVA15_IMAGE_SIZE = 56  # 4 x 4 patches: 16 features per image
NEXT_IMAGE_SIZE = 28  # 2 x 2 patches per tile
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]


def llava_tokenizer(chat_template: str | None = LLAVA_HF_TEMPLATE):
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = chat_template
    return tokenizer


@torch.no_grad()
def init_weights_(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name.endswith(".bias"):
            values = torch.randn(p.shape, generator=gen) * 0.2
        elif "norm" in name:
            values = torch.rand(p.shape, generator=gen) + 0.5
        elif p.dim() == 2 and "embed" in name:
            values = torch.randn(p.shape, generator=gen)
        elif p.dim() >= 2:
            values = torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5
        else:  # class_embedding, image_newline
            values = torch.randn(p.shape, generator=gen)
        p.copy_(values)


def _configs(tokenizer, image_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig

    ids = special_token_ids(tokenizer)
    vision = CLIPVisionConfig(image_size=image_size, **VISION)
    text = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                       pad_token_id=ids["pad_token_id"], tie_word_embeddings=False, dtype="float32", **TEXT)
    return vision, text


def make_llava(path, *, next_: bool = False, seed: int = 0) -> Path:
    """A llava-hf folder: LlavaForConditionalGeneration (1.5) or LlavaNextForConditionalGeneration (next_)."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    from engine.models.llava import hf_image_processor_class

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = llava_tokenizer()
    image_size = NEXT_IMAGE_SIZE if next_ else LLAVA15_IMAGE_SIZE
    vision, text = _configs(tokenizer, image_size)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    common = dict(vision_config=vision, text_config=text, image_token_index=image_token, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    if next_:
        config = LlavaNextConfig(image_grid_pinpoints=NEXT_PINPOINTS, **common)
        model = LlavaNextForConditionalGeneration(config)
        processor = hf_image_processor_class(True)(size=size, crop_size=crop, image_grid_pinpoints=NEXT_PINPOINTS)
    else:
        config = LlavaConfig(**common)
        model = LlavaForConditionalGeneration(config)
        processor = hf_image_processor_class(False)(size=size, crop_size=crop)
    model = model.to(torch.float32)
    init_weights_(model, seed)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def rename_checkpoint(src: Path, dst: Path, rename) -> Path:
    """A copy of a folder whose tensors are renamed by `rename(name) -> name` (other files as they are)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def hub_spelling(name: str) -> str:
    """transformers 4 / llava-hf hub names: the tower under `vision_tower.vision_model.`."""
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def v5_spelling(name: str) -> str:
    """transformers 5's in-memory names: model.language_model.*, model.vision_tower.*, lm_head."""
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    if name.startswith(("vision_tower.", "multi_modal_projector.", "image_newline")):
        return "model." + name
    return name


def make_original_layout(hf_path: Path, path: Path, *, embed_tower: bool = False, tower_name: str | None = None,
                         chat_template: str | None = None) -> tuple[Path, Path]:
    """The liuhaotian layout of a LLaVA-1.5 llava-hf folder's weights: `path/llava` (LlavaLlamaForCausalLM config,
    model.* / lm_head / model.mm_projector.0/.2) and `path/clip` (the CLIP tower, as transformers 5 saves
    CLIPVisionModel: no `vision_model.` prefix). mm_vision_tower names the CLIP folder (or `tower_name`).
    embed_tower: the tower's weights also go into the LLaVA folder (model.vision_tower.vision_tower.vision_model.*).
    Returns (llava folder, clip folder)."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionConfig

    from engine.models.llava import hf_image_processor_class

    path = Path(path)
    llava_dir, clip_dir = path / "llava", path / "clip"
    llava_dir.mkdir(parents=True)
    clip_dir.mkdir(parents=True)
    cfg = json.loads((hf_path / "config.json").read_text())
    tensors = load_file(str(hf_path / "model.safetensors"))
    lm, tower = {}, {}
    for name, t in tensors.items():
        if name.startswith("language_model.model."):
            lm["model." + name[len("language_model.model."):]] = t
        elif name == "language_model.lm_head.weight":
            lm["lm_head.weight"] = t
        elif name.startswith("multi_modal_projector.linear_1."):
            lm["model.mm_projector.0." + name.rsplit(".", 1)[1]] = t
        elif name.startswith("multi_modal_projector.linear_2."):
            lm["model.mm_projector.2." + name.rsplit(".", 1)[1]] = t
        elif name.startswith("vision_tower."):
            rest = name[len("vision_tower."):]
            tower[rest.removeprefix("vision_model.")] = t
            if embed_tower:
                lm["model.vision_tower.vision_tower.vision_model." + rest.removeprefix("vision_model.")] = t
    save_file({k: v.contiguous() for k, v in lm.items()}, str(llava_dir / "model.safetensors"),
              metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in tower.items()}, str(clip_dir / "model.safetensors"),
              metadata={"format": "pt"})
    vision_cfg = CLIPVisionConfig(**{k: cfg["vision_config"][k] for k in ("image_size", *VISION)})
    vision_cfg.architectures = ["CLIPVisionModel"]
    vision_cfg.save_pretrained(str(clip_dir))
    size = cfg["vision_config"]["image_size"]
    hf_image_processor_class(False)(size={"shortest_edge": size}, crop_size={"height": size, "width": size}
                                    ).save_pretrained(str(clip_dir))
    text = cfg["text_config"]
    original = {  # the keys llava-v1.5-7b's config.json has
        **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size",
                                "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")},
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu",
        "rope_theta": 10000.0, "rope_scaling": None, "torch_dtype": "float32",
        "image_aspect_ratio": "pad", "mm_hidden_size": cfg["vision_config"]["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": tower_name or str(clip_dir), "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
    }
    (llava_dir / "config.json").write_text(json.dumps(original, indent=2) + "\n")
    tokenizer = build_tokenizer()  # the original layout's tokenizer has no <image> token
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(llava_dir))
    return llava_dir, clip_dir
