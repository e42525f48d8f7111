"""LLaVA through `python -m quant`: the language model becomes W4A16 (AutoAWQ GEMM), the vision tower, projector and
NeXT's image_newline stay as they were (16-bit), and the engine loads the folder and chats with images.

References: the quantizer's own dequantizing loader (quant.reference_loader: transformers' Llava classes holding
the dequantized language model) for the engine's AWQ path (same weights: logits within 1e-3, greedy tokens equal);
the 16-bit engine for how far 4 bits move the logits on these random weights (loose); quant_policy 0 for KV int8 /
int4 with images (test_kv_quant.py's bounds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, pipeline
from tests.engine.test_llava import engine_logits, hf_generate, hf_inputs, image, image_part
from tests.llava_factory import make_llava, make_original_layout
from tests.quant.conftest import GROUP_SIZE

REPO = Path(__file__).resolve().parents[2]
KV_BOUND = {8: 0.015, 4: 0.15}  # relative L2 error of prompt logits vs quant_policy 0 (tests/engine/test_kv_quant.py)
N = 12


def quantize(src: Path, out: Path, calib: Path) -> Path:
    cmd = [sys.executable, "-m", "quant", str(src), "--work-dir", str(out), "--calib-dataset", str(calib),
           "--calib-samples", "4", "--calib-seqlen", "32", "--w-group-size", str(GROUP_SIZE), "--device", "cpu",
           "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    return out


def to_fp16(path: Path) -> Path:
    """The folder with every tensor in fp16 and config.json saying so (as hub LLaVA checkpoints are)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    for part in (cfg, cfg.get("text_config") or {}, cfg.get("vision_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in part:
                part[key] = "float16"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory, calib_txt):
    """{name: (source folder, quantized folder)}: LLaVA-1.5 (fp32) and LLaVA-NeXT (fp16), llava-hf layout."""
    root = tmp_path_factory.mktemp("llava-awq")
    src15 = make_llava(root / "llava-1.5")
    src_next = to_fp16(make_llava(root / "llava-next", next_=True, seed=1))
    return {"1.5": (src15, quantize(src15, root / "llava-1.5-awq", calib_txt)),
            "next": (src_next, quantize(src_next, root / "llava-next-awq", calib_txt))}


@pytest.fixture
def make_pipe():
    pipes = []

    def make(path, **overrides):
        settings = dict(cache_block_seq_len=16, max_prefill_token_num=256, cpu_kv_cache_bytes=32 * 2**20)
        pipe = pipeline(path, EngineConfig(**{**settings, **overrides}))
        pipes.append(pipe)
        return pipe

    yield make
    for pipe in pipes:
        pipe.close()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def greedy(n: int = N):
    from engine import GenerationConfig

    return GenerationConfig(max_new_tokens=n, do_sample=False, ignore_eos=True)


@pytest.mark.parametrize("name", ["1.5", "next"])
def test_folder_quantizes_the_language_model_only(folders, name):
    src, out = folders[name]
    cfg = json.loads((out / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["bits"] == 4 and qcfg["version"] == "gemm"
    assert qcfg["group_size"] == GROUP_SIZE and qcfg["zero_point"] is True
    assert {"vision_tower", "multi_modal_projector", "lm_head"} <= set(qcfg["modules_to_not_convert"])
    source_cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == source_cfg["architectures"]
    assert cfg["vision_config"] == source_cfg["vision_config"]
    for side in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / side).read_bytes() == (src / side).read_bytes(), side
    before, after = tensors(src), tensors(out)
    kept = [k for k in before if not k.startswith("language_model.")]
    assert any(k.startswith("vision_tower.") for k in kept) and any(k.startswith("multi_modal_projector.")
                                                                    for k in kept)
    assert ("image_newline" in kept) == (name == "next")
    for k in kept:  # fp16 sources byte for byte; fp32 ones as fp16
        expected = before[k] if before[k].dtype == torch.float16 else before[k].half()
        assert after[k].dtype == torch.float16 and torch.equal(after[k], expected), k
    if name == "next":
        assert all(before[k].dtype == torch.float16 for k in kept)
    assert not any(k.startswith(("vision_tower.", "multi_modal_projector.")) and k.endswith(("qweight", "scales"))
                   for k in after)
    lm = "language_model.model.layers.0."
    for linear in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj"):
        assert after[f"{lm}{linear}.qweight"].dtype == torch.int32 and f"{lm}{linear}.weight" not in after
    assert "language_model.lm_head.weight" in after and "language_model.model.embed_tokens.weight" in after
    report = json.loads((out / "quant_report.json").read_text())
    assert report["source_format"] == "llava" and len(report["layers"]) == 2


@pytest.mark.parametrize("name", ["1.5", "next"])
def test_engine_runs_it_with_images_as_the_dequantized_reference(folders, name, make_pipe):
    from engine.layers.awq_linear import AWQLinear
    from quant.reference_loader import load_awq_as_fp

    src, out = folders[name]
    pipe = make_pipe(out)
    assert pipe.engine.model_format == "awq"
    model = pipe.engine.runner.model
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, AWQLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, AWQLinear)
    vision_parts = [model.vision_tower, model.multi_modal_projector]
    assert not any(isinstance(m, AWQLinear) for part in vision_parts for m in part.modules())
    assert all(p.is_floating_point() for part in vision_parts for p in part.parameters())
    ref = load_awq_as_fp(out, torch.float32)
    img = image(50, 70, seed=11)
    prompt = ("Describe", img)
    request_input = pipe.prompt_input(prompt)
    inputs = hf_inputs(request_input, ref.config.image_token_id, next_=name == "next")
    with torch.no_grad():
        theirs = ref(**inputs).logits[0].float()
    ours = engine_logits(pipe, request_input)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < 1e-3, rel  # same dequantized weights (fp16 scales in both)
    assert pipe(prompt, greedy()).token_ids == hf_generate(ref, inputs, N)
    # 4 bits against the 16-bit engine of the source: near, not equal (random weights at unit activation scale)
    fp = make_pipe(src)
    base = engine_logits(fp, fp.prompt_input(prompt))
    drift = ((ours - base).norm() / base.norm()).item()
    print(f"\nllava {name}: W4A16 prompt logits vs 16-bit engine, relative L2 {drift:.3f}")
    assert drift < 0.3, drift  # measured 0.13 (1.5 and NeXT)
    # an OpenAI-style message with an image_url part, as the UI and the API send it
    messages = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "Describe"}]}]
    assert len(pipe(messages, greedy(4)).token_ids) == 4


@pytest.mark.parametrize("quant_policy", [8, 4])
@pytest.mark.parametrize("which", ["source", "awq"])
def test_kv_quant_with_images(folders, make_pipe, quant_policy, which):
    """KV int8 / int4 on a LLaVA (16-bit and W4A16): prompt logits with an image stay near quant_policy 0, and the
    reply is generated through the quantized cache."""
    src, out = folders["1.5"]
    path = src if which == "source" else out
    base, quant = make_pipe(path), make_pipe(path, quant_policy=quant_policy)
    prompt = ("What is in the picture, and what colour is it?", image(56, 56, seed=12))
    request_input = base.prompt_input(prompt)
    assert len(request_input.mm_items) == 1
    ref, got = engine_logits(base, request_input), engine_logits(quant, quant.prompt_input(prompt))
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < KV_BOUND[quant_policy], f"relative error {rel:.4f}"
    a, b = base(prompt, greedy(16)).token_ids, quant(prompt, greedy(16)).token_ids
    assert len(b) == 16
    agree = sum(x == y for x, y in zip(a, b)) / 16
    print(f"\nllava-1.5 {which} quant_policy={quant_policy}: prompt logits rel {rel:.4f}, greedy agreement {agree:.2f}")
    if quant_policy == 8:
        assert b[0] == a[0]


def test_original_layout_quantizes_to_the_same_language_model(folders, calib_txt, tmp_path, make_pipe):
    """liuhaotian layout (LlavaLlamaForCausalLM, model.mm_projector.*, separate CLIP tower): its own names come
    back, the projector stays 16-bit, and the quantized language model is the llava-hf folder's, tensor for tensor."""
    src15, out15 = folders["1.5"]
    llava_dir, clip_dir = make_original_layout(src15, tmp_path / "original")
    out = quantize(llava_dir, tmp_path / "original-awq", calib_txt)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {"vision_tower", "mm_projector", "lm_head"} <= set(qcfg["modules_to_not_convert"])
    got, hf = tensors(out), tensors(out15)
    source = tensors(llava_dir)
    for k in ("model.mm_projector.0.weight", "model.mm_projector.2.bias"):
        assert torch.equal(got[k], source[k].half())
    qweights = [k for k in got if k.endswith(".qweight")]
    assert len(qweights) == 14
    for k in qweights:
        assert torch.equal(got[k], hf["language_model." + k]), k
    pipe, ref = make_pipe(out), make_pipe(out15)
    assert pipe.engine.model_format == "awq" and pipe.engine.runner.model.vision.tower_folder == clip_dir
    prompt = ("What is this?", image(48, 48, seed=13))
    req, ref_req = pipe.prompt_input(prompt), ref.prompt_input(prompt)
    # the same projector (fp16 in both) and tower: the separate CLIP folder's fp32 weights here, the llava-hf
    # folder's fp16 copy there, so the image features agree to fp16 rounding
    torch.testing.assert_close(pipe.engine.runner.model.encode_images(req.mm_items)[0],
                               ref.engine.runner.model.encode_images(ref_req.mm_items)[0], atol=1e-2, rtol=1e-2)
    assert len(pipe(prompt, greedy(4)).token_ids) == 4


def test_group_sizes_come_from_the_language_model(folders, tmp_path):
    """A llava-hf config.json is partial (hub files leave most of text_config to transformers' defaults): the group
    sizes offered and checked are the language model's, filled the same way."""
    from quant.api import fitting_group_sizes, validate_settings
    from ui.quantize_tab import fitting_group_size

    src, _ = folders["1.5"]
    cfg = json.loads((src / "config.json").read_text())
    assert fitting_group_sizes(cfg) == [64, 32]  # hidden 64, intermediate 128
    assert fitting_group_size(str(src)) == 64  # the Quantize tab's choice
    with pytest.raises(ValueError, match="--w-group-size 128 does not divide"):
        validate_settings(cfg, 4, 128)
    hub_like = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                "text_config": {"model_type": "llama", "vocab_size": 32064}, "vision_config": {}}
    assert fitting_group_sizes(hub_like) == [128, 64, 32]  # Llama-2-7B's 4096 / 11008
    validate_settings(hub_like, 4, 128)


def test_transformers5_spelling_keeps_its_names(folders, calib_txt, tmp_path, make_pipe):
    """model.language_model.* / lm_head / model.vision_tower.* (as transformers 5 saves LLaVA) come back in that
    spelling, with the same quantized language model as the llava-hf-4 spelling."""
    from tests.llava_factory import rename_checkpoint, v5_spelling

    src15, out15 = folders["1.5"]
    src = rename_checkpoint(src15, tmp_path / "v5", v5_spelling)
    out = quantize(src, tmp_path / "v5-awq", calib_txt)
    got, hf, source = tensors(out), tensors(out15), tensors(src)
    assert "lm_head.weight" in got and not any(k.startswith("language_model.") for k in got)
    for k, t in source.items():
        if not k.startswith(("model.language_model.", "lm_head")):
            assert torch.equal(got[k], t.half()), k
    for k in (k for k in got if k.endswith(".qweight")):
        assert torch.equal(got[k], hf["language_model.model." + k[len("model.language_model."):]]), k
    pipe, ref = make_pipe(out), make_pipe(out15)
    assert pipe.engine.model_format == "awq"
    prompt = ("Describe", image(40, 60, seed=14))
    torch.testing.assert_close(engine_logits(pipe, pipe.prompt_input(prompt)),
                               engine_logits(ref, ref.prompt_input(prompt)), atol=1e-5, rtol=1e-5)
