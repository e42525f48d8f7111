"""End to end W4A16: a tiny model quantized by `python -m quant` loads with pipeline() (format detected from
config.json) and its logits track the fake-quantized reference model built by the quantizer's own loader."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine import EngineConfig, pipeline
from tests.engine.conftest import PROMPTS, engine_prompt_logits, greedy


@pytest.fixture(scope="module")
def awq_folder(tmp_path_factory, llama_gqa_path):
    out = tmp_path_factory.mktemp("awq") / "llama-awq"
    calib = out.parent / "calib.txt"
    calib.write_text(("The sea was calm and the ships sailed north toward the islands. " * 40 + "\n") * 4)
    subprocess.run([sys.executable, "-m", "quant", str(llama_gqa_path), "--work-dir", str(out),
                    "--calib-dataset", str(calib), "--calib-samples", "4", "--calib-seqlen", "64",
                    "--w-group-size", "32", "--device", "cpu"], check=True, capture_output=True, timeout=300)
    return out


def test_awq_folder_loads_and_tracks_fake_quantized_reference(awq_folder):
    from quant.reference_loader import load_awq_as_fp

    cfg = json.loads((awq_folder / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "awq"
    pipe = pipeline(awq_folder, EngineConfig(cache_block_seq_len=16, cpu_kv_cache_bytes=16 * 2**20))
    try:
        assert pipe.engine.model_format == "awq"
        ref = load_awq_as_fp(awq_folder, torch.float32).eval()
        for prompt in PROMPTS:
            ids = pipe.encode(prompt)
            ours = engine_prompt_logits(pipe, ids)
            with torch.no_grad():
                theirs = ref(torch.tensor([ids])).logits[0].float()
            rel = ((ours - theirs).norm() / theirs.norm()).item()
            assert rel < 1e-3, rel  # same dequantized weights; scales are fp16 in both
        out = pipe(PROMPTS[0], greedy(16))
        assert out.generate_token_len == 16
        mem = pipe.memory()
        assert mem["model_format"] == "awq"
    finally:
        pipe.close()


def test_awq_weights_are_smaller_in_memory(awq_folder, llama_gqa_path):
    fp = pipeline(llama_gqa_path, EngineConfig(dtype="float16", cpu_kv_cache_bytes=2**20))
    q = pipeline(awq_folder, EngineConfig(dtype="float16", cpu_kv_cache_bytes=2**20))
    try:
        assert q.memory()["weights_bytes"] < fp.memory()["weights_bytes"]
    finally:
        fp.close()
        q.close()


def test_wrong_model_format_is_a_clear_error(awq_folder):
    from engine import ModelLoadError

    with pytest.raises(ModelLoadError, match="model_format='hf'.*'awq'"):
        pipeline(awq_folder, EngineConfig(model_format="hf"))
