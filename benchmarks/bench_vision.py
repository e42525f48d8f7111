"""Image chat benchmarks at real LLaVA shapes with random weights, on one GPU: what a user meets.

    python benchmarks/bench_vision.py --shapes llava-1.5-7b,llava-next-7b --configs fp16,awq --out results/

Per (shape, config), with a fresh 640x480 photo-sized image (a PIL image through `pipe((text, image))`, 1 new token):
- first-token time (median of 5 fresh images) next to the floor: the vision tower's and the LM prefill's
  linear-layer FLOPs at the bf16 matmul rate measured in the same run; and where it goes: preprocessing alone
  (`pipe.prompt_input`), the tower + projector alone, a text-only prompt of the same length;
- transformers' `Llava(Next)ForConditionalGeneration` fp16 with its own processor, same image and prompt, in the
  same run (fp16 rows only);
- the same image again with a new question (encoder + prefix cache), next to a text-only prompt as long as the
  prompt's text part;
- 8 and 32 concurrent fresh images through the async API (`pipe.build_input`, then `pipe.generate`): wall time,
  first-token p50 / p90, and when the first and the last request's input was ready (where the time goes);
- batch-1 decode (128 tokens) with the image in context vs a text-only prompt of the same length;
- the memory the vision path holds apart before the KV cache is sized (pipe.memory()).
Writes bench_vision.json / .md under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES, RequestTimer, markdown_table, matmul_flops_per_s, percentile, save  # noqa: E402
from engine import EngineConfig, GenerationConfig, pipeline  # noqa: E402

CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
TEXT = {k: v for k, v in SHAPES["llama2-7b"].items() if k != "architectures"}
TEXT.update(vocab_size=32064, max_position_embeddings=4096)
LLAVA_SHAPES = {
    "llava-1.5-7b": {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                     "image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
                     "vision_feature_select_strategy": "default", "text_config": TEXT, "vision_config": CLIP_L_336,
                     "torch_dtype": "float16"},
    "llava-next-7b": {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
                      "image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
                      "vision_feature_select_strategy": "default", "text_config": TEXT, "vision_config": CLIP_L_336,
                      "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                      "torch_dtype": "float16"},
}
TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}{% for c in message['content'] %}"
            "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
            "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
QUESTIONS = ["Describe this image in detail.", "What colours stand out here?", "Is there any text in it?",
             "Where might this photo have been taken?", "What is in the foreground?", "Count the objects you see.",
             "What time of day is it?", "Describe the background."]


def make_llava_folder(name: str, root: Path, awq: bool) -> Path:
    """config.json (+ AWQ's quantization_config) and a tokenizer with <image>: enough for load_format=dummy."""
    from transformers import AutoTokenizer

    from studio.demo_model import build_tokenizer

    folder = root / (name + ("-awq" if awq else ""))
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(LLAVA_SHAPES[name]))
    if awq:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                      "version": "gemm", "modules_to_not_convert": ["vision_tower",
                                                                                    "multi_modal_projector"]}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    build_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return folder


def photo(seed: int, size=(480, 640)):
    """A fresh photo-sized image: smooth gradients under noise (never the same twice)."""
    from PIL import Image

    h, w = size
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 200 * rng.rand(3)
    return Image.fromarray(np.clip(base + rng.rand(h, w, 3) * 55, 0, 255).astype("uint8"))


def tower_flops(pipe, num_tiles: int) -> float:
    """Linear-layer FLOPs of the tower (patch embedding, the layers run) and the projector for num_tiles tiles."""
    vision = pipe.engine.spec.vision
    clip, h, i = vision.clip, vision.clip.hidden_size, vision.clip.intermediate_size
    positions, patches = clip.num_positions, clip.num_positions - 1
    per_tile = 2 * positions * vision.layers_run * (4 * h * h + 2 * h * i)
    per_tile += 2 * patches * (clip.num_channels * clip.patch_size**2) * h
    t = vision.text_hidden
    per_tile += 2 * patches * (h * len(vision.feature_layers) * t + (t * t if vision.projector_layers == 2 else 0))
    return num_tiles * per_tile


def lm_flops(spec, tokens: int) -> float:
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    per_layer = h * d * (2 * spec.num_heads + 2 * spec.num_kv_heads) + 3 * h * i
    return 2 * spec.num_layers * per_layer * tokens + 2 * h * spec.vocab_size  # lm_head on the last row


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def text_ttft_ms(pipe, length: int, reps: int = 5) -> float:
    timer = RequestTimer(pipe.engine)
    rng = random.Random(length)
    ids = lambda: [rng.randrange(3, 31000) for _ in range(length)]  # noqa: E731 - fresh each time: no prefix hits
    timer.run([(ids(), 1)], 1)
    return statistics.median(timer.run([(ids(), 1)], 1)["ttft_p50_ms"] for _ in range(reps))


async def concurrent_first_tokens(pipe, prompts) -> dict:
    start = time.perf_counter()
    built = []  # when each request's input was ready (images prepared on the image workers)

    async def first(prompt):
        request_input = await pipe.build_input(prompt)
        built.append(time.perf_counter() - start)
        async for _ in pipe.generate(None, GenerationConfig(max_new_tokens=1), input_ids=request_input):
            return time.perf_counter() - start

    ttfts = await asyncio.gather(*(first(p) for p in prompts))
    return {"wall_ms": (time.perf_counter() - start) * 1e3, "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
            "ttft_p90_ms": percentile(ttfts, 90) * 1e3, "first_built_ms": min(built) * 1e3,
            "all_built_ms": max(built) * 1e3}


@torch.inference_mode()
def bench_engine(folder: Path, shape: str, config: str, flops_per_s: float, reps: int) -> dict:
    pipe = pipeline(folder, EngineConfig(load_format="dummy", cache_max_entry_count=0.5, max_batch_size=64))
    spec, seed = pipe.engine.spec, [1000]

    def fresh():
        seed[0] += 1
        return photo(seed[0])

    gen1 = GenerationConfig(max_new_tokens=1)
    res = {"shape": shape, "config": config, "preprocess": pipe.vision.preprocess_backend}
    prompt_input = pipe.prompt_input((QUESTIONS[0], fresh()))
    item = prompt_input.mm_items[0]
    # warm-up of every path measured below (Triton specializes kernels by shape on first use: the session's first
    # run of each prompt length would otherwise time a compile): fresh images, the same image again, both text lengths
    for _ in range(3):
        img = fresh()
        pipe((QUESTIONS[0], img), gen1)
        pipe((QUESTIONS[-1], img), gen1)
    text_ttft_ms(pipe, len(prompt_input), 2)
    text_ttft_ms(pipe, len(prompt_input) - item.length, 2)
    asyncio.run(concurrent_first_tokens(pipe, [(QUESTIONS[0], fresh()) for _ in range(8)]))
    res["prompt_tokens"], res["image_tokens"] = len(prompt_input), item.length
    num_tiles = item.pixel_values.shape[0] if item.pixel_values.dim() == 4 else 1
    # first token, fresh image (made before the clock starts: a photo takes longer to draw than to preprocess)
    times = [timed(lambda img=img: pipe((QUESTIONS[0], img), gen1))[0] for img in [fresh() for _ in range(reps)]]
    res["fresh_ttft_ms"] = statistics.median(times) * 1e3
    floor_s = (tower_flops(pipe, num_tiles) + lm_flops(spec, len(prompt_input))) / flops_per_s
    res["floor_ms"] = floor_s * 1e3
    res["fresh_vs_floor"] = res["fresh_ttft_ms"] / res["floor_ms"]
    # where it goes
    res["preprocess_ms"] = statistics.median(timed(lambda img=img: pipe.prompt_input((QUESTIONS[0], img)))[0]
                                             for img in [fresh() for _ in range(reps)]) * 1e3
    items = [pipe.prompt_input((QUESTIONS[0], fresh())).mm_items[0] for _ in range(reps)]
    res["tower_ms"] = statistics.median(timed(lambda it=it: pipe.engine.runner.model.encode_images([it]))[0]
                                        for it in items) * 1e3
    res["text_same_length_ttft_ms"] = text_ttft_ms(pipe, len(prompt_input), reps)
    # the same image again, a new question: the image's blocks and features come from the caches
    img = fresh()
    pipe((QUESTIONS[0], img), gen1)
    again = [timed(lambda q=q: pipe((q, img), gen1))[0] for q in QUESTIONS[1 : 1 + reps]]
    res["same_image_again_ms"] = statistics.median(again) * 1e3
    text_part = len(prompt_input) - item.length
    res["text_part_tokens"] = text_part
    res["text_part_ttft_ms"] = text_ttft_ms(pipe, text_part, reps)
    # concurrency: fresh images, all at once through the async API
    for n in (8, 32):
        r = asyncio.run(concurrent_first_tokens(pipe, [(QUESTIONS[i % len(QUESTIONS)], fresh()) for i in range(n)]))
        res.update({f"conc{n}_{k}": v for k, v in r.items()})
    # batch-1 decode with an image in context vs text only
    n_new = 128
    gen = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, ignore_eos=True)
    t_first, t_all = [], []
    for img in [fresh() for _ in range(3)]:
        start = time.perf_counter()
        stamps = [time.perf_counter() for out in pipe.stream((QUESTIONS[0], img), gen) if out.token_ids]
        t_first.append(stamps[0] - start)
        t_all.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    res["decode_image_ms_per_token"] = statistics.median(t_all) * 1e3
    timer = RequestTimer(pipe.engine)
    rng = random.Random(7)
    r = timer.run([([rng.randrange(3, 31000) for _ in range(len(prompt_input))], n_new)], 1)
    res["decode_text_ms_per_token"] = r["tpot_p50_ms"]
    res["decode_image_vs_text"] = res["decode_text_ms_per_token"] / res["decode_image_ms_per_token"]
    mem = pipe.memory()
    res.update({k: mem.get(k) for k in ("vision_reserved_bytes", "vision_activation_bytes", "max_vision_tiles_per_step",
                                        "kv_cache_bytes", "images_decoded", "image_memo_hits", "encoder_cache_hits")})
    pipe.close()
    gc.collect()
    torch.cuda.empty_cache()
    return res


@torch.inference_mode()
def bench_transformers(folder: Path, shape: str, reps: int) -> dict:
    """transformers' Llava(Next)ForConditionalGeneration, fp16, random weights, with its own processor."""
    from transformers import AutoConfig, AutoTokenizer, LlavaNextProcessor, LlavaProcessor
    from transformers import LlavaForConditionalGeneration as Llava
    from transformers import LlavaNextForConditionalGeneration as LlavaNext

    from engine.models.llava import hf_image_processor_class

    next_ = shape.startswith("llava-next")
    config = AutoConfig.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")  # the id its processor expands
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = (LlavaNext if next_ else Llava)._from_config(config, dtype=torch.float16).eval()
    settings = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    if next_:
        settings["image_grid_pinpoints"] = config.image_grid_pinpoints
    image_processor = hf_image_processor_class(next_)(**settings)
    processor = (LlavaNextProcessor if next_ else LlavaProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=TEMPLATE)
    text = "USER: <image>\n" + QUESTIONS[0] + " ASSISTANT:"

    def first_token(image):
        inputs = processor(text=text, images=[image], return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].half()
        return model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)

    for seed in range(3):
        first_token(photo(seed))
    times = [timed(lambda img=img: first_token(img))[0] for img in [photo(100 + seed) for seed in range(reps)]]
    res = {"shape": shape, "config": "transformers fp16", "processor": type(image_processor).__name__,
           "fresh_ttft_ms": statistics.median(times) * 1e3}
    model.to("meta")
    gc.collect()
    torch.cuda.empty_cache()
    return res


COLUMNS = ["shape", "config", "prompt_tokens", "fresh_ttft_ms", "floor_ms", "fresh_vs_floor", "preprocess_ms",
           "tower_ms", "text_same_length_ttft_ms", "same_image_again_ms", "text_part_ttft_ms", "conc8_wall_ms",
           "conc8_ttft_p50_ms", "conc8_all_built_ms", "conc32_wall_ms", "conc32_ttft_p50_ms", "conc32_all_built_ms",
           "decode_image_vs_text", "vs_transformers"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llava-1.5-7b,llava-next-7b")
    parser.add_argument("--configs", default="fp16,awq")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on a CPU: checks the script only")
    args = parser.parse_args(argv)
    if args.smoke:
        tiny_text = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 4}
        tiny_clip = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}
        for cfg in LLAVA_SHAPES.values():
            cfg["text_config"] = {**cfg["text_config"], **tiny_text}
            cfg["vision_config"] = {**cfg["vision_config"], **tiny_clip}
    flops = matmul_flops_per_s() if torch.cuda.is_available() else 1e11
    root = Path(tempfile.mkdtemp())
    rows = []
    for shape in args.shapes.split(","):
        hf = None
        for config in args.configs.split(","):
            folder = make_llava_folder(shape, root, awq=config == "awq")
            row = bench_engine(folder, shape, config, flops, args.reps)
            if config == "fp16" and not args.no_transformers:
                hf = bench_transformers(folder, shape, args.reps)
                rows.append(hf)
            if hf is not None:
                row["vs_transformers"] = hf["fresh_ttft_ms"] / row["fresh_ttft_ms"]
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    header = (f"{device}, bf16 matmul {flops / 1e12:.0f} TFLOP/s, "
              f"{time.strftime('%Y-%m-%d')}; times in ms, first token of a fresh 640x480 image unless named\n\n")
    save(args.out, "bench_vision", {"device": device, "bf16_flops_per_s": flops, "rows": rows},
         header + markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
