"""Qwen2-VL / Qwen2.5-VL through the engine agree with transformers on the same tiny random weights (fp32, greedy):
prompt logits with one image and with two images of different sizes (dynamic resolution, the vision tower's
per-image and window attention, M-RoPE), 16 greedy tokens against `generate`, a batch mixing image and text
requests, both config spellings (nested text_config, flat hub), tied embeddings; plus the prefix cache with images,
chunked prefill through an image, KV int8 / int4, and bad images refused without disturbing another request."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from engine import GenerationConfig, InvalidImageError
from engine.inputs import RequestInput
from tests.engine.conftest import greedy
from tests.engine.test_llava import data_url, engine_logits, image_part
from tests.qwen_vl_factory import MAX_PIXELS, MIN_PIXELS, hf_model, make_qwen_vl

N = 16


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    return make_qwen_vl(tmp_path_factory.mktemp("qwen25") / "qwen2.5-vl", v25=True)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_qwen_vl(tmp_path_factory.mktemp("qwen2") / "qwen2-vl", v25=False, tie=True, flat=True)


@pytest.fixture(scope="module")
def ref25(qwen25):
    return hf_model(qwen25, v25=True)


@pytest.fixture(scope="module")
def ref2(qwen2):
    return hf_model(qwen2, v25=False)


def hf_inputs(request_input, config) -> dict:
    """transformers' inputs for the engine's RequestInput (or a text prompt's ids): its ids, the patches, the grids,
    the token types."""
    if isinstance(request_input, list):
        request_input = RequestInput(request_input)
    ids = torch.tensor([request_input.token_ids])
    items = request_input.mm_items
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if items:
        patch = config.vision_config.patch_size
        inputs["pixel_values"] = torch.cat([m.pixel_values for m in items])
        inputs["image_grid_thw"] = torch.tensor([[1, m.image_size[0] // patch, m.image_size[1] // patch]
                                                 for m in items])
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).int()
    return inputs


@torch.no_grad()
def hf_logits(model, request_input) -> torch.Tensor:
    return model(**hf_inputs(request_input, model.config)).logits[0]


@torch.no_grad()
def hf_generate(model, request_input, n: int = N) -> list[int]:
    inputs = hf_inputs(request_input, model.config)
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_processed(path, img):
    from engine.models.qwen2_vl import hf_image_processor_class

    return hf_image_processor_class().from_pretrained(str(path))(images=img, return_tensors="pt")


# ---- agreement with transformers ------------------------------------------------------------------------------
@pytest.mark.parametrize("v25", [True, False], ids=["qwen2.5-vl", "qwen2-vl"])
def test_one_image_prompt_logits_and_greedy_match_transformers(v25, request, make_pipe):
    path = request.getfixturevalue("qwen25" if v25 else "qwen2")
    ref = request.getfixturevalue("ref25" if v25 else "ref2")
    pipe = make_pipe(path)
    img = image(100, 150, seed=0)
    prompt = ("What is in the picture?", img)
    request_input = pipe.prompt_input(prompt)
    (item,) = request_input.mm_items
    theirs = hf_processed(path, img)
    t, h, w = theirs["image_grid_thw"][0].tolist()
    assert item.length == h * w // 4 and item.image_size == (h * 14, w * 14)
    assert MIN_PIXELS <= h * w * 196 <= MAX_PIXELS  # the folder's min_pixels / max_pixels decided the size
    torch.testing.assert_close(item.pixel_values, theirs["pixel_values"])
    text = pipe.tokenizer.decode(request_input.token_ids)
    assert "<|vision_start|>" + "<|image_pad|>" * item.length + "<|vision_end|>What is in the picture?" in text
    torch.testing.assert_close(engine_logits(pipe, request_input), hf_logits(ref, request_input),
                               atol=2e-4, rtol=2e-4)
    assert pipe(prompt, greedy(N)).token_ids == hf_generate(ref, request_input)


@pytest.mark.parametrize("v25", [True, False], ids=["qwen2.5-vl", "qwen2-vl"])
def test_two_images_of_different_sizes_match_transformers(v25, request, make_pipe):
    """Different grids in one tower pass (per-image attention; 2.5: windows with padding at the edges), and M-RoPE
    text positions continuing after each image."""
    path = request.getfixturevalue("qwen25" if v25 else "qwen2")
    ref = request.getfixturevalue("ref25" if v25 else "ref2")
    pipe = make_pipe(path)
    a, b = image(60, 130, seed=1), image(140, 84, seed=2)
    messages = [{"role": "user", "content": [image_part(a), {"type": "text", "text": "Compare with"},
                                             image_part(b), {"type": "text", "text": "please."}]}]
    request_input = pipe.prompt_input(messages)
    items = request_input.mm_items
    assert len(items) == 2 and items[0].image_size != items[1].image_size and items[0].length != items[1].length
    torch.testing.assert_close(engine_logits(pipe, request_input), hf_logits(ref, request_input),
                               atol=2e-4, rtol=2e-4)
    assert pipe(messages, greedy(N)).token_ids == hf_generate(ref, request_input)


def test_mrope_positions_and_delta_equal_transformers_rope_index(qwen25, ref25, make_pipe):
    """The runner's 3-row positions for any token range (chunks) and the decode delta are transformers'
    get_rope_index for the whole prompt."""
    pipe = make_pipe(qwen25)
    model = pipe.engine.runner.model
    messages = [{"role": "user", "content": [image_part(image(60, 130, seed=1)), {"type": "text", "text": "x"},
                                             image_part(image(140, 84, seed=2)), {"type": "text", "text": "y"}]}]
    request_input = pipe.prompt_input(messages)
    inputs = hf_inputs(request_input, ref25.config)
    theirs, delta = ref25.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                               inputs["image_grid_thw"])
    theirs = theirs[:, 0]
    n = len(request_input.token_ids)
    items = request_input.mm_items
    assert torch.equal(model.mrope_positions(items, 0, n), theirs)
    cuts = [0, 5, items[0].offset + 3, items[0].end, items[1].offset + 1, n - 1, n]
    chunks = [model.mrope_positions(items, a, b) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(chunks, dim=1), theirs)
    assert model.mrope_delta(items) == int(delta) and int(delta) < 0


def test_nested_and_flat_configs_load_the_same(qwen25, ref25, tmp_path, make_pipe):
    """transformers 5 writes text_config nested; hub checkpoints are flat (rope_scaling type mrope): both load."""
    from tests.qwen_vl_factory import flatten_config

    flat = tmp_path / "flat"
    import shutil

    shutil.copytree(qwen25, flat)
    flatten_config(flat)
    pipe = make_pipe(flat)
    spec = pipe.engine.spec
    assert spec.rope_theta == 1e6 and spec.rope_scaling is None and spec.vision.mrope_section == (2, 3, 3)
    request_input = pipe.prompt_input(("Hi", image(90, 90, seed=3)))
    torch.testing.assert_close(engine_logits(pipe, request_input), hf_logits(ref25, request_input),
                               atol=2e-4, rtol=2e-4)


def v5_spelling(name: str) -> str:
    """transformers >= 4.52's in-memory names: model.language_model.*, model.visual.*, lm_head."""
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    if name.startswith("visual."):
        return "model." + name
    return name


def test_transformers5_weight_spelling_loads(qwen25, ref25, tmp_path, make_pipe):
    from tests.llava_factory import rename_checkpoint

    path = rename_checkpoint(qwen25, tmp_path / "v5", v5_spelling)
    pipe = make_pipe(path)
    request_input = pipe.prompt_input(("Hi", image(70, 100, seed=15)))
    torch.testing.assert_close(engine_logits(pipe, request_input), hf_logits(ref25, request_input),
                               atol=2e-4, rtol=2e-4)


def test_batch_mixing_image_and_text_requests(qwen25, ref25, make_pipe):
    pipe = make_pipe(qwen25)
    model = pipe.engine.runner.model
    calls = []
    encode = model.encode_images
    model.encode_images = lambda items: calls.append(len(items)) or encode(items)
    prompts = [("First picture.", image(70, 70, seed=4)), "Just some text, no image at all.",
               [{"role": "user", "content": [image_part(image(50, 120, seed=5)), image_part(image(120, 50, seed=6)),
                                             {"type": "text", "text": "Two more."}]}]]
    replies = pipe(prompts, greedy(N))
    assert calls == [3]  # the three images of the step in one tower pass
    for prompt, reply in zip(prompts, replies):
        assert reply.token_ids == hf_generate(ref25, pipe.prompt_input(prompt))


# ---- prefix cache, chunked prefill --------------------------------------------------------------------------------
def test_prefix_cache_same_image_hits_different_image_misses(qwen25, ref25, make_pipe):
    pipe = make_pipe(qwen25)
    manager = pipe.engine.block_manager
    x, y = image(84, 84, seed=7), image(84, 84, seed=8)
    text = "Tell me everything about this image, in great detail, please."
    first = pipe((text, x), greedy(N))
    ids = pipe.encode((text, x))
    full_blocks = (len(ids) - 1) // 16
    assert full_blocks >= 3
    hits = manager.num_prefix_hits
    again = pipe((text, x), greedy(N))
    assert manager.num_prefix_hits - hits == full_blocks and again.token_ids == first.token_ids
    hits = manager.num_prefix_hits
    other = pipe((text, y), greedy(N))
    first_image_block = pipe.prompt_input((text, y)).mm_items[0].offset // 16
    assert manager.num_prefix_hits - hits == first_image_block  # only the blocks before the image are shared
    assert other.token_ids == hf_generate(ref25, pipe.prompt_input((text, y)))
    assert other.token_ids != first.token_ids


@pytest.mark.parametrize("encoder_cache_bytes", [0, 2**20])
def test_chunked_prefill_splits_an_image(encoder_cache_bytes, qwen25, ref25, make_pipe):
    pipe = make_pipe(qwen25, max_prefill_token_num=16, encoder_cache_bytes=encoder_cache_bytes)
    img = image(112, 140, seed=9)  # 4 x 5 tokens
    prompt = ("Say something about this picture.", img)
    request_input = pipe.prompt_input(prompt)
    item = request_input.mm_items[0]
    assert item.offset < 16 < item.end or item.offset < 32 < item.end  # a chunk boundary inside the image
    assert pipe(prompt, greedy(N)).token_ids == hf_generate(ref25, request_input)
    # a raw prompt that ends in the image: its last image token is fed by a decode step
    raw = pipe.prompt_input(("", img), apply_chat_template=False)
    end = raw.mm_items[0].end
    vision_start, vision_end = pipe.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    assert raw.token_ids[raw.mm_items[0].offset - 1] == vision_start and raw.token_ids[end] == vision_end
    raw_end = type(raw)(raw.token_ids[:end], raw.mm_items)
    outputs, done = [], threading.Event()

    def collect(out):
        outputs.append(out)
        if out.finished:
            done.set()

    pipe.engine.add_request(raw_end, greedy(N), collect)
    assert done.wait(120)
    ours = [t for out in outputs for t in out.token_ids]
    # transformers' generate drifts after a prompt that ends inside an image (its step-by-step positions), so the
    # reference is one teacher-forced pass over prompt + our tokens: greedy means each token is its argmax there
    forced = RequestInput(raw_end.token_ids + ours[:-1], raw_end.mm_items)
    assert hf_logits(ref25, forced)[end - 1 :].argmax(-1).tolist() == ours


# ---- KV quantization ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_policy,bound", [(8, 0.015), (4, 0.15)])
def test_kv_int8_int4_logits_stay_close(quant_policy, bound, qwen25, ref25, make_pipe):
    """Quantized KV (image tokens with M-RoPE positions in the cache): the prompt logits' relative error against
    transformers' stays within the bounds tests/engine/test_kv_quant.py holds text models to."""
    pipe = make_pipe(qwen25, quant_policy=quant_policy)
    request_input = pipe.prompt_input(("What is this?", image(100, 100, seed=10)))
    ours, theirs = engine_logits(pipe, request_input), hf_logits(ref25, request_input)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < bound, f"KV int{quant_policy}: relative logit error {rel:.4f}"
    assert rel > 0  # the cache really is quantized
    assert ours[-1].argmax() == theirs[-1].argmax()


# ---- errors -------------------------------------------------------------------------------------------------------
def test_bad_image_refused_without_hurting_others(qwen25, ref25, make_pipe):
    pipe = make_pipe(qwen25)
    good = ("Describe.", image(84, 112, seed=11))
    expected = hf_generate(ref25, pipe.prompt_input(good))
    outputs, done = [], threading.Event()

    def collect(out):
        outputs.append(out)
        if out.finished:
            done.set()

    pipe.engine.add_request(pipe.prompt_input(good), GenerationConfig(max_new_tokens=N, do_sample=False,
                                                                       ignore_eos=True), collect)
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                        {"type": "text", "text": "what?"}]}]
    with pytest.raises(InvalidImageError):
        pipe.prompt_input(bad)
    with pytest.raises(InvalidImageError):  # a wrong image-marker count
        pipe.prompt_input(("<|image_pad|><|image_pad|> two markers", image(56, 56, seed=12)))
    item = pipe.prompt_input(("x", image(56, 56, seed=14))).mm_items[0]
    # a hand-built input whose image size and token count disagree
    wrong = dataclasses.replace(item, offset=2, image_size=(112, 56))
    with pytest.raises(InvalidImageError, match="has 8 tokens, the prompt holds 4"):
        pipe.engine.add_request(RequestInput([0] * 10, (wrong,)), greedy(2), lambda out: None)
    assert done.wait(120)
    assert [t for out in outputs for t in out.token_ids] == expected
    assert data_url(image(30, 30, seed=13)).startswith("data:image/png;base64,")


def test_memory_reports_the_vision_tower(qwen25, make_pipe):
    pipe = make_pipe(qwen25)
    model = pipe.engine.runner.model
    tower = sum(p.numel() * p.element_size() for p in model.visual.parameters())
    assert pipe.engine.runner.vision_bytes == tower > 0


# ---- GPU ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("v25", [True, False], ids=["qwen2.5-vl", "qwen2-vl"])
def test_qwen_vl_on_the_gpu(v25, request):
    """Triton kernels, CUDA graphs for decode (1-row positions + mrope_delta) and the overlapped step loop with
    images, chunks cutting them: fp32 agrees with transformers (on the CPU); fp16 (tower in half) stays close."""
    from engine import EngineConfig, pipeline

    path = request.getfixturevalue("qwen25" if v25 else "qwen2")
    ref = request.getfixturevalue("ref25" if v25 else "ref2")
    prompts = [("Describe it.", image(100, 150, seed=3)), "Plain text, no image.",
               [{"role": "user", "content": [image_part(image(60, 130, seed=1)), {"type": "text", "text": "and"},
                                             image_part(image(140, 84, seed=2))]}]]
    replies = {}
    for dtype in ("float32", "float16"):
        pipe = pipeline(path, EngineConfig(dtype=dtype, cache_block_seq_len=16, num_gpu_blocks=256,
                                           max_prefill_token_num=32))
        try:
            assert pipe.engine.device.type == "cuda" and pipe.engine.runner.graphs is not None
            replies[dtype] = [r.token_ids for r in pipe(prompts, greedy(N))]
            expected = [hf_generate(ref, pipe.prompt_input(p)) for p in prompts]
            assert pipe.memory()["vision_bytes"] > 0
        finally:
            pipe.close()
        if dtype == "float32":
            assert replies[dtype] == expected
    assert all(len(r) == N for r in replies["float16"])
    assert sum(a[0] == b[0] for a, b in zip(replies["float16"], replies["float32"])) >= 2


# ---- real checkpoints' configs ---------------------------------------------------------------------------------------
QWEN25_VL_7B = {  # Qwen/Qwen2.5-VL-7B-Instruct's config.json (flat, as on the hub)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
    "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
QWEN2_VL_2B = {  # Qwen/Qwen2-VL-2B-Instruct's config.json
    "architectures": ["Qwen2VLForConditionalGeneration"], "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 1536,
    "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2_vl",
    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
HUB_PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                    "processor_class": "Qwen2_5_VLProcessor"}


@pytest.mark.parametrize("cfg", [QWEN25_VL_7B, QWEN2_VL_2B], ids=["qwen2.5-vl-7b", "qwen2-vl-2b"])
def test_hub_configs_read_as_transformers_does(cfg, tmp_path):
    """The hub's flat configs: M-RoPE section, rope theta, tied embeddings, the tower's sizes, min/max pixels; an
    image's token count is what transformers' processor gives for it."""
    import json

    from engine import loader
    from engine.models.qwen2_vl import image_processor

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR))
    spec = loader.read_model_spec(tmp_path)
    v25 = "vision_config" in cfg and "out_hidden_size" in cfg["vision_config"]
    assert spec.rope_theta == 1e6 and spec.rope_scaling is None and spec.head_dim == 128
    assert spec.tie_word_embeddings == cfg["tie_word_embeddings"] and spec.attention_bias
    vision = spec.vision
    assert vision.v25 == v25 and vision.mrope_section == (16, 24, 24) and vision.width == 1280 and vision.depth == 32
    assert vision.out_hidden == spec.hidden_size and vision.image_token_id == 151655
    assert (vision.min_pixels, vision.max_pixels) == (3136, 12845056) and vision.token_range == (4, 16384)
    if v25:
        assert vision.window_size == 112 and vision.fullatt_blocks == (7, 15, 23, 31) and vision.mlp_hidden == 3420
    else:
        assert vision.mlp_hidden == 5120 and vision.act == "quick_gelu"
    processor = image_processor(spec)
    patches, size = processor(image(768, 1024, seed=0))
    theirs = hf_processed(tmp_path, image(768, 1024, seed=0))
    assert patches.shape[0] == theirs["image_grid_thw"][0].prod() and patches.shape[1] == 3 * 2 * 14 * 14
    assert processor.num_features(size) == patches.shape[0] // 4
