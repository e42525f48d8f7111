"""Tiny InternVL checkpoints with random weights, for the tests: the transformers layout (`-hf`,
InternVLForConditionalGeneration, built with transformers' own classes, so `from_pretrained(path)` is the reference)
and the original remote-code layout (InternVLChatModel: `vision_model.*`, `mlp1.*`, `language_model.*`, an
original-style config.json with `llm_config`) written from the same weights.

Sizes: 112-pixel tiles of 14-pixel patches (8 x 8 per tile; pixel shuffle 0.5 -> 16 tokens per tile), at most 6
tiles plus the thumbnail. The tokenizer is the local byte-level BPE (studio.demo_model) plus `<img>`, `</img>` and
`<IMG_CONTEXT>`; its chat template is the -hf checkpoints' (`<IMG_CONTEXT>\\n` per image part; the processor wraps
each in `<img>`...`</img>`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from studio.demo_model import build_tokenizer, special_token_ids
from tests.llava_factory import init_weights_

IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]
# the -hf checkpoints' chat template (transformers' conversion script writes it: no default system turn)
INTERNVL_HF_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, rms_norm_eps=1e-6)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=112,
              patch_size=14, attention_bias=True, hidden_act="gelu", norm_type="layer_norm", layer_norm_eps=1e-6)
TILE = 112
TOKENS_PER_TILE = 16
MAX_PATCHES = 6
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def internvl_tokenizer(chat_template: str | None = INTERNVL_HF_TEMPLATE):
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
    tokenizer.chat_template = chat_template
    return tokenizer


def image_processor(max_patches: int = MAX_PATCHES):
    """As the -hf checkpoints save it: crop_to_patches false (InternVLProcessor's default turns it on)."""
    from engine.models.internvl import hf_image_processor_class

    return hf_image_processor_class()(size={"height": TILE, "width": TILE}, crop_to_patches=False, min_patches=1,
                                      max_patches=max_patches, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def make_internvl(path, *, seed: int = 0, tie: bool = False, text_model: str = "qwen2",
                  max_patches: int = MAX_PATCHES) -> Path:
    """An InternVL -hf folder (InternVLForConditionalGeneration) with a Qwen2 (or Llama) decoder."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = internvl_tokenizer()
    ids = special_token_ids(tokenizer)
    text = dict(TEXT, model_type=text_model, vocab_size=len(tokenizer), bos_token_id=ids["bos_token_id"],
                eos_token_id=ids["im_end_token_id"], pad_token_id=ids["pad_token_id"], tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    config = InternVLConfig(text_config=text, vision_config=dict(VISION), downsample_ratio=0.5,
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            image_seq_length=TOKENS_PER_TILE, projector_hidden_act="gelu", vision_feature_layer=-1,
                            vision_feature_select_strategy="default", tie_word_embeddings=tie)
    model = InternVLForConditionalGeneration(config).to(torch.float32)
    init_weights_(model, seed)
    if tie:
        model.tie_weights()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    image_processor(max_patches).save_pretrained(str(path))
    return path


def hf_model(path: Path):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                            attn_implementation="eager").eval()


# ---- the original layout ----------------------------------------------------------------------------------------
_TOWER = (  # -hf tower name piece -> original InternViT's
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("encoder.layer.", "encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.q_norm.", ".attn.q_norm."),
    (".attention.k_norm.", ".attn.k_norm."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
)
_PROJECTOR = {"layer_norm": "mlp1.0", "linear_1": "mlp1.1", "linear_2": "mlp1.3"}


def v5_spelling(name: str) -> str:
    """The names as saved (`language_model.model.*`, `language_model.lm_head`, `vision_tower.*`,
    `multi_modal_projector.*`) -> transformers 5's in-memory ones (`model.language_model.*`, `lm_head`,
    `model.vision_tower.*`, `model.multi_modal_projector.*`)."""
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + name
    return name


def original_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """-hf tensors (either spelling of v5_spelling) -> the
    original layout's (vision_model.* with fused attn.qkv, mlp1.0/1/3, language_model.model.* /
    language_model.lm_head)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        name = v5_spelling(name)
        if name.startswith("model.vision_tower."):
            rest = name[len("model.vision_tower."):]
            for old, new in _TOWER:
                rest = rest.replace(old, new)
            for part in ("q_proj", "k_proj", "v_proj"):
                if f".attention.{part}." in rest:
                    key = rest.replace(f".attention.{part}.", ".attn.qkv.")
                    qkv.setdefault(key, {})[part] = t
                    break
            else:
                out["vision_model." + rest] = t
        elif name.startswith("model.multi_modal_projector."):
            module, suffix = name[len("model.multi_modal_projector."):].split(".", 1)
            out[f"{_PROJECTOR[module]}.{suffix}"] = t
        elif name.startswith("model.language_model."):
            out["language_model.model." + name[len("model.language_model."):]] = t
        elif name == "lm_head.weight":
            out["language_model.lm_head.weight"] = t
        else:
            raise AssertionError(f"unexpected tensor {name}")
    for key, parts in qkv.items():
        out["vision_model." + key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def make_original_layout(hf_path: Path, path: Path, *, template: str = "internvl2_5") -> Path:
    """The remote-code InternVLChatModel layout of a -hf folder's weights: config.json with `llm_config`, the
    tensors renamed, the tokenizer without a chat template (the conversation template comes from `template`)."""
    path = Path(path)
    path.mkdir(parents=True)
    cfg = json.loads((hf_path / "config.json").read_text())
    tensors = load_file(str(hf_path / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in original_names(tensors).items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    text, vision = cfg["text_config"], cfg["vision_config"]
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    llm = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size",
                                "bos_token_id", "eos_token_id", "pad_token_id")}
    llm.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rope_theta=1e6,
               rope_scaling=None, tie_word_embeddings=bool(cfg.get("tie_word_embeddings")), torch_dtype=dtype)
    original = {  # the keys OpenGVLab/InternVL2_5-*'s config.json has
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": TILE, "max_dynamic_patch":
        MAX_PATCHES, "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1, "template": template,
        "use_thumbnail": True, "torch_dtype": dtype, "use_backbone_lora": 0, "use_llm_lora": 0,
        "llm_config": llm,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "hidden_size": vision["hidden_size"], "intermediate_size": vision["intermediate_size"],
            "num_hidden_layers": vision["num_hidden_layers"], "num_attention_heads": vision["num_attention_heads"],
            "image_size": TILE, "patch_size": 14, "num_channels": 3, "qkv_bias": True, "qk_normalization": False,
            "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu", "drop_path_rate": 0.0,
            "initializer_factor": 1.0, "use_flash_attn": False},
    }
    (path / "config.json").write_text(json.dumps(original, indent=2) + "\n")
    tokenizer = internvl_tokenizer(chat_template=None)
    tokenizer.save_pretrained(str(path))
    return path


def with_internlm2_decoder(orig: Path) -> Path:
    """An original-layout folder made from a Llama-decoder -hf one, rewritten as InternVL2_5-8B has it: an InternLM2
    decoder (tok_embeddings, packed attention.wqkv, feed_forward.w1/w3/w2, output) and its llm_config, the
    internlm2-chat template."""
    from engine.models.internlm2 import llama_to_internlm2_name, merge_wqkv

    cfg = json.loads((orig / "config.json").read_text())
    cfg["template"] = "internlm2-chat"
    cfg["llm_config"].update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False,
                             auto_map={"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    (orig / "config.json").write_text(json.dumps(cfg, indent=2))
    out, qkv = {}, {}
    for name, t in load_file(str(orig / "model.safetensors")).items():
        if not name.startswith("language_model."):
            out[name] = t
            continue
        rest = name[len("language_model."):]
        for p in ("q_proj", "k_proj", "v_proj"):
            if f".self_attn.{p}." in rest:
                qkv.setdefault(rest.replace(f".self_attn.{p}.", ".attention.wqkv."), {})[p] = t
                break
        else:
            out["language_model." + llama_to_internlm2_name(rest)] = t
    for name, parts in qkv.items():
        out["language_model." + name] = merge_wqkv(parts["q_proj"], parts["k_proj"], parts["v_proj"],
                                                   TEXT["num_attention_heads"], TEXT["num_key_value_heads"])
    save_file(out, str(orig / "model.safetensors"), metadata={"format": "pt"})
    return orig
