"""Qwen2.5-VL / Qwen2-VL at real shapes (random weights: `load_format=dummy`), one 1024x768 image, on one GPU, beside
transformers in the same run (its Qwen2_5_VLForConditionalGeneration, fp16, SDPA, random init):

    python benchmarks/bench_qwen_vl.py --shapes qwen2.5-vl-7b --configs fp16,awq --out benchmarks/results/

Per (shape, config): first-token time of a prompt with the image (vision tower + prefill; the image already turned
into patches on the host, for both), next to the floor (the tower's and the prefill's linear FLOPs at the measured
fp16 matmul rate) and transformers' time; batch-1 decode tok/s with the image in context against a text-only prompt
of the same length. The encoder and prefix caches are off, so every run encodes the image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, matmul_flops_per_s, save  # noqa: E402
from engine import EngineConfig, GenerationConfig, pipeline  # noqa: E402
from engine.inputs import RequestInput  # noqa: E402

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SHAPES = {
    "qwen2.5-vl-7b": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                          "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                          "tokens_per_second": 2, "temporal_patch_size": 2},
    },
    "qwen2-vl-7b": {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    },
}
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor"}


def make_folder(name: str, root: Path, awq: bool) -> Path:
    """config.json + a tokenizer with Qwen's vision tokens (their ids written into the config) + the hub's
    preprocessor_config.json: enough for pipeline(..., load_format='dummy')."""
    from studio.demo_model import build_tokenizer

    folder = root / (name + ("-awq" if awq else ""))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                               "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                               "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                               "<|im_start|>assistant\n")
    tokenizer.save_pretrained(str(folder))
    cfg = dict(SHAPES[name])
    ids = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    cfg.update(vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2], video_token_id=ids[3])
    if awq:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                      "version": "gemm", "modules_to_not_convert": ["visual", "lm_head"]}
        cfg["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return folder


def test_image(h: int = 768, w: int = 1024):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype("uint8"))


def linear_flops(spec, vision, num_tokens: int, num_patches: int) -> tuple[float, float]:
    """(tower, prefill) linear FLOPs: every matmul of the vision blocks, patch embedding and merger over the patches;
    the decoder's projections over the prompt (the lm_head on the last row)."""
    w, i, m = vision.width, vision.mlp_hidden, vision.merge_size**2
    mlp = 3 * w * i if vision.v25 else 2 * w * i
    tower = 2 * num_patches * (vision.patch_dim * w + vision.depth * (4 * w * w + mlp))
    tower += 2 * (num_patches // m) * ((m * w) ** 2 + m * w * vision.out_hidden)
    h, d = spec.hidden_size, spec.head_dim
    per_token = h * d * (2 * spec.num_heads + 2 * spec.num_kv_heads) + 3 * h * spec.intermediate_size
    prefill = 2 * num_tokens * spec.num_layers * per_token + 2 * h * spec.vocab_size
    return tower, prefill


def engine_run(pipe, request_input, max_new_tokens: int) -> tuple[float, float]:
    """(first-token seconds, decode tok/s after it) of one request."""
    times, done = [], threading.Event()

    def on_output(out):
        times.append((time.perf_counter(), len(out.token_ids)))
        if out.finished:
            done.set()

    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, ignore_eos=True)
    start = time.perf_counter()
    pipe.engine.add_request(request_input, gen, on_output)
    done.wait(600)
    first = times[0][0] - start
    tokens_after = sum(n for _, n in times) - times[0][1]
    decode = tokens_after / (times[-1][0] - times[0][0]) if tokens_after else float("nan")
    return first, decode


def measure_engine(folder: Path, reps: int):
    """One image prompt (test_image) through the engine on random weights: (request input, its image item,
    first-token seconds of `reps` fresh runs after a warm-up, decode tok/s with the image in context, decode tok/s
    of a text-only prompt of the same length, the model spec, its vision spec)."""
    pipe = pipeline(folder, EngineConfig(load_format="dummy", dtype="float16", enable_prefix_caching=False,
                                         encoder_cache_bytes=0, max_prefill_token_num=8192))
    try:
        request_input = pipe.prompt_input([{"role": "user", "content": [
            {"type": "image", "image": test_image()}, {"type": "text", "text": "Describe this image in detail."}]}])
        (item,) = request_input.mm_items
        text_only = RequestInput([5 + i % 900 for i in range(len(request_input.token_ids))])
        firsts, decodes, text_decodes = [], [], []
        for _ in range(2):  # warm-up (Triton compiles, allocator)
            engine_run(pipe, request_input, 4)
        for _ in range(reps):
            firsts.append(engine_run(pipe, request_input, 1)[0])
        for _ in range(3):
            decodes.append(engine_run(pipe, request_input, 256)[1])
            text_decodes.append(engine_run(pipe, text_only, 256)[1])
        spec, vision = pipe.engine.spec, pipe.engine.spec.vision
    finally:
        pipe.close()
    return request_input, item, firsts, decodes, text_decodes, spec, vision


def hf_first_token_s(folder: Path, request_input, reps: int) -> float:
    import transformers

    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    arch = cfg["architectures"][0]
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16 on the GPU directly (fp32 first would need twice the room)
    try:
        with torch.device("cuda"):
            model = getattr(transformers, arch)(config).eval()
    finally:
        torch.set_default_dtype(default)
    ids = torch.tensor([request_input.token_ids], device="cuda")
    patch = config.vision_config.patch_size
    items = request_input.mm_items
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=torch.cat([m.pixel_values for m in items]).cuda(),
                  image_grid_thw=torch.tensor([[1, m.image_size[0] // patch, m.image_size[1] // patch]
                                               for m in items], device="cuda"),
                  mm_token_type_ids=(ids == config.image_token_id).int())
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


def run(shape: str, config: str, root: Path, reps: int, rate: float) -> dict:
    awq = config == "awq"
    folder = make_folder(shape, root, awq)
    request_input, item, firsts, decodes, text_decodes, spec, vision = measure_engine(folder, reps)
    tower, prefill = linear_flops(spec, vision, len(request_input.token_ids), item.pixel_values.shape[0])
    floor = (tower + prefill) / rate
    ours = statistics.median(firsts)
    hf = hf_first_token_s(folder, request_input, reps)
    row = {"shape": shape, "config": config, "prompt tokens": len(request_input.token_ids),
           "patches": item.pixel_values.shape[0], "first token ms": ours * 1e3, "floor ms": floor * 1e3,
           "vision floor ms": tower / rate * 1e3, "x floor": ours / floor, "transformers fp16 ms": hf * 1e3,
           "speedup": hf / ours, "decode tok/s (image)": statistics.median(decodes),
           "decode tok/s (text)": statistics.median(text_decodes)}
    row["decode image/text"] = row["decode tok/s (image)"] / row["decode tok/s (text)"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen2.5-vl-7b")
    parser.add_argument("--configs", default="fp16,awq")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    rate = matmul_flops_per_s(dtype=torch.float16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            for config in args.configs.split(","):
                rows.append(run(shape, config, Path(tmp), args.reps, rate))
    columns = list(rows[0])
    save(args.out, "qwen_vl", {"fp16_matmul_flops_per_s": rate, "rows": rows},
         f"fp16 matmul rate {rate / 1e12:.0f} TFLOP/s\n\n" + markdown_table(rows, columns))


if __name__ == "__main__":
    main()
