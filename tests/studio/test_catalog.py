"""The model library (studio/catalog.py): real model folders on disk, described from config.json and file sizes;
bad folders listed with their reason, never breaking the list."""

from __future__ import annotations

import json
import shutil

from studio.catalog import CONVERTED_MARKER, describe_folder, scan


def make_library(root, demo_model_path):
    """root/plain (the demo model), root/org/awq (it, marked AWQ group 64), root/broken (bad config.json),
    root/gpt2 (unsupported), root/gguf (a GGUF file only), root/notes (no model files: not listed)."""
    plain = shutil.copytree(demo_model_path, root / "plain")
    awq = shutil.copytree(demo_model_path, root / "org" / "awq")
    cfg = json.loads((awq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}
    (awq / "config.json").write_text(json.dumps(cfg))
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{ this is not json")
    (root / "broken" / "model.safetensors").write_bytes(b"\0" * 10)
    (root / "gpt2").mkdir()
    (root / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (root / "gguf").mkdir()
    (root / "gguf" / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("hi")
    return plain, awq


def test_scan_lists_good_and_bad_folders_with_reasons(tmp_path, demo_model_path):
    plain, awq = make_library(tmp_path, demo_model_path)
    entries = scan([(tmp_path, "model dir"), (tmp_path / "missing", "nowhere")],
                   compare_results={str(awq.resolve()): "w4a16: 12.0 tok/s"})
    by_name = {e.name: e for e in entries}
    assert set(by_name) == {"plain", "awq", "broken", "gpt2", "gguf"}
    assert [e.ok for e in entries] == sorted((e.ok for e in entries), reverse=True)  # good ones first
    good = by_name["plain"]
    assert good.ok and good.architecture == "LlamaForCausalLM" and not good.vision and good.params > 0
    assert good.size_bytes == sum(f.stat().st_size for f in plain.rglob("*") if f.is_file())
    assert by_name["awq"].format == "AWQ W4, group 64" and by_name["awq"].compare == "w4a16: 12.0 tok/s"
    assert "not valid JSON" in by_name["broken"].problem
    assert "GPT2LMHeadModel" in by_name["gpt2"].problem and "not supported" in by_name["gpt2"].problem
    assert "GGUF" in by_name["gguf"].problem
    assert all(e.where == "model dir" for e in entries)


def test_converted_and_vision_folders_and_missing_weights(tmp_path, demo_model_path):
    folder = shutil.copytree(demo_model_path, tmp_path / "converted")
    (folder / CONVERTED_MARKER).write_text(json.dumps({"version": 1}))
    assert describe_folder(folder).format.startswith("GGUF-converted")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    assert "no weight files" in describe_folder(folder).problem


def test_vision_model_is_marked(tmp_path):
    from tests.llava_factory import make_llava

    entry = describe_folder(make_llava(tmp_path / "tiny-llava"))
    assert entry.ok and entry.vision and "Llava" in entry.architecture


def test_hugging_face_cache_layout(tmp_path, demo_model_path):
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(demo_model_path, snapshot)
    entries = scan([], hf_cache=tmp_path / "hub")
    assert [(e.name, e.where, e.ok) for e in entries] == [("org/tiny", "Hugging Face cache", True)]
