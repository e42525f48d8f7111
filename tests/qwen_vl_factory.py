"""Tiny Qwen2-VL and Qwen2.5-VL checkpoints with random weights, for the tests, built with transformers' own classes
(so `Qwen2VLForConditionalGeneration.from_pretrained(path)` is the reference): config.json as transformers 5 writes
it (a nested `text_config`) or flattened as the hub checkpoints are (`flat=True`), the weights, the tokenizer (the
local byte-level BPE of studio.demo_model plus Qwen's vision tokens, with a Qwen2-VL-style chat template) and the
image processor's preprocessor_config.json (small min_pixels / max_pixels, so test images give a few tokens).

Sizes: patch 14, merge 2 (an image is resized to multiples of 28 pixels, one token per 28x28), vision window 56
pixels (2x2 merged tokens per window, so a 3-token-wide image has a padded window), head_dim 16 with
mrope_section [2, 3, 3].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from studio.demo_model import build_tokenizer, special_token_ids
from tests.llava_factory import init_weights_

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template, in short: a default system turn, image parts as <|vision_start|><|image_pad|><|vision_end|>
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, rms_norm_eps=1e-6)
MROPE_SECTION = [2, 3, 3]  # head_dim 16: 8 rotary frequencies split over (t, h, w)
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 20  # 4 to 20 image tokens


def qwen_vl_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    return tokenizer


def image_processor():
    from engine.models.qwen2_vl import hf_image_processor_class

    return hf_image_processor_class()(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14,
                                      temporal_patch_size=2, merge_size=2)


def make_qwen_vl(path, *, v25: bool = True, flat: bool = False, tie: bool = False, seed: int = 0,
                 rope_theta: float = 1e6) -> Path:
    """A Qwen2.5-VL (v25) or Qwen2-VL folder. flat: config.json in the hub's flat spelling (text keys at the top)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_vl_tokenizer()
    ids = special_token_ids(tokenizer)
    token = {name: tokenizer.convert_tokens_to_ids(t) for name, t in
             (("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
              ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    text = dict(TEXT, vocab_size=len(tokenizer), bos_token_id=ids["bos_token_id"], eos_token_id=ids["im_end_token_id"],
                pad_token_id=ids["pad_token_id"], tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": MROPE_SECTION})
    if v25:
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=TEXT["hidden_size"],
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1], hidden_act="silu")
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **token)
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **token)
        model = Qwen2VLForConditionalGeneration(config)
    model = model.to(torch.float32)
    init_weights_(model, seed)
    if tie:
        model.tie_weights()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    image_processor().save_pretrained(str(path))
    if flat:
        flatten_config(path)
    return path


def flatten_config(path: Path) -> None:
    """Rewrite config.json the way hub checkpoints spell it: the text keys at the top, rope_scaling with type mrope."""
    cfg = json.loads((path / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters", None) or {}
    flat = {**{k: v for k, v in text.items() if k not in ("architectures", "model_type", "dtype")}, **cfg}
    flat["rope_theta"] = rope.get("rope_theta", 1e6)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope.get("mrope_section", MROPE_SECTION)}
    flat["torch_dtype"] = flat.pop("dtype", "float32")
    (path / "config.json").write_text(json.dumps(flat, indent=2) + "\n")


def hf_model(path: Path, v25: bool = True):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2_5_VLForConditionalGeneration if v25 else Qwen2VLForConditionalGeneration
    return cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
