"""InternVL through `python -m quant`, both layouts: the language model becomes W4A16 (AutoAWQ GEMM), the vision tower
and projector stay 16-bit byte for byte (named in modules_to_not_convert), and the engine loads the folder and chats
with images. The -hf folder agrees with the quantizer's own dequantizing loader (transformers'
InternVLForConditionalGeneration holding the dequantized language model); the original-layout folder (renamed from
the same source) quantizes to the same integers and gives the engine the same logits as the -hf one."""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine.test_internvl import hf_generate, hf_logits, image
from tests.engine.test_llava import engine_logits, image_part
from tests.internvl_factory import make_internvl, make_original_layout, original_names, with_internlm2_decoder
from tests.quant.conftest import GROUP_SIZE
from tests.quant.test_llava_awq import greedy, make_pipe, quantize, tensors, to_fp16  # noqa: F401 - fixture

N = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory, calib_txt):
    """{"hf": (source, quantized), "original": (source, quantized)} from one fp16 InternVL."""
    root = tmp_path_factory.mktemp("internvl-awq")
    src = to_fp16(make_internvl(root / "internvl-hf"))
    orig = make_original_layout(src, root / "InternVL2_5")
    return {"hf": (src, quantize(src, root / "internvl-hf-awq", calib_txt)),
            "original": (orig, quantize(orig, root / "internvl-orig-awq", calib_txt))}


VISION_ROOTS = {"hf": ("vision_tower.", "multi_modal_projector."), "original": ("vision_model.", "mlp1.")}


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_folder_quantizes_the_language_model_only(folders, layout):
    src, out = folders[layout]
    cfg = json.loads((out / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["bits"] == 4 and qcfg["group_size"] == GROUP_SIZE
    roots = VISION_ROOTS[layout]
    assert {r.rstrip(".") for r in roots} <= set(qcfg["modules_to_not_convert"])
    source_cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == source_cfg["architectures"] and cfg["vision_config"] == source_cfg["vision_config"]
    before, after = tensors(src), tensors(out)
    kept = [k for k in before if k.startswith(roots)]
    assert kept and all(before[k].dtype == torch.float16 for k in kept)
    for k in kept:
        assert torch.equal(after[k], before[k]), k  # bit-identical
    assert not any(k.startswith(roots) and k.endswith(("qweight", "scales")) for k in after)
    for linear in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert after[f"language_model.model.layers.0.{linear}.qweight"].dtype == torch.int32
    report = json.loads((out / "quant_report.json").read_text())
    assert len(report["layers"]) == 2


def test_both_layouts_quantize_to_the_same_language_model(folders):
    (_, hf_out), (_, orig_out) = folders["hf"], folders["original"]
    hf, orig = tensors(hf_out), tensors(orig_out)
    as_original = original_names({k: v for k, v in hf.items() if not k.endswith(("qweight", "qzeros", "scales"))})
    for name, t in hf.items():
        if name.startswith("language_model.") and name.endswith(("qweight", "qzeros", "scales")):
            assert torch.equal(orig[name], t), name
    for name, t in as_original.items():
        assert torch.equal(orig[name], t), name


def test_engine_chats_with_an_image_as_the_dequantized_reference(folders, make_pipe):  # noqa: F811
    from engine.layers.awq_linear import AWQLinear
    from quant.reference_loader import load_awq_as_fp

    _, out = folders["hf"]
    pipe = make_pipe(out)
    assert pipe.engine.model_format == "awq"
    model = pipe.engine.runner.model
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, AWQLinear)
    assert not any(isinstance(m, AWQLinear) for m in model.vision_tower.modules())
    ref = load_awq_as_fp(out, torch.float32)
    prompt = ("Describe", image(84, 230, seed=11))
    request_input = pipe.prompt_input(prompt)
    ours, theirs = engine_logits(pipe, request_input), hf_logits(ref, request_input)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < 1e-3, rel  # the same dequantized weights (fp16 tower in both)
    assert pipe(prompt, greedy()).token_ids == hf_generate(ref, request_input, N)
    messages = [{"role": "user", "content": [image_part(image(60, 60, seed=12)), {"type": "text", "text": "Hi"}]}]
    assert len(pipe(messages, greedy(4)).token_ids) == 4


def test_original_layout_folder_loads_and_chats(folders, make_pipe):  # noqa: F811
    pipe_o, pipe_h = make_pipe(folders["original"][1]), make_pipe(folders["hf"][1])
    assert pipe_o.engine.model_format == "awq"
    request_input = pipe_o.prompt_input(("Describe", image(84, 230, seed=11)))
    torch.testing.assert_close(engine_logits(pipe_o, request_input), engine_logits(pipe_h, request_input),
                               atol=1e-4, rtol=1e-4)
    assert len(pipe_o(("Hi", image(60, 60, seed=12)), greedy(4)).token_ids) == 4


def test_group_sizes_come_from_the_language_model(folders):
    from quant.api import fitting_group_sizes
    from tests.engine.test_internvl import INTERNVL3_8B_HF, INTERNVL25_8B

    for layout in ("hf", "original"):
        cfg = json.loads((folders[layout][0] / "config.json").read_text())
        assert fitting_group_sizes(cfg) == [64, 32]
    assert fitting_group_sizes(INTERNVL3_8B_HF) == [128, 64, 32] and fitting_group_sizes(INTERNVL25_8B) == [128, 64, 32]


def test_original_layout_with_an_internlm2_decoder(calib_txt, tmp_path, make_pipe):  # noqa: F811
    """InternVL2_5-8B's layout: the InternLM2 decoder quantizes through its Llama mapping and is written back in its
    own names (packed wqkv), vision_model / mlp1 kept; the engine loads it and gives the logits of the same model
    quantized from its -hf (Llama decoder) twin."""
    hf = to_fp16(make_internvl(tmp_path / "llama-hf", text_model="llama", seed=3))
    orig = with_internlm2_decoder(make_original_layout(hf, tmp_path / "orig"))
    out = quantize(orig, tmp_path / "orig-awq", calib_txt)
    before, after = tensors(orig), tensors(out)
    assert after["language_model.model.layers.0.attention.wqkv.qweight"].dtype == torch.int32
    assert "language_model.output.weight" in after and "language_model.lm_head.weight" not in after
    kept = [k for k in before if k.startswith(("vision_model.", "mlp1."))]
    assert kept and all(torch.equal(after[k], before[k]) for k in kept)
    assert {"mlp1", "vision_model"} <= set(json.loads((out / "config.json").read_text())["quantization_config"][
        "modules_to_not_convert"])
    hf_out = quantize(hf, tmp_path / "hf-awq", calib_txt)
    pipe_o, pipe_h = make_pipe(out), make_pipe(hf_out)
    request_input = pipe_o.prompt_input(("Describe", image(84, 230, seed=11)))
    torch.testing.assert_close(engine_logits(pipe_o, request_input), engine_logits(pipe_h, request_input),
                               atol=1e-4, rtol=1e-4)
