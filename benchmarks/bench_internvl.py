"""InternVL3-8B (-hf layout) at real shape (random weights: `load_format=dummy`), one 1024x768 image (13 tiles of
448 px: 12 + the thumbnail, 3,328 image tokens), on one GPU, beside transformers in the same run (its
InternVLForConditionalGeneration, fp16, SDPA, random init):

    python benchmarks/bench_internvl.py --configs fp16,awq --out benchmarks/results/

Per config: first-token time of a prompt with the image (InternViT over the tiles + pixel shuffle + projector +
prefill; the image already cut into tiles on the host, for both), next to the floor (the tower's, projector's and
prefill's linear FLOPs at the fp16 matmul rate measured in the run) and transformers' time; batch-1 decode tok/s
with the image in context against a text-only prompt of the same length. The encoder and prefix caches are off, so
every run encodes the image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_qwen_vl import measure_engine  # noqa: E402
from benchmarks.common import markdown_table, matmul_flops_per_s, save  # noqa: E402

IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]
INTERNVL3_8B = {  # OpenGVLab/InternVL3-8B-hf's config.json
    "architectures": ["InternVLForConditionalGeneration"], "downsample_ratio": 0.5, "image_seq_length": 256,
    "model_type": "internvl", "projector_hidden_act": "gelu", "torch_dtype": "bfloat16", "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
    "text_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 3584,
                    "intermediate_size": 18944, "max_position_embeddings": 32768, "model_type": "qwen2",
                    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
                    "rope_theta": 1e6, "vocab_size": 151674, "tie_word_embeddings": False},
    "vision_config": {"attention_bias": True, "hidden_act": "gelu", "hidden_size": 1024, "image_size": [448, 448],
                      "intermediate_size": 4096, "layer_norm_eps": 1e-6, "layer_scale_init_value": 0.1,
                      "model_type": "internvl_vision", "norm_type": "layer_norm", "num_attention_heads": 16,
                      "num_channels": 3, "num_hidden_layers": 24, "patch_size": [14, 14], "use_mean_pooling": True,
                      "use_qk_norm": False},
}
PREPROCESSOR = {"crop_to_patches": False, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
                "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                "max_patches": 12, "min_patches": 1, "resample": 3, "rescale_factor": 1 / 255,
                "size": {"height": 448, "width": 448}, "image_processor_type": "GotOcr2ImageProcessor"}


def make_folder(root: Path, awq: bool) -> Path:
    """config.json + a tokenizer with InternVL's image tokens (the placeholder's id in the config) + the -hf
    preprocessor_config.json: enough for pipeline(..., load_format='dummy')."""
    from studio.demo_model import build_tokenizer

    folder = root / ("internvl3-8b" + ("-awq" if awq else ""))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                               "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}"
                               "{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    tokenizer.save_pretrained(str(folder))
    cfg = json.loads(json.dumps(INTERNVL3_8B))
    cfg["image_token_id"] = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if awq:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                      "version": "gemm",
                                      "modules_to_not_convert": ["lm_head", "multi_modal_projector", "vision_tower"]}
        cfg["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return folder


def linear_flops(spec, vision, num_tokens: int, num_tiles: int) -> tuple[float, float]:
    """(vision, prefill) linear FLOPs: InternViT's patch embedding and blocks over every tile's 1 + 1,024 positions
    and the projector over its 256 shuffled rows; the decoder's projections over the prompt (lm_head on the last
    row)."""
    w, i, p = vision.width, vision.mlp_hidden, vision.patch_size
    positions = vision.patches_per_side**2 + 1
    tower = 2 * num_tiles * ((positions - 1) * vision.num_channels * p * p * w
                             + positions * vision.layers_run * (4 * w * w + 2 * w * i))
    merged = w * int(1 / vision.downsample) ** 2
    tower += 2 * num_tiles * vision.tokens_per_tile * (merged * vision.text_hidden + vision.text_hidden**2)
    h, d = spec.hidden_size, spec.head_dim
    per_token = h * d * (2 * spec.num_heads + 2 * spec.num_kv_heads) + 3 * h * spec.intermediate_size
    prefill = 2 * num_tokens * spec.num_layers * per_token + 2 * h * spec.vocab_size
    return tower, prefill


def hf_first_token_s(folder: Path, request_input, reps: int) -> float:
    import time

    import transformers

    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "sdpa"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16 on the GPU directly
    try:
        with torch.device("cuda"):
            model = transformers.InternVLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    ids = torch.tensor([request_input.token_ids], device="cuda")
    pixels = torch.cat([m.pixel_values for m in request_input.mm_items]).to("cuda", torch.float16)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    times = []
    with torch.no_grad():
        for _ in range(reps + 2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    del model
    torch.cuda.empty_cache()
    return statistics.median(times[2:])


def run(config: str, root: Path, reps: int, rate: float) -> dict:
    folder = make_folder(root, config == "awq")
    request_input, item, firsts, decodes, text_decodes, spec, vision = measure_engine(folder, reps)
    tiles = item.pixel_values.shape[0]
    tower, prefill = linear_flops(spec, vision, len(request_input.token_ids), tiles)
    floor = (tower + prefill) / rate
    ours = statistics.median(firsts)
    hf = hf_first_token_s(folder, request_input, reps)
    row = {"shape": "internvl3-8b", "config": config, "prompt tokens": len(request_input.token_ids), "tiles": tiles,
           "first token ms": ours * 1e3, "floor ms": floor * 1e3, "vision floor ms": tower / rate * 1e3,
           "x floor": ours / floor, "transformers fp16 ms": hf * 1e3, "speedup": hf / ours,
           "decode tok/s (image)": statistics.median(decodes), "decode tok/s (text)": statistics.median(text_decodes)}
    row["decode image/text"] = row["decode tok/s (image)"] / row["decode tok/s (text)"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="fp16,awq")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    rate = matmul_flops_per_s(dtype=torch.float16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            rows.append(run(config, Path(tmp), args.reps, rate))
    save(args.out, "internvl", {"fp16_matmul_flops_per_s": rate, "rows": rows},
         f"fp16 matmul rate {rate / 1e12:.0f} TFLOP/s\n\n" + markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
