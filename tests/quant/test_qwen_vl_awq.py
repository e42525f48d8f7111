"""Qwen2.5-VL through `python -m quant`: the language model becomes W4A16 (AutoAWQ GEMM), the vision tower and merger
(`visual`) stay 16-bit byte for byte (named in modules_to_not_convert), and the engine loads the folder and chats with
images, agreeing with the quantizer's own dequantizing loader (transformers' Qwen2_5_VLForConditionalGeneration
holding the dequantized language model)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine.test_llava import engine_logits, image_part
from tests.engine.test_qwen2_vl import hf_generate, hf_logits, image
from tests.quant.conftest import GROUP_SIZE
from tests.quant.test_llava_awq import greedy, make_pipe, quantize, tensors, to_fp16  # noqa: F401 - fixture
from tests.qwen_vl_factory import make_qwen_vl

N = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory, calib_txt):
    """(source, quantized) for a fp16 Qwen2.5-VL in transformers 5's nested config and a tied fp16 Qwen2-VL in the
    hub's flat one."""
    root = tmp_path_factory.mktemp("qwen-vl-awq")
    src = to_fp16(make_qwen_vl(root / "qwen2.5-vl"))
    src2 = to_fp16(make_qwen_vl(root / "qwen2-vl", v25=False, tie=True, flat=True, seed=1))
    return {"2.5": (src, quantize(src, root / "qwen2.5-vl-awq", calib_txt)),
            "2": (src2, quantize(src2, root / "qwen2-vl-awq", calib_txt))}


@pytest.mark.parametrize("name", ["2.5", "2"])
def test_folder_quantizes_the_language_model_only(folders, name):
    src, out = folders[name]
    cfg = json.loads((out / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["bits"] == 4 and qcfg["group_size"] == GROUP_SIZE
    assert "visual" in qcfg["modules_to_not_convert"]
    source_cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == source_cfg["architectures"] and cfg["vision_config"] == source_cfg["vision_config"]
    assert (out / "preprocessor_config.json").read_bytes() == (src / "preprocessor_config.json").read_bytes()
    before, after = tensors(src), tensors(out)
    kept = [k for k in before if k.startswith("visual.")]
    assert kept and all(before[k].dtype == torch.float16 for k in kept)
    for k in kept:
        assert torch.equal(after[k], before[k]), k  # bit-identical
    assert not any(k.startswith("visual.") and k.endswith(("qweight", "scales")) for k in after)
    for linear in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert after[f"model.layers.0.{linear}.qweight"].dtype == torch.int32
    assert ("lm_head.weight" in after) == (name == "2.5")  # Qwen2-VL here ties its embeddings
    report = json.loads((out / "quant_report.json").read_text())
    assert report["source_format"] == "qwen2_vl" and len(report["layers"]) == 2


@pytest.mark.parametrize("name", ["2.5", "2"])
def test_engine_chats_with_an_image_as_the_dequantized_reference(folders, name, make_pipe):  # noqa: F811
    from engine.layers.awq_linear import AWQLinear
    from quant.reference_loader import load_awq_as_fp

    src, out = folders[name]
    pipe = make_pipe(out)
    assert pipe.engine.model_format == "awq"
    model = pipe.engine.runner.model
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, AWQLinear)
    assert not any(isinstance(m, AWQLinear) for m in model.visual.modules())
    ref = load_awq_as_fp(out, torch.float32)
    prompt = ("Describe", image(84, 112, seed=11))
    request_input = pipe.prompt_input(prompt)
    ours, theirs = engine_logits(pipe, request_input), hf_logits(ref, request_input)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < 1e-3, rel  # the same dequantized weights (fp16 tower in both)
    assert pipe(prompt, greedy()).token_ids == hf_generate(ref, request_input, N)
    messages = [{"role": "user", "content": [image_part(image(60, 60, seed=12)), {"type": "text", "text": "Hi"}]}]
    assert len(pipe(messages, greedy(4)).token_ids) == 4


def test_group_sizes_come_from_the_language_model(folders):
    """The Quantize tab and the CLI offer and check group sizes against the decoder's widths, from either config
    spelling (7B: 3584 / 18944 take 128; the tiny ones: hidden 64, intermediate 128)."""
    from quant.api import fitting_group_sizes, validate_settings
    from tests.engine.test_qwen2_vl import QWEN2_VL_2B, QWEN25_VL_7B
    from ui.quantize_tab import fitting_group_size

    for name in ("2.5", "2"):
        src, _ = folders[name]
        cfg = json.loads((src / "config.json").read_text())
        assert fitting_group_sizes(cfg) == [64, 32]
        assert fitting_group_size(str(src)) == 64
        with pytest.raises(ValueError, match="--w-group-size 128 does not divide"):
            validate_settings(cfg, 4, 128)
    assert fitting_group_sizes(QWEN25_VL_7B) == [128, 64, 32] and fitting_group_sizes(QWEN2_VL_2B) == [128, 64, 32]


def test_transformers5_spelling_keeps_its_names(folders, calib_txt, tmp_path, make_pipe):  # noqa: F811
    """A folder in transformers >= 4.52's names (model.language_model.*, model.visual.*) is written back in them,
    and quantizes to the same language model as the hub-spelled one."""
    from tests.engine.test_qwen2_vl import v5_spelling
    from tests.llava_factory import rename_checkpoint

    src, hub_out = folders["2.5"]
    v5 = rename_checkpoint(src, tmp_path / "v5", v5_spelling)
    out = quantize(v5, tmp_path / "v5-awq", calib_txt)
    before, after, hub = tensors(v5), tensors(out), tensors(hub_out)
    kept = [k for k in before if k.startswith("model.visual.")]
    assert kept and all(torch.equal(after[k], before[k]) for k in kept)
    assert "model.language_model.layers.0.self_attn.q_proj.qweight" in after
    assert not any(k.startswith("model.layers.") for k in after)
    for name, t in hub.items():  # the same quantized language model, in the other spelling
        if name.startswith("model.layers."):
            assert torch.equal(after[v5_spelling(name)], t), name
    pipe = make_pipe(out)
    assert len(pipe(("Describe", image(56, 84, seed=13)), greedy(4)).token_ids) == 4
