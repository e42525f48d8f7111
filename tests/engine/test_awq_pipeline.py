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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_awq_fp16_fast_path_on_gpu(awq_folder, monkeypatch):
    # W4A16 kernels + CUDA graphs in fp16 track the reference ops (dequantize, matmul), and programmatic dependent
    # launch changes no bit
    def run(kernels, pdl):
        monkeypatch.setenv("ENGINE_KERNELS", kernels)
        monkeypatch.setenv("ENGINE_PDL", pdl)
        pipe = pipeline(awq_folder, EngineConfig(dtype="float16", cache_block_seq_len=16, num_gpu_blocks=128,
                                                 use_cuda_graph=kernels != "reference"))
        try:
            assert pipe.engine.model_format == "awq"
            logits = engine_prompt_logits(pipe, pipe.encode(PROMPTS[1]))
            ids = [o.token_ids for o in pipe(PROMPTS, greedy(16))]
            return logits, ids
        finally:
            pipe.close()

    ref_logits, _ = run("reference", "0")
    off_logits, off_ids = run("auto", "0")
    on_logits, on_ids = run("auto", "1")
    rel = ((on_logits.float() - ref_logits.float()).norm() / ref_logits.float().norm()).item()
    assert rel < 2e-2, rel
    assert torch.equal(on_logits, off_logits) and on_ids == off_ids
