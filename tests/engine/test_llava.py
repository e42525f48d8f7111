"""LLaVA-1.5 / LLaVA-NeXT through the engine agree with transformers on the same tiny random weights (fp32, greedy):
one image, two images, NeXT with non-square images, every weight spelling, the original liuhaotian layout with its
separate CLIP tower; plus the prefix cache with images, chunked prefill through an image, the encoder cache, memory
reporting, and the errors for bad images (which never disturb another running request)."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from engine import EngineConfig, GenerationConfig, ImageInputError, InvalidImageError, ModelLoadError
from tests.engine.conftest import greedy, small_config
from tests.llava_factory import (
    IMAGE_TOKEN,
    hub_spelling,
    make_llava,
    make_original_layout,
    rename_checkpoint,
    v5_spelling,
)

N = 16  # generated tokens compared


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(img: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(img)}}


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    return make_llava(tmp_path_factory.mktemp("llava15") / "llava-1.5")


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    return make_llava(tmp_path_factory.mktemp("llava-next") / "llava-next", next_=True)


def hf_reference(path, next_: bool = False):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    return cls.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ref15(llava15):
    return hf_reference(llava15)


@pytest.fixture(scope="module")
def ref_next(llava_next):
    return hf_reference(llava_next, next_=True)


@pytest.fixture(scope="module")
def pipe15(llava15):
    from engine import pipeline

    pipe = pipeline(llava15, small_config())
    yield pipe
    pipe.close()


def hf_processor(path, next_: bool = False):
    from transformers import AutoTokenizer, LlavaNextProcessor, LlavaProcessor

    from engine.models.llava import hf_image_processor_class

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    image_processor = hf_image_processor_class(next_).from_pretrained(str(path))
    if next_:
        return LlavaNextProcessor(image_processor=image_processor,
                                  tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)


@torch.no_grad()
def hf_generate(model, inputs: dict, n: int = N) -> list[int]:
    ids = inputs["input_ids"]
    inputs = {**inputs, "attention_mask": torch.ones_like(ids)}
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def hf_inputs(request_input, image_token_id: int, next_: bool = False) -> dict:
    """transformers' inputs for the engine's own RequestInput: its ids (placeholders as the image token) and
    pixels."""
    ids = list(request_input.token_ids)
    for item in request_input.mm_items:
        ids[item.offset : item.end] = [image_token_id] * item.length
    inputs = {"input_ids": torch.tensor([ids])}
    if next_:
        tiles = max(m.pixel_values.shape[0] for m in request_input.mm_items)
        pixels = torch.zeros(len(request_input.mm_items), tiles, *request_input.mm_items[0].pixel_values.shape[1:])
        for i, m in enumerate(request_input.mm_items):
            pixels[i, : m.pixel_values.shape[0]] = m.pixel_values
        inputs["pixel_values"] = pixels
        inputs["image_sizes"] = torch.tensor([list(m.image_size) for m in request_input.mm_items])
    else:
        inputs["pixel_values"] = torch.stack([m.pixel_values for m in request_input.mm_items])
    return inputs


def engine_logits(pipe, request_input) -> torch.Tensor:
    from engine.sequence import SamplingState, Sequence

    eng = pipe.engine
    ids = request_input.token_ids
    seq = Sequence(ids, SamplingState(GenerationConfig(), 0, frozenset()), len(ids) + 1, eng.block_size,
                   request_input.mm_items)

    def run():
        eng.block_manager.allocate(seq)
        try:
            assert seq.num_computed_tokens == 0
            return eng.runner.prompt_logits(seq)
        finally:
            eng.block_manager.deallocate(seq)

    return eng.run_on_engine_thread(run)


# ---- agreement with transformers ------------------------------------------------------------------------------
def test_llava15_one_image_matches_transformers(pipe15, llava15, ref15):
    img = image(60, 80, seed=0)
    prompt = ("What is in the picture?", img)
    request_input = pipe15.prompt_input(prompt)
    assert len(request_input.mm_items) == 1 and request_input.mm_items[0].length == 16  # (56 / 14) ** 2
    processor = hf_processor(llava15)
    text = pipe15.vision.render(pipe15.vision._messages([{"role": "user", "content": [
        {"type": "image", "image": img}, {"type": "text", "text": "What is in the picture?"}]}]))
    assert text == "USER: <image>\nWhat is in the picture? ASSISTANT:"
    theirs = processor(text=text, images=[img], return_tensors="pt")
    assert theirs["input_ids"][0].tolist() == request_input.token_ids  # count, expansion and BOS as transformers
    torch.testing.assert_close(request_input.mm_items[0].pixel_values, theirs["pixel_values"][0])
    assert pipe15(prompt, greedy(N)).token_ids == hf_generate(ref15, dict(theirs))


def test_llava15_two_images_in_chat_messages_match_transformers(pipe15, llava15, ref15):
    a, b = image(64, 64, seed=1), image(30, 90, seed=2)
    messages = [{"role": "user", "content": [image_part(a), {"type": "text", "text": "Compare these two:"},
                                             image_part(b)]}]
    request_input = pipe15.prompt_input(messages)
    assert [m.length for m in request_input.mm_items] == [16, 16]
    theirs = hf_processor(llava15)(text=pipe15.apply_chat_template(messages), images=[a, b], return_tensors="pt")
    assert theirs["input_ids"][0].tolist() == request_input.token_ids
    assert pipe15(messages, greedy(N)).token_ids == hf_generate(ref15, dict(theirs))


def test_llava_next_non_square_images_match_transformers(llava_next, ref_next, make_pipe):
    pipe = make_pipe(llava_next)
    wide, tall = image(40, 70, seed=3), image(90, 30, seed=4)
    messages = [{"role": "user", "content": [{"type": "image", "image": wide}, {"type": "text", "text": "and"},
                                             {"type": "image", "image": tall}]}]
    request_input = pipe.prompt_input(messages)
    items = request_input.mm_items
    assert [m.length for m in items] == [14, 22] and [m.pixel_values.shape[0] for m in items] == [5, 4]
    processor = hf_processor(llava_next, next_=True)
    theirs = processor(text=pipe.apply_chat_template(messages), images=[wide, tall], return_tensors="pt")
    assert theirs["input_ids"][0].tolist() == request_input.token_ids  # anyres counts as transformers'
    assert pipe(messages, greedy(N)).token_ids == hf_generate(ref_next, dict(theirs))
    one = pipe.prompt_input(("Describe it.", wide))  # a single non-square image, through the tuple form
    assert pipe(("Describe it.", wide), greedy(N)).token_ids == hf_generate(
        ref_next, hf_inputs(one, ref_next.config.image_token_id, next_=True))


@pytest.mark.parametrize("spelling", ["as_saved", "hub", "transformers5"])
def test_weight_spellings_give_transformers_logits(spelling, llava_next, ref_next, tmp_path, make_pipe):
    """NeXT (tower, projector, image_newline, language model): every spelling transformers has used loads."""
    path = llava_next
    if spelling != "as_saved":
        rename = hub_spelling if spelling == "hub" else v5_spelling
        path = rename_checkpoint(llava_next, tmp_path / spelling, rename)
    pipe = make_pipe(path, enable_prefix_caching=False)
    request_input = pipe.prompt_input(("What is this?", image(50, 30, seed=5)))
    inputs = hf_inputs(request_input, ref_next.config.image_token_id, next_=True)
    with torch.no_grad():
        theirs = ref_next(**inputs).logits[0]
    torch.testing.assert_close(engine_logits(pipe, request_input), theirs, atol=2e-4, rtol=2e-4)


def test_text_prompts_on_a_vision_model(pipe15):
    """llava-hf's template reads list contents only: string contents are sent to it as text parts."""
    assert pipe15.apply_chat_template([{"role": "user", "content": "hi"}]) == "USER: hi ASSISTANT:"
    out = pipe15("Hello there", greedy(4))
    assert len(out.token_ids) == 4 and pipe15.encode("Hello there")[0] == pipe15.tokenizer.bos_token_id


# ---- the original layout ----------------------------------------------------------------------------------------
def test_original_layout_with_separate_tower_matches_transformers(llava15, ref15, tmp_path, make_pipe):
    llava_dir, clip_dir = make_original_layout(llava15, tmp_path)
    pipe = make_pipe(llava_dir)
    assert pipe.engine.runner.model.vision.tower_folder == clip_dir
    img = image(48, 48, seed=6)  # square: the layout's "pad" aspect handling leaves it as it is
    request_input = pipe.prompt_input(("What is this?", img))
    text = pipe.tokenizer.decode(request_input.token_ids[: request_input.mm_items[0].offset])
    assert text.startswith("<s>A chat between a curious human") and text.endswith("USER: ")  # the vicuna fallback
    assert pipe(("What is this?", img), greedy(N)).token_ids == hf_generate(
        ref15, hf_inputs(request_input, ref15.config.image_token_id))


def test_original_layout_tower_from_override_and_embedded(llava15, ref15, tmp_path, make_pipe):
    img = image(40, 40, seed=7)
    hub_name = "openai/clip-vit-large-patch14-336"
    # mm_vision_tower names a hub id; the tower passed as vision_tower (the hub is never asked)
    llava_dir, clip_dir = make_original_layout(llava15, tmp_path / "override", tower_name=hub_name)
    pipe = make_pipe(llava_dir, vision_tower=str(clip_dir))
    expected = hf_generate(ref15, hf_inputs(pipe.prompt_input(("Hi", img)), ref15.config.image_token_id))
    assert pipe(("Hi", img), greedy(N)).token_ids == expected
    # the tower's weights saved inside the folder; the CLIP folder only gives its config
    llava_dir, clip_dir = make_original_layout(llava15, tmp_path / "embedded", embed_tower=True)
    (clip_dir / "model.safetensors").unlink()
    pipe = make_pipe(llava_dir)
    assert pipe.engine.runner.model.vision.tower_folder is None
    assert pipe(("Hi", img), greedy(N)).token_ids == expected


def test_original_layout_missing_tower_says_what_to_pass(llava15, tmp_path, monkeypatch):
    from engine import checkpoint, loader
    from studio.manager import ModelManager

    llava_dir, _ = make_original_layout(llava15, tmp_path / "local", tower_name="/nowhere/clip-vit-large-patch14-336")
    with pytest.raises(ModelLoadError) as e:
        ModelManager.check(llava_dir)  # the cheap checks see it already
    assert "mm_vision_tower = '/nowhere/clip-vit-large-patch14-336'" in str(e.value)
    assert "--vision-tower PATH" in str(e.value) and "vision_tower=PATH" in str(e.value)

    def offline(model, offline_reason=None):
        raise ModelLoadError(f"model path {model!r} does not exist locally, and the hub cannot be reached")

    monkeypatch.setattr(checkpoint, "resolve_model_path", offline)
    llava_dir, _ = make_original_layout(llava15, tmp_path / "hub", tower_name="openai/clip-vit-large-patch14-336")
    with pytest.raises(ModelLoadError) as e:
        loader.read_model_spec(llava_dir)
    message = str(e.value)
    assert "'openai/clip-vit-large-patch14-336'" in message and "could not be fetched from the hub" in message
    assert "huggingface-cli download openai/clip-vit-large-patch14-336" in message and "--vision-tower" in message
    with pytest.raises(ModelLoadError, match="not a CLIP checkpoint folder"):
        loader.read_model_spec(llava_dir, vision_tower=str(tmp_path / "no-such-folder"))


# ---- prefix cache, chunked prefill, encoder cache -----------------------------------------------------------
def test_prefix_cache_shares_blocks_for_the_same_image_only(llava15, ref15, make_pipe):
    pipe = make_pipe(llava15)
    manager = pipe.engine.block_manager
    x, y = image(56, 56, seed=8), image(56, 56, seed=9)
    text = "Tell me everything about this image, in detail."
    first = pipe((text, x), greedy(N))
    ids = pipe.encode((text, x))
    assert len(ids) >= 48  # the image's 16 placeholders lie in the first full block(s)
    full_blocks = (len(ids) - 1) // 16
    hits = manager.num_prefix_hits
    again = pipe((text, x), greedy(N))
    assert manager.num_prefix_hits - hits == full_blocks  # the same image: every full prompt block reused
    assert again.token_ids == first.token_ids
    hits = manager.num_prefix_hits
    other = pipe((text, y), greedy(N))
    assert manager.num_prefix_hits == hits  # another image behind the same placeholder ids: no block shared
    assert other.token_ids == hf_generate(ref15, hf_inputs(pipe.prompt_input((text, y)),
                                                           ref15.config.image_token_id))
    assert other.token_ids != first.token_ids


@pytest.mark.parametrize("encoder_cache_bytes", [0, 2**20])
def test_chunked_prefill_through_an_image(encoder_cache_bytes, llava15, ref15, make_pipe):
    """Chunks of 16 tokens cut the image's 16 placeholders in two; with no encoder cache each chunk encodes the
    image again and takes its own rows."""
    pipe = make_pipe(llava15, max_prefill_token_num=16, encoder_cache_bytes=encoder_cache_bytes)
    img = image(70, 50, seed=10)
    request_input = pipe.prompt_input(("Say something about this picture.", img))
    item = request_input.mm_items[0]
    assert item.offset % 16 != 0 and item.offset < 16 < item.end  # the image straddles the first chunk boundary
    expected = hf_generate(ref15, hf_inputs(request_input, ref15.config.image_token_id))
    assert pipe(("Say something about this picture.", img), greedy(N)).token_ids == expected
    cache = pipe.memory()
    assert cache["encoder_cache_entries"] == (1 if encoder_cache_bytes else 0)
    assert cache["encoder_cache_misses"] == (1 if encoder_cache_bytes else 2)
    # a raw prompt that ends in the image, its last placeholder fed by a decode step after a 16-token chunk
    raw = pipe.prompt_input(("", img), apply_chat_template=False)
    assert len(raw.token_ids) == 18 and raw.mm_items[0].end == 17  # <s>, 16 placeholders, "\n"
    raw_end = type(raw)(raw.token_ids[:17], raw.mm_items)
    outputs = []
    done = threading.Event()

    def collect(out):
        outputs.append(out)
        if out.finished:
            done.set()

    pipe.engine.add_request(raw_end, greedy(N), collect)
    assert done.wait(60)
    tokens = [t for out in outputs for t in out.token_ids]
    assert tokens == hf_generate(ref15, hf_inputs(raw_end, ref15.config.image_token_id))


def test_one_tower_batch_for_all_images_of_a_prefill_step(pipe15, ref15, monkeypatch):
    model = pipe15.engine.runner.model
    calls = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda items: calls.append(len(items)) or encode(items))
    prompts = [("First picture.", image(50, 60, seed=20)),
               [{"role": "user", "content": [image_part(image(64, 32, seed=21)), image_part(image(32, 64, seed=22)),
                                             {"type": "text", "text": "Two more."}]}]]
    replies = pipe15(prompts, greedy(N))
    assert calls == [3]  # both requests prefill in one step: their three images go through the tower together
    for prompt, reply in zip(prompts, replies):
        assert reply.token_ids == hf_generate(ref15, hf_inputs(pipe15.prompt_input(prompt),
                                                               ref15.config.image_token_id))


def test_encoder_cache_serves_later_turns_and_memory_is_reported(llava15, make_pipe):
    pipe = make_pipe(llava15, enable_prefix_caching=False)
    img = image(56, 56, seed=11)
    url = data_url(img)
    turn1 = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "What is it?"}]}]
    reply = pipe(turn1, greedy(4)).text
    turn2 = turn1 + [{"role": "assistant", "content": reply},
                     {"role": "user", "content": [{"type": "text", "text": "Are you sure?"}]}]
    pipe(turn2, greedy(4))
    memory = pipe.memory()
    assert memory["encoder_cache_misses"] == 1 and memory["encoder_cache_hits"] >= 1
    assert memory["encoder_cache_entries"] == 1 and memory["encoder_cache_bytes"] == 16 * 64 * 4
    model = pipe.engine.runner.model
    vision = sum(p.numel() * 4 for m in (model.vision_tower, model.multi_modal_projector) for p in m.parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    assert memory["vision_bytes"] == vision > 0 and memory["weights_bytes"] + memory["vision_bytes"] == total
    from engine.vision_input import ImageRef

    assert pipe.vision.process(ImageRef(url, False)) is pipe.vision.process(ImageRef(url, False))  # memo by content


# ---- bad images -------------------------------------------------------------------------------------------------
def test_bad_images_raise_clear_errors_and_others_keep_running(llava15, tmp_path, make_pipe):
    allowed = tmp_path / "media"
    allowed.mkdir()
    image(30, 30, seed=12).save(allowed / "ok.png")
    image(30, 30, seed=12).save(tmp_path / "outside.png")
    pipe = make_pipe(llava15, limit_images_per_prompt=2, max_image_bytes=64 * 1024, max_image_pixels=300 * 300,
                     allowed_local_media_path=str(allowed))
    good = ("Describe the picture.", image(40, 40, seed=13))
    stream = pipe.stream(good, greedy(24))
    first = next(stream)  # the good request is running

    def ask(*parts):
        return pipe.encode([{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}])

    def url_part(url):
        return {"type": "image_url", "image_url": {"url": url}}

    cases = [
        (url_part("data:image/png;base64," + base64.b64encode(b"not an image at all").decode()), "not an image"),
        (url_part("data:image/png;base64,%%%not-base64"), "not valid base64"),
        (url_part("data:text/plain;base64," + base64.b64encode(b"hello").decode()), "not an image"),
        (url_part(data_url(Image.new("RGB", (400, 400), "red"))), "pixels"),  # 160000 > 90000
        (url_part("data:image/png;base64," + "A" * (100 * 1024)), "larger than"),
        (url_part("http://127.0.0.1:9/cat.png"), "--allow-media-urls"),
        (url_part(str(tmp_path / "outside.png")), "allowed media folder"),
        (url_part("ftp://host/cat.png"), "unsupported image URL scheme"),
        ({"type": "image_url", "image_url": {}}, "image_url part needs"),
    ]
    for part, words in cases:
        with pytest.raises(InvalidImageError, match=words):
            ask(part)
    with pytest.raises(InvalidImageError, match="at most 2"):
        ask(*[url_part(data_url(image(20, 20, seed=s))) for s in range(3)])
    with pytest.raises(InvalidImageError, match="marker"):
        pipe.encode((f"{IMAGE_TOKEN} {IMAGE_TOKEN}", [image(20, 20, seed=1)]))
    with pytest.raises(InvalidImageError, match="no image file"):
        pipe.encode(("what?", tmp_path / "missing.png"))
    assert len(ask(url_part(str(allowed / "ok.png")))) > 16  # inside the allowed folder: fine
    assert len(pipe.encode(("what?", tmp_path / "outside.png"))) > 16  # Python callers' paths are trusted
    with pytest.raises(InvalidImageError):
        pipe(("Describe", b"\x89PNG garbage"), greedy(4))  # through __call__ too
    tokens = list(first.token_ids) + [t for delta in stream for t in delta.token_ids]
    assert len(tokens) == 24  # the running request was never disturbed


def test_a_request_failing_in_the_vision_tower_fails_alone(pipe15):
    """An item that slipped past the checks (wrong pixel shape) fails its own request in the step; the request
    prefilled with it in the same step completes."""
    from engine.inputs import MultiModalItem, RequestInput

    good = ("Describe the picture.", image(40, 40, seed=15))
    ids = pipe15.encode(good)
    item = pipe15.prompt_input(good).mm_items[0]
    bad = RequestInput(ids, (MultiModalItem(item.offset, item.length, 12345, pixel_values=torch.zeros(3, 28, 28)),))
    results: dict[str, list] = {"good": [], "bad": []}
    done = {k: threading.Event() for k in results}

    def collect(key):
        def callback(out):
            results[key].append(out)
            if out.finished:
                done[key].set()
        return callback

    pipe15.engine.add_request(bad, greedy(8), collect("bad"))
    pipe15.engine.add_request(pipe15.prompt_input(good), greedy(8), collect("good"))
    assert done["good"].wait(60) and done["bad"].wait(60)
    assert results["bad"][-1].finish_reason == "error"
    assert results["good"][-1].finish_reason == "length"
    assert sum(len(o.token_ids) for o in results["good"]) == 8


def test_text_only_models_refuse_images_as_before(llama_path, make_pipe):
    pipe = make_pipe(llama_path)
    with pytest.raises(ImageInputError, match="takes no images"):
        pipe.encode([{"role": "user", "content": [image_part(image(8, 8, seed=0))]}])
    with pytest.raises(ImageInputError, match="takes no images"):
        pipe(("What is this?", image(8, 8, seed=0)), greedy(2))
    assert isinstance(pipe.prompt_input("hi"), list)


def test_vision_settings_are_validated():
    with pytest.raises(ValueError, match="limit_images_per_prompt"):
        EngineConfig(limit_images_per_prompt=-1)


def test_terminal_chat_attaches_images(llava15, tmp_path, monkeypatch, capsys):
    from studio import chat

    image(30, 30, seed=16).save(tmp_path / "cat.png")
    lines = iter([f"/image {tmp_path / 'cat.png'}", "What is it?", f"/image {tmp_path / 'none.png'}", "Thanks",
                  "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat.main([str(llava15), "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu",
                      "--cache-max-entry-count", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "1 image(s) attached" in out and "No such file" in out and out.count("tokens,") == 2


# ---- real checkpoints' configs (no weights): partial hub configs, feature counts --------------------------------
LLAVA15_7B_HF = {  # llava-hf/llava-1.5-7b-hf's config.json: the text and vision parts list only non-defaults
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
LLAVA_NEXT_MISTRAL_HF = {  # llava-hf/llava-v1.6-mistral-7b-hf
    "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100, "image_grid_pinpoints": PINPOINTS_336,
    "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
                    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                    "sliding_window": None, "torch_dtype": "bfloat16", "vocab_size": 32064},
    "torch_dtype": "float16", "use_image_newline_parameter": True,
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
LLAVA16_VICUNA_ORIGINAL = {  # liuhaotian/llava-v1.6-vicuna-7b (abridged: the keys the engine reads)
    "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32000, "rope_theta": 10000.0,
    "image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS_336, "mm_hidden_size": 1024,
    "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "torch_dtype": "bfloat16",
}
CLIP_L_336 = {  # openai/clip-vit-large-patch14-336's config.json, vision part (a CLIPModel config)
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
    "text_config": {"hidden_size": 768, "num_hidden_layers": 12},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}


def _folder(path, config):
    import json

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_hub_configs_parse_with_transformers_defaults(tmp_path):
    from engine import loader

    spec = loader.read_model_spec(_folder(tmp_path / "l15", LLAVA15_7B_HF))
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.intermediate_size, spec.vocab_size) == (
        4096, 32, 32, 11008, 32064)
    vision = spec.vision
    assert (vision.clip.hidden_size, vision.clip.num_layers, vision.layers_run, vision.image_token_id) == (
        1024, 24, 23, 32000)
    assert vision.num_features((480, 640)) == 576 and vision.clip.hidden_act == "quick_gelu"

    spec = loader.read_model_spec(_folder(tmp_path / "next", LLAVA_NEXT_MISTRAL_HF))
    assert spec.architecture == "LlavaNextForConditionalGeneration" and spec.num_kv_heads == 8
    assert spec.rope_theta == 1e6 and spec.sliding_window is None and spec.max_position_embeddings == 32768
    assert spec.vision.anyres and spec.vision.num_features((672, 672)) == 2928  # 576 + 48 * (48 + 1)
    assert spec.vision.num_tiles((672, 672)) == 5 and spec.vision.num_tiles((336, 1008)) == 4


def test_original_next_config_with_its_clip_tower(tmp_path):
    from safetensors.torch import save_file

    from engine import loader

    clip = _folder(tmp_path / "clip", CLIP_L_336)
    save_file({"logit_scale": torch.zeros(())}, str(clip / "model.safetensors"))
    spec = loader.read_model_spec(_folder(tmp_path / "llava", LLAVA16_VICUNA_ORIGINAL), vision_tower=str(clip))
    vision = spec.vision
    assert vision.layout == "original" and vision.anyres and not vision.pad_to_square
    assert vision.clip.image_size == 336 and vision.tower_folder == clip and vision.image_token_id is None
    assert vision.num_features((672, 672)) == 2928 and vision.num_features((480, 640)) == 576 + 36 * 49


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llava_on_the_gpu(llava_next, ref_next):
    """Triton kernels, CUDA graphs for decode and the overlapped step loop with images: fp32 agrees with
    transformers (on the CPU); fp16 runs the same path (tower and projector in half) and stays close."""
    from engine import pipeline

    wide = image(40, 70, seed=3)
    prompts = [("Describe it.", wide), ("And this one?", image(90, 30, seed=4))]
    replies = {}
    for dtype in ("float32", "float16"):
        pipe = pipeline(llava_next, EngineConfig(dtype=dtype, cache_block_seq_len=16, num_gpu_blocks=256,
                                                 max_prefill_token_num=32))  # chunks cut the images
        try:
            assert pipe.engine.device.type == "cuda" and pipe.engine.runner.graphs is not None
            replies[dtype] = [r.token_ids for r in pipe(prompts, greedy(N))]
            expected = [hf_generate(ref_next, hf_inputs(pipe.prompt_input(p), ref_next.config.image_token_id,
                                                         next_=True)) for p in prompts]
            memory = pipe.memory()
            assert memory["vision_bytes"] > 0 and memory["encoder_cache_entries"] == 2
        finally:
            pipe.close()
        if dtype == "float32":
            assert replies[dtype] == expected
    assert all(len(r) == N for r in replies["float16"])
    assert sum(a[0] == b[0] for a, b in zip(replies["float16"], replies["float32"])) >= 1
