"""End to end: quantize_model / quantize_loaded -> AutoAWQ GEMM folder -> reference loader; bad inputs; atomicity."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open

from quant import ModelPathError, QuantizationCancelled, quantize_model
from quant.api import quantize_loaded
from quant.arch import load_model, merge_wqkv
from quant.awq import AWQConfig, FunctionProgress
from quant.calib_data import CalibDataError
from quant.reference_loader import dequantized_state_dict, load_awq_as_fp
from tests.quant.conftest import GROUP_SIZE

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def read_folder(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def quantize_in_memory(model_path, out, cfg, calib_txt):
    loaded = load_model(model_path, "float32")
    report = quantize_loaded(loaded, out, cfg, calib_dataset=str(calib_txt), calib_samples=6, calib_seqlen=48)
    return loaded, report


def assert_folder_matches_fake_quantized(out, loaded, ids):
    """Dequantized linears == the in-memory fake-quantized ones, bit for bit; logits close (fp16 norms/embeds)."""
    ref = load_awq_as_fp(out, torch.float32)
    ref_state = ref.state_dict()
    for name, t in loaded.model.state_dict().items():
        if any(name.endswith(f"{lin}.weight") for lin in LINEARS):
            assert torch.equal(ref_state[name], t), name
    with torch.no_grad():
        want, got = loaded.model(ids).logits, ref(ids).logits
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 5e-3, rel
    return ref


def test_llama_folder_files_keys_dtypes_config(llama_path, calib_txt, tmp_path, fast_awq):
    out = tmp_path / "llama-awq"
    loaded, report = quantize_in_memory(llama_path, out, fast_awq, calib_txt)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "quant_report.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names  # fmt: skip
    assert not any(n.startswith(".") for n in names)

    src_cfg = json.loads((llama_path / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }  # fmt: skip
    assert cfg["torch_dtype"] == "float16"
    assert {k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype", "dtype")} == {
        k: v for k, v in src_cfg.items() if k not in ("torch_dtype", "dtype")
    }

    tensors = read_folder(out)
    hidden, inter, n_layers = src_cfg["hidden_size"], src_cfg["intermediate_size"], src_cfg["num_hidden_layers"]
    widths = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}  # fmt: skip
    for i in range(n_layers):
        for lin in LINEARS:
            in_f, out_f = widths[lin.split(".")[1]]
            p = f"model.layers.{i}.{lin}"
            assert f"{p}.weight" not in tensors
            assert tensors[f"{p}.qweight"].dtype == torch.int32 and tensors[f"{p}.qweight"].shape == (in_f, out_f // 8)
            assert tensors[f"{p}.qzeros"].dtype == torch.int32
            assert tensors[f"{p}.qzeros"].shape == (in_f // GROUP_SIZE, out_f // 8)
            assert tensors[f"{p}.scales"].dtype == torch.float16
            assert tensors[f"{p}.scales"].shape == (in_f // GROUP_SIZE, out_f)
        assert tensors[f"model.layers.{i}.input_layernorm.weight"].dtype == torch.float16
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert tensors[name].dtype == torch.float16
    assert len(tensors) == n_layers * (7 * 3 + 2) + 3

    rep = json.loads((out / "quant_report.json").read_text())
    assert rep == json.loads(json.dumps(report))
    assert rep["settings"]["calib_samples"] == 6 and rep["settings"]["calib_seqlen"] == 48
    assert rep["sizes"]["output_weight_bytes"] < rep["sizes"]["source_weight_bytes"]
    assert len(rep["layers"]) == n_layers and all(layer["mse_awq"] < layer["mse_rtn"] for layer in rep["layers"])
    assert set(rep["timings_s"]) >= {"calibration", "quantize", "export", "total"}

    ids = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    assert_folder_matches_fake_quantized(out, loaded, ids)


def test_qwen2_biases_tied_embeddings_gqa(qwen2_path, calib_txt, tmp_path, fast_awq):
    out = tmp_path / "qwen2-awq"
    loaded, report = quantize_in_memory(qwen2_path, out, fast_awq, calib_txt)
    tensors = read_folder(out)
    assert "lm_head.weight" not in tensors  # tied: stored once, as the input embedding
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert tensors[f"model.layers.0.self_attn.{proj}.bias"].dtype == torch.float16
    assert "model.layers.0.self_attn.o_proj.bias" not in tensors
    assert "self_attn.v_proj" not in report["layers"][0]["scale_search"]  # GQA: no v -> o fold
    ref = assert_folder_matches_fake_quantized(out, loaded, torch.randint(0, 1000, (2, 24)))
    assert ref.lm_head.weight is ref.model.embed_tokens.weight


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_internlm2_round_trip_through_llama_layout(internlm2_paths, tmp_path, method):
    """InternLM2 is quantized in the Llama layout and written back with wqkv re-packed per KV head; the same
    weights quantized as a Llama give exactly the same integers, scales and zeros."""
    internlm2_path, llama_ref_path = internlm2_paths
    cfg = AWQConfig(w_group_size=GROUP_SIZE, method=method, n_grid=6)
    samples = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    reports = {}
    for name, src in (("internlm2", internlm2_path), ("llama", llama_ref_path)):
        reports[name] = quantize_loaded(load_model(src, "float32"), tmp_path / name, cfg, samples=samples)
    assert reports["internlm2"]["source_format"] == "internlm2"
    ours, ref = read_folder(tmp_path / "internlm2"), read_folder(tmp_path / "llama")
    src_cfg = json.loads((internlm2_path / "config.json").read_text())
    heads, kv_heads = src_cfg["num_attention_heads"], src_cfg["num_key_value_heads"]
    out_cfg = json.loads((tmp_path / "internlm2" / "config.json").read_text())
    assert out_cfg["model_type"] == "internlm2" and out_cfg["auto_map"] == src_cfg["auto_map"]
    assert out_cfg["quantization_config"]["modules_to_not_convert"] == ["output"]

    from quant.primitives import unpack_awq

    for i in range(src_cfg["num_hidden_layers"]):
        p, lp = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        wqkv = unpack_awq(ours[p + "attention.wqkv.qweight"], ours[p + "attention.wqkv.qzeros"],
                          ours[p + "attention.wqkv.scales"])  # fmt: skip
        parts = [unpack_awq(ref[lp + f"{x}.qweight"], ref[lp + f"{x}.qzeros"], ref[lp + f"{x}.scales"])
                 for x in ("q_proj", "k_proj", "v_proj")]  # fmt: skip
        for k in range(3):  # q ints, scales, zeros: [out, ...] merged per KV head
            assert torch.equal(wqkv[k], merge_wqkv(parts[0][k], parts[1][k], parts[2][k], heads, kv_heads))
        for a, b in (("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
                     ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj")):  # fmt: skip
            assert torch.equal(ours[p + a + ".qweight"], ref[f"model.layers.{i}.{b}.qweight"])
        assert torch.equal(ours[p + "attention_norm.weight"], ref[f"model.layers.{i}.input_layernorm.weight"])
    assert torch.equal(ours["output.weight"], ref["lm_head.weight"])
    assert torch.equal(ours["model.tok_embeddings.weight"], ref["model.embed_tokens.weight"])
    # the reference loader reads the InternLM2 folder back as the equivalent Llama
    a, b = dequantized_state_dict(tmp_path / "llama"), load_awq_as_fp(tmp_path / "internlm2").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_fail_fast_with_clear_errors(llama_path, tmp_path, calib_txt):
    out = tmp_path / "out"
    with pytest.raises(ModelPathError, match="does not exist"):
        quantize_model(tmp_path / "no-such-model", out, calib_dataset=str(calib_txt))
    with pytest.raises(ModelPathError, match="no config.json"):
        quantize_model(tmp_path, out, calib_dataset=str(calib_txt))
    with pytest.raises(ValueError, match="--w-group-size 48 does not divide.*hidden_size\\) = 64"):
        quantize_model(llama_path, out, calib_dataset=str(calib_txt), w_group_size=48)
    with pytest.raises(ValueError, match="packs 4-bit weights only"):
        quantize_model(llama_path, out, calib_dataset=str(calib_txt), w_bits=8)
    with pytest.raises(CalibDataError, match="unknown calibration dataset"):
        quantize_model(llama_path, out, calib_dataset="no-such-set", w_group_size=GROUP_SIZE)
    with pytest.raises(ValueError, match="method must be"):
        quantize_model(llama_path, out, calib_dataset=str(calib_txt), method="gptq", w_group_size=GROUP_SIZE)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        quantize_model(llama_path, tmp_path / "full", method="rtn", w_group_size=GROUP_SIZE)
    assert not out.exists()


def test_overwrite_replaces_the_folder(llama_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    quantize_model(llama_path, out, method="rtn", w_group_size=GROUP_SIZE, device="cpu", overwrite=True)
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ModelPathError, match="already quantized"):
        quantize_model(out, tmp_path / "again", method="rtn", w_group_size=GROUP_SIZE)


@pytest.mark.parametrize("cancel_at", [("quantize", 1), ("export", 1)])
def test_cancel_or_failure_leaves_no_complete_looking_folder(llama_path, calib_txt, tmp_path, cancel_at):
    out = tmp_path / "out"
    cancel = threading.Event()

    def on_progress(stage, done, total, message):
        if (stage, done) == cancel_at:
            cancel.set()

    with pytest.raises(QuantizationCancelled):
        quantize_model(
            llama_path, out, calib_dataset=str(calib_txt), calib_samples=4, calib_seqlen=32,
            w_group_size=GROUP_SIZE, device="cpu", progress=FunctionProgress(on_progress), cancel_event=cancel,
            awq_options={"n_grid": 4},
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling


def test_write_failure_leaves_nothing(llama_path, tmp_path, monkeypatch):
    import quant.api

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(quant.api, "write_config", broken)
    with pytest.raises(OSError, match="disk full"):
        quantize_model(llama_path, tmp_path / "out", method="rtn", w_group_size=GROUP_SIZE, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_large_outputs_are_sharded_with_an_index(llama_path, tmp_path):
    out = tmp_path / "sharded"
    loaded = load_model(llama_path, "float32")
    cfg = AWQConfig(w_group_size=GROUP_SIZE, method="rtn")
    report = quantize_loaded(loaded, out, cfg, max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] <= report["sizes"]["output_weight_bytes"]
    ref = load_awq_as_fp(out)
    assert torch.equal(ref.model.layers[1].mlp.down_proj.weight, loaded.model.model.layers[1].mlp.down_proj.weight)


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelPathError, match="does not exist locally.*HF_HUB_OFFLINE is set"):
        quantize_model("some-org/some-model", tmp_path / "out", method="rtn")


def test_mistral_folder_round_trip(mistral_path, calib_txt, tmp_path, fast_awq):
    out = tmp_path / "mistral-awq"
    loaded, report = quantize_in_memory(mistral_path, out, fast_awq, calib_txt)
    assert all(layer["mse_awq"] < layer["mse_rtn"] for layer in report["layers"])
    assert_folder_matches_fake_quantized(out, loaded, torch.randint(0, 1000, (2, 24)))


def test_fp16_compute_path_is_bit_exact(llama_path, calib_txt, tmp_path, fast_awq):
    """The dtype a GPU run uses: scales folded and weights fake-quantized in fp16; the folder holds the same fp16."""
    loaded = load_model(llama_path, "float16")
    report = quantize_loaded(loaded, tmp_path / "fp16", fast_awq, calib_dataset=str(calib_txt), calib_samples=4,
                             calib_seqlen=32)  # fmt: skip
    assert report["settings"]["dtype"] == "float16"
    ref = load_awq_as_fp(tmp_path / "fp16", torch.float16).state_dict()
    for name, t in loaded.model.state_dict().items():
        if "rotary" not in name:
            assert torch.equal(ref[name], t), name  # every tensor, quantized or not, exactly as in memory
