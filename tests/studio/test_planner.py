"""The memory planner against the engine it plans for: weights bytes exactly what the loaded engine holds (16-bit,
fp32, W4A16 incl. modules_to_not_convert, tied embeddings, qkv bias), KV blocks / capacity exactly what the engine
sizes on CPU, and the Llama-2-7B figures measured on the H200 (README: 12.55 GiB fp16, 3.62 GiB W4A16).

Margin: on CPU the planner is exact for weights, KV bytes per token, blocks and capacity (asserted ==). The GPU total
(CUDA context, workspace, graphs) is an estimate; the H200 run of studio.compare checks it within 5%."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import EngineConfig, pipeline
from studio.planner import GIB, PlanSettings, plan_memory

CPU_KV = 4 * 2**20


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def awq_config_folder(src, dst, group_size, skip=None):
    """A copy of src's config + tokenizer declaring AWQ weights (loaded with load_format=dummy: random weights)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                  "version": "gemm", **({"modules_to_not_convert": skip} if skip else {})}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def measured(path, **kw):
    pipe = pipeline(path, EngineConfig(device="cpu", cpu_kv_cache_bytes=CPU_KV, cache_block_seq_len=16, **kw))
    try:
        return pipe.memory()
    finally:
        pipe.close()


def planned(path, **kw):
    return plan_memory(path, PlanSettings(device="cpu", cpu_kv_cache_bytes=CPU_KV, cache_block_seq_len=16, **kw))


@pytest.mark.parametrize("dtype", ["auto", "float16", "bfloat16"])
@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_16bit_weights_and_kv_exact(demo_model_path, dtype, quant_policy):
    m = measured(demo_model_path, dtype=dtype, quant_policy=quant_policy)
    p = planned(demo_model_path, dtype=dtype, quant_policy=quant_policy)
    assert p["dtype"] == m["dtype"]
    assert p["weights_bytes"] == m["weights_bytes"]
    assert p["kv_bytes_per_token"] == m["kv_bytes_per_token"]
    assert p["num_kv_blocks"] == m["num_kv_blocks"] and p["kv_capacity_tokens"] == m["kv_capacity_tokens"]
    assert p["kv_cache_bytes"] == m["kv_cache_bytes"]


def test_tied_embeddings_and_qkv_bias_exact(qwen2_path):
    spec = json.loads((qwen2_path / "config.json").read_text())
    assert spec["tie_word_embeddings"]
    p = planned(qwen2_path)
    assert p["weights_breakdown"]["lm_head"] == 0
    assert p["weights_bytes"] == measured(qwen2_path)["weights_bytes"]


@pytest.mark.parametrize("dtype", ["auto", "float16"])
@pytest.mark.parametrize("skip", [None, ["down_proj"], ["self_attn"]])
def test_w4a16_weights_exact(demo_model_path, tmp_path, dtype, skip):
    folder = awq_config_folder(demo_model_path, tmp_path / "awq", 32, skip)
    m = measured(folder, dtype=dtype, load_format="dummy", quant_policy=4)
    p = planned(folder, weights="w4a16", dtype=dtype, quant_policy=4)
    assert m["model_format"] == "awq" and p["model_format"] == "awq"
    assert p["weights_bytes"] == m["weights_bytes"]
    assert p["kv_capacity_tokens"] == m["kv_capacity_tokens"]
    sixteen = planned(demo_model_path, dtype=dtype)
    assert p["weights_bytes"] < sixteen["weights_bytes"]
    assert p["weights_breakdown"]["embeddings"] == sixteen["weights_breakdown"]["embeddings"]  # kept 16-bit


def test_w4a16_group_size_from_settings_without_awq_folder(demo_model_path):
    p32 = planned(demo_model_path, weights="w4a16", group_size=32)
    p128 = planned(demo_model_path, weights="w4a16", group_size=128)
    assert p32["weights_bytes"] > p128["weights_bytes"]  # more groups: more scales and zeros
    with pytest.raises(ValueError, match="group size 96 does not divide"):
        planned(demo_model_path, weights="w4a16", group_size=96)


def test_awq_folder_cannot_be_planned_as_16bit(demo_model_path, tmp_path):
    folder = awq_config_folder(demo_model_path, tmp_path / "awq", 32)
    with pytest.raises(ValueError, match="AWQ"):
        planned(folder)


def test_llama2_7b_matches_h200_measurements(tmp_path):
    """README's status table (H200, measured): weights 12.55 GiB fp16 and 3.62 GiB W4A16; KV capacity x1.94 / x3.76."""
    from studio.workload import SHAPES

    cfg = dict(SHAPES["llama2-7b"])
    fp16 = plan_memory(cfg, PlanSettings(gpu_memory_gb=141, cache_max_entry_count=0.8, session_len=2048))
    awq = plan_memory(cfg, PlanSettings(weights="w4a16", gpu_memory_gb=141, quant_policy=4, session_len=2048))
    kv8 = plan_memory(cfg, PlanSettings(gpu_memory_gb=141, quant_policy=8, session_len=2048))
    assert round(fp16["weights_bytes"] / GIB, 2) == 12.55
    assert round(awq["weights_bytes"] / GIB, 2) == 3.62
    assert round(kv8["kv_capacity_tokens"] / fp16["kv_capacity_tokens"], 2) == 1.94
    assert fp16["kv_bytes_per_token"] == 2 * 32 * 4096 * 2  # 512 KiB: 32 layers x K and V x 4096 x fp16
    assert fp16["fits"] and fp16["max_sessions"] == fp16["num_kv_blocks"] // 32


def test_fits_and_sessions_follow_the_gpu_size():
    from studio.workload import SHAPES

    cfg = dict(SHAPES["llama2-7b"])
    small = plan_memory(cfg, PlanSettings(gpu_memory_gb=12, session_len=4096))
    assert not small["fits"] and small["num_kv_blocks"] == 0 and "no room" in small["fits_note"]
    sizes = [plan_memory(cfg, PlanSettings(gpu_memory_gb=g, session_len=4096))["max_sessions"]
             for g in (24, 48, 80, 141)]
    assert sizes == sorted(sizes) and sizes[0] >= 1 and sizes[-1] > 10 * sizes[0]
    half = plan_memory(cfg, PlanSettings(gpu_memory_gb=24, session_len=4096, cache_max_entry_count=0.4))
    full = plan_memory(cfg, PlanSettings(gpu_memory_gb=24, session_len=4096, cache_max_entry_count=0.8))
    assert abs(full["kv_cache_bytes"] / half["kv_cache_bytes"] - 2) < 0.01


def test_bad_settings_are_refused(demo_model_path):
    with pytest.raises(ValueError, match="quant_policy"):
        PlanSettings(quant_policy=3)
    with pytest.raises(ValueError, match="gpu_memory_gb"):
        PlanSettings(gpu_memory_gb=-1)
    with pytest.raises(ValueError, match="no config.json"):
        plan_memory(demo_model_path / "nope")
