"""InternVL (-hf layout and the original remote-code layout) through the engine agree with transformers on the same
tiny random weights (fp32, greedy): the tiling against transformers' GotOcr2 processor, prompt logits with one image
and with two images of different sizes (different tile grids, thumbnails), 16 greedy tokens against `generate`, a
batch mixing image and text requests, the original layout equal to the -hf one; plus the prefix cache with images,
chunked prefill through an image, KV int8 / int4, and bad images refused without disturbing another request."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from engine import GenerationConfig, InvalidImageError
from engine.inputs import RequestInput
from tests.engine.conftest import greedy
from tests.engine.test_llava import engine_logits, image_part
from tests.internvl_factory import (
    MAX_PATCHES,
    TILE,
    TOKENS_PER_TILE,
    hf_model,
    make_internvl,
    make_original_layout,
)

N = 16


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    return make_internvl(tmp_path_factory.mktemp("internvl") / "internvl-hf")


@pytest.fixture(scope="module")
def ref(internvl):
    return hf_model(internvl)


@pytest.fixture(scope="module")
def original(internvl, tmp_path_factory):
    return make_original_layout(internvl, tmp_path_factory.mktemp("internvl-orig") / "InternVL2_5")


def hf_inputs(request_input) -> dict:
    if isinstance(request_input, list):
        request_input = RequestInput(request_input)
    ids = torch.tensor([request_input.token_ids])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if request_input.mm_items:
        inputs["pixel_values"] = torch.cat([m.pixel_values for m in request_input.mm_items])
    return inputs


@torch.no_grad()
def hf_logits(model, request_input) -> torch.Tensor:
    return model(**hf_inputs(request_input)).logits[0]


@torch.no_grad()
def hf_generate(model, request_input, n: int = N) -> list[int]:
    inputs = hf_inputs(request_input)
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_tiles(path, img):
    """transformers' tiles for an image: the folder's GotOcr2 processor with crop_to_patches on, as
    InternVLProcessor runs it."""
    from engine.models.internvl import hf_image_processor_class

    processor = hf_image_processor_class().from_pretrained(str(path))
    assert processor.crop_to_patches is False  # as saved; the InternVL processor's default turns it on
    return processor(images=img, crop_to_patches=True, return_tensors="pt")["pixel_values"]


# ---- agreement with transformers ------------------------------------------------------------------------------
def test_one_image_prompt_logits_and_greedy_match_transformers(internvl, ref, make_pipe):
    pipe = make_pipe(internvl)
    img = image(150, 260, seed=0)
    prompt = ("What is in the picture?", img)
    request_input = pipe.prompt_input(prompt)
    (item,) = request_input.mm_items
    tiles = hf_tiles(internvl, img)
    assert tiles.shape[0] > 2 and tiles.shape[1:] == (3, TILE, TILE)  # a grid of tiles plus the thumbnail
    assert item.length == tiles.shape[0] * TOKENS_PER_TILE and item.image_size == (150, 260)
    torch.testing.assert_close(item.pixel_values, tiles)
    text = pipe.tokenizer.decode(request_input.token_ids)
    assert "<img>" + "<IMG_CONTEXT>" * item.length + "</img>\nWhat is in the picture?" in text
    assert text.removeprefix("<s>").startswith("<|im_start|>user\n<img><IMG_CONTEXT>")  # (the test tokenizer's BOS)
    torch.testing.assert_close(engine_logits(pipe, request_input), hf_logits(ref, request_input),
                               atol=2e-4, rtol=2e-4)
    assert pipe(prompt, greedy(N)).token_ids == hf_generate(ref, request_input)


def test_raw_prompt_and_system_turn(internvl, original, ref, make_pipe):
    """A raw prompt (no template) gets <img><IMG_CONTEXT>...</img> before the text (or where the marker is); the
    original layout's conversation template keeps a system turn the messages bring instead of its default."""
    pipe = make_pipe(internvl)
    img = image(90, 90, seed=20)
    raw = pipe.prompt_input(("Caption:", img), apply_chat_template=False)
    text = pipe.tokenizer.decode(raw.token_ids)
    assert text.removeprefix("<s>") == "<img>" + "<IMG_CONTEXT>" * raw.mm_items[0].length + "</img>\nCaption:"
    torch.testing.assert_close(engine_logits(pipe, raw), hf_logits(ref, raw), atol=2e-4, rtol=2e-4)
    marked = pipe.prompt_input(("A picture <IMG_CONTEXT> of what?", img), apply_chat_template=False)
    assert "A picture <img><IMG_CONTEXT>" in pipe.tokenizer.decode(marked.token_ids)
    pipe_o = make_pipe(original)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [image_part(img), {"type": "text", "text": "What?"}]}]
    text = pipe_o.tokenizer.decode(pipe_o.prompt_input(messages).token_ids)
    assert text.removeprefix("<s>").startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<img>")
    assert "书生" not in text


@pytest.mark.parametrize("size", [(40, 40), (112, 112), (100, 420), (420, 100), (300, 300), (1000, 30)])
def test_tile_counts_equal_the_processor(size, internvl, make_pipe):
    """The token count the prompter reserves before running anything is the processor's tile count x 16."""
    pipe = make_pipe(internvl)
    vision = pipe.engine.spec.vision
    assert (vision.min_tiles, vision.max_tiles) == (1, MAX_PATCHES)  # read from preprocessor_config.json
    img = image(*size, seed=1)
    assert vision.num_tiles(size) == hf_tiles(internvl, img).shape[0]
    assert pipe.prompt_input(("x", img)).mm_items[0].length == vision.num_tiles(size) * TOKENS_PER_TILE


def test_two_images_of_different_sizes_match_transformers(internvl, ref, make_pipe):
    pipe = make_pipe(internvl)
    a, b = image(60, 130, seed=1), image(300, 120, seed=2)
    messages = [{"role": "user", "content": [image_part(a), {"type": "text", "text": "Compare with"},
                                             image_part(b), {"type": "text", "text": "please."}]}]
    request_input = pipe.prompt_input(messages)
    items = request_input.mm_items
    assert len(items) == 2 and items[0].length != items[1].length
    torch.testing.assert_close(engine_logits(pipe, request_input), hf_logits(ref, request_input),
                               atol=2e-4, rtol=2e-4)
    assert pipe(messages, greedy(N)).token_ids == hf_generate(ref, request_input)


def test_batch_mixing_image_and_text_requests(internvl, ref, make_pipe):
    pipe = make_pipe(internvl)
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
        assert reply.token_ids == hf_generate(ref, pipe.prompt_input(prompt))


def test_transformers5_weight_spelling_loads(internvl, ref, tmp_path, make_pipe):
    """model.language_model.* / model.vision_tower.* / model.multi_modal_projector.* / lm_head load too."""
    from tests.internvl_factory import v5_spelling
    from tests.llava_factory import rename_checkpoint

    path = rename_checkpoint(internvl, tmp_path / "v5", v5_spelling)
    pipe = make_pipe(path)
    request_input = pipe.prompt_input(("Hi", image(70, 100, seed=15)))
    torch.testing.assert_close(engine_logits(pipe, request_input), hf_logits(ref, request_input),
                               atol=2e-4, rtol=2e-4)


# ---- the original layout ------------------------------------------------------------------------------------------
def test_original_layout_equals_the_hf_layout(internvl, original, ref, make_pipe):
    """Same weights renamed (vision_model.* with fused qkv, mlp1.*, language_model.*) and an original config.json:
    loads without running any folder code; its prompt (conversation template, <image> -> <img><IMG_CONTEXT>...</img>)
    and its tiles (config.json's max_dynamic_patch) give what the -hf folder gives."""
    pipe_o, pipe_h = make_pipe(original), make_pipe(internvl)
    vision = pipe_o.engine.spec.vision
    assert vision.layout == "original" and vision.max_tiles == MAX_PATCHES
    assert vision.text_arch == "Qwen2ForCausalLM"
    img = image(150, 260, seed=0)
    ours = pipe_o.prompt_input(("Describe the image.", img))
    text = pipe_o.tokenizer.decode(ours.token_ids)
    # internvl2_5's conversation template
    assert text.removeprefix("<s>").startswith("<|im_start|>system\n你是书生·万象")
    assert ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * ours.mm_items[0].length + "</img>\nDescribe the image."
            "<|im_end|>\n<|im_start|>assistant\n") in text
    theirs = pipe_h.prompt_input(("Describe the image.", img))
    torch.testing.assert_close(ours.mm_items[0].pixel_values, theirs.mm_items[0].pixel_values)
    # the same ids through both folders: identical logits, and transformers' on the -hf folder
    logits = engine_logits(pipe_o, ours)
    torch.testing.assert_close(logits, engine_logits(pipe_h, ours), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, hf_logits(ref, ours), atol=2e-4, rtol=2e-4)
    assert pipe_o(("Describe the image.", img), greedy(N)).token_ids == hf_generate(ref, ours)


def test_original_layout_with_an_internlm2_decoder(internvl, tmp_path, make_pipe):
    """InternVL2_5-8B's layout: an InternLM2 decoder (tok_embeddings, fused wqkv, output) under language_model.*,
    read as the Llama decoder; the same weights as the -hf folder's Llama decoder give the same logits."""
    from tests.internvl_factory import with_internlm2_decoder

    hf = make_internvl(tmp_path / "llama-hf", text_model="llama", seed=3)
    orig = with_internlm2_decoder(make_original_layout(hf, tmp_path / "orig"))
    pipe_o, pipe_h = make_pipe(orig), make_pipe(hf)
    assert pipe_o.engine.spec.vision.text_arch == "InternLM2ForCausalLM"
    request_input = pipe_o.prompt_input(("What now?", image(90, 200, seed=7)))
    text = pipe_o.tokenizer.decode(request_input.token_ids)
    assert text.removeprefix("<s>").startswith("<|im_start|>system\n你是由上海人工智能实验室")
    torch.testing.assert_close(engine_logits(pipe_o, request_input), engine_logits(pipe_h, request_input),
                               atol=1e-5, rtol=1e-5)


# ---- prefix cache, chunked prefill --------------------------------------------------------------------------------
def test_prefix_cache_same_image_hits_different_image_misses(internvl, ref, make_pipe):
    pipe = make_pipe(internvl)
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
    assert other.token_ids == hf_generate(ref, pipe.prompt_input((text, y)))
    assert other.token_ids != first.token_ids


@pytest.mark.parametrize("encoder_cache_bytes", [0, 2**20])
def test_chunked_prefill_splits_an_image(encoder_cache_bytes, internvl, ref, make_pipe):
    pipe = make_pipe(internvl, max_prefill_token_num=16, encoder_cache_bytes=encoder_cache_bytes)
    img = image(112, 230, seed=9)  # 2 tiles + thumbnail: 48 tokens
    prompt = ("Say something about this picture.", img)
    request_input = pipe.prompt_input(prompt)
    item = request_input.mm_items[0]
    assert item.length == 3 * TOKENS_PER_TILE and item.offset % 16 != 0  # chunk boundaries inside the image
    assert pipe(prompt, greedy(N)).token_ids == hf_generate(ref, request_input)


# ---- KV quantization ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_policy,bound", [(8, 0.015), (4, 0.15)])
def test_kv_int8_int4_logits_stay_close(quant_policy, bound, internvl, ref, make_pipe):
    """Quantized KV with image tokens in the cache: the prompt logits' relative error against transformers' stays
    within the bounds tests/engine/test_kv_quant.py holds text models to."""
    pipe = make_pipe(internvl, quant_policy=quant_policy)
    request_input = pipe.prompt_input(("What is this?", image(100, 180, seed=10)))
    ours, theirs = engine_logits(pipe, request_input), hf_logits(ref, request_input)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < bound, f"KV int{quant_policy}: relative logit error {rel:.4f}"
    assert rel > 0  # the cache really is quantized
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()  # per position (random weights: near ties)
    assert agree > (0.95 if quant_policy == 8 else 0.8), f"greedy choices agree at {agree:.2%} of positions"


# ---- errors -------------------------------------------------------------------------------------------------------
def test_bad_image_refused_without_hurting_others(internvl, ref, make_pipe):
    pipe = make_pipe(internvl)
    good = ("Describe.", image(84, 112, seed=11))
    expected = hf_generate(ref, pipe.prompt_input(good))
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
        pipe.prompt_input(("<IMG_CONTEXT><IMG_CONTEXT> two markers", image(56, 56, seed=12)))
    item = pipe.prompt_input(("x", image(56, 56, seed=14))).mm_items[0]
    assert item.length == TOKENS_PER_TILE
    wrong = dataclasses.replace(item, offset=2, image_size=(112, 300))  # a size that needs more tiles
    with pytest.raises(InvalidImageError, match="the prompt holds 16"):
        pipe.engine.add_request(RequestInput([0] * 40, (wrong,)), greedy(2), lambda out: None)
    assert done.wait(120)
    assert [t for out in outputs for t in out.token_ids] == expected


def test_memory_reports_the_vision_tower(internvl, make_pipe):
    pipe = make_pipe(internvl)
    model = pipe.engine.runner.model
    tower = sum(p.numel() * p.element_size() for m in (model.vision_tower, model.multi_modal_projector)
                for p in m.parameters())
    assert pipe.engine.runner.vision_bytes == tower > 0


def test_tied_embeddings_follow_transformers(tmp_path, make_pipe):
    path = make_internvl(tmp_path / "tied", tie=True, seed=5)
    ref = hf_model(path)
    pipe = make_pipe(path)
    assert pipe.engine.spec.tie_word_embeddings
    request_input = pipe.prompt_input(("Hi", image(70, 90, seed=15)))
    torch.testing.assert_close(engine_logits(pipe, request_input), hf_logits(ref, request_input),
                               atol=2e-4, rtol=2e-4)


# ---- GPU ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_internvl_on_the_gpu(internvl, ref):
    """Triton kernels, CUDA graphs for decode and the overlapped step loop with images, chunks cutting them: fp32
    agrees with transformers (on the CPU); fp16 (tower in half) stays close."""
    from engine import EngineConfig, pipeline

    prompts = [("Describe it.", image(150, 260, seed=3)), "Plain text, no image.",
               [{"role": "user", "content": [image_part(image(60, 130, seed=1)), {"type": "text", "text": "and"},
                                             image_part(image(300, 120, seed=2))]}]]
    replies = {}
    for dtype in ("float32", "float16"):
        pipe = pipeline(internvl, EngineConfig(dtype=dtype, cache_block_seq_len=16, num_gpu_blocks=256,
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_original_layout_on_the_gpu_equals_the_hf_layout(internvl, original):
    """fp16 on the GPU, raw prompts (the same ids through both folders): the original layout's replies are the -hf
    layout's, token for token (the same weights through the same modules)."""
    from engine import EngineConfig, pipeline

    prompts = [("Describe it.", image(150, 260, seed=3)), ("Two:", [image(60, 130, seed=1), image(300, 120, seed=2)])]
    replies = []
    for path in (internvl, original):
        pipe = pipeline(path, EngineConfig(dtype="float16", cache_block_seq_len=16, num_gpu_blocks=256,
                                           max_prefill_token_num=64))
        try:
            replies.append([r.token_ids for r in pipe(prompts, greedy(N), apply_chat_template=False)])
        finally:
            pipe.close()
    assert replies[0] == replies[1] and all(len(r) == N for r in replies[0])


# ---- real checkpoints' configs ---------------------------------------------------------------------------------------
VISION_300M = {"architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.0, "dropout": 0.0,
               "hidden_act": "gelu", "hidden_size": 1024, "image_size": 448, "initializer_factor": 1.0,
               "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-06,
               "model_type": "intern_vit_6b", "norm_type": "layer_norm", "num_attention_heads": 16, "num_channels": 3,
               "num_hidden_layers": 24, "patch_size": 14, "qk_normalization": False, "qkv_bias": True,
               "use_flash_attn": True}
INTERNVL25_8B = {  # OpenGVLab/InternVL2_5-8B's config.json (the original remote-code layout, an InternLM2 decoder)
    "architectures": ["InternVLChatModel"], "downsample_ratio": 0.5, "dynamic_image_size": True,
    "force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1, "model_type": "internvl_chat",
    "ps_version": "v2", "select_layer": -1, "template": "internvl2_5", "torch_dtype": "bfloat16",
    "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
    "llm_config": {"architectures": ["InternLM2ForCausalLM"], "bias": False, "bos_token_id": 1, "eos_token_id": 2,
                   "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
                   "max_position_embeddings": 32768, "model_type": "internlm2", "num_attention_heads": 32,
                   "num_hidden_layers": 32, "num_key_value_heads": 8, "pad_token_id": 2, "rms_norm_eps": 1e-05,
                   "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "rope_theta": 1000000,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 92553},
    "vision_config": VISION_300M,
}
INTERNVL3_8B_HF = {  # OpenGVLab/InternVL3-8B-hf's config.json (transformers' layout, a Qwen2 decoder)
    "architectures": ["InternVLForConditionalGeneration"], "downsample_ratio": 0.5, "image_seq_length": 256,
    "image_token_id": 151667, "model_type": "internvl", "projector_hidden_act": "gelu", "torch_dtype": "bfloat16",
    "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
    "text_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 3584,
                    "intermediate_size": 18944, "max_position_embeddings": 32768, "model_type": "qwen2",
                    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
                    "rope_theta": 1000000.0, "vocab_size": 151674},
    "vision_config": {"architectures": ["InternVisionModel"], "attention_bias": True, "hidden_act": "gelu",
                      "hidden_size": 1024, "image_size": [448, 448], "intermediate_size": 4096, "layer_norm_eps": 1e-06,
                      "layer_scale_init_value": 0.1, "model_type": "internvl_vision", "norm_type": "layer_norm",
                      "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24, "patch_size": [14, 14],
                      "use_absolute_position_embeddings": True, "use_mask_token": False, "use_mean_pooling": True,
                      "use_qk_norm": False},
}
HF_PREPROCESSOR = {  # as the -hf checkpoints save it (the fast class's keys; crop_to_patches false)
    "crop_size": None, "crop_to_patches": False, "data_format": "channels_first", "default_to_square": True,
    "device": None, "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "GotOcr2ImageProcessorFast",
    "image_std": [0.229, 0.224, 0.225], "input_data_format": None, "max_patches": 12, "min_patches": 1,
    "processor_class": "InternVLProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "return_tensors": None, "size": {"height": 448, "width": 448}}


@pytest.mark.parametrize("cfg", [INTERNVL25_8B, INTERNVL3_8B_HF], ids=["internvl2.5-8b", "internvl3-8b-hf"])
def test_hub_configs_read_as_their_code_does(cfg, tmp_path):
    """The decoder, the tower's sizes, 256 tokens per 448-pixel tile, max 12 tiles + thumbnail (config.json's
    max_dynamic_patch / preprocessor_config.json's max_patches), the placeholder id; a 1024x768 image is 13 tiles
    (3,328 tokens), as transformers' processor cuts it."""
    from engine import loader
    from engine.models.internvl import hf_image_processor_class, image_processor

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    original = "llm_config" in cfg
    if original:  # InternVL2.5's tokenizer adds <IMG_CONTEXT> as 92546
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"added_tokens_decoder": {"92546": {"content": "<IMG_CONTEXT>", "special": True}}}))
    else:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(HF_PREPROCESSOR))
    spec = loader.read_model_spec(tmp_path)
    vision = spec.vision
    assert vision.layout == ("original" if original else "hf")
    assert vision.text_arch == ("InternLM2ForCausalLM" if original else "Qwen2ForCausalLM")
    assert spec.hidden_size == vision.text_hidden == (4096 if original else 3584)
    assert spec.attention_bias != original  # InternLM2: no q/k/v bias; Qwen2: bias
    assert (vision.width, vision.depth, vision.tile, vision.tokens_per_tile) == (1024, 24, 448, 256)
    assert (vision.min_tiles, vision.max_tiles, vision.crop, vision.thumbnail) == (1, 12, True, True)
    assert vision.image_token_id == (92546 if original else 151667)
    assert vision.token_range == (256, 13 * 256)
    assert (vision.chat_template is not None) == original
    tiles, size = image_processor(spec)(image(768, 1024, seed=0))
    assert tiles.shape == (13, 3, 448, 448) and vision.num_features(size) == 13 * 256
    if not original:
        theirs = hf_image_processor_class().from_pretrained(str(tmp_path))(images=image(768, 1024, seed=0),
                                                                            crop_to_patches=True,
                                                                            return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(tiles, theirs)


@pytest.mark.parametrize("change,words", [
    (lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"], model_type="phi3"),
     "InternVLChatModel with a ['Phi3ForCausalLM'] language model is not supported (supported: Qwen2ForCausalLM, "
     "LlamaForCausalLM, InternLM2ForCausalLM)"),
    (lambda c: c.update(ps_version="v1"), "ps_version 'v1' is not supported (v2 is)"),
    (lambda c: c["vision_config"].update(hidden_act="swish"), "activation 'swish' is not supported"),
], ids=["phi3-decoder", "ps-v1", "activation"])
def test_unsupported_variants_say_what_is_supported(change, words, tmp_path):
    """InternVL variants the engine cannot run (Mini-InternVL's Phi-3 decoder, InternVL 1.5's pixel shuffle, an
    unknown activation) are refused with an error naming what is supported."""
    from engine import UnsupportedModelError, loader

    cfg = json.loads(json.dumps(INTERNVL25_8B))
    change(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"92546": {"content": "<IMG_CONTEXT>", "special": True}}}))
    with pytest.raises(UnsupportedModelError) as e:
        loader.read_model_spec(tmp_path)
    assert words in str(e.value)
