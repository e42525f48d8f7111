"""The Quantize tab's events through gradio_client: Cancel stops a running quantization, and bad settings come
back as readable messages. (The full run, with its progress bar and "Load this model", is in test_browser.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from studio.demo_model import TRAINING_CORPUS

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TRAINING_CORPUS * 20)
    return path


def quantize_args(demo_model_path, calib, output, samples=8, seqlen=64, group=128, calib_set="local path",
                  overwrite=False):
    # quantize(model, calibration set, uploaded file, local path, samples, seq len, bits, group size, search scale,
    #          clip, output folder, trust remote code, overwrite)
    return (str(demo_model_path), calib_set, None, str(calib), samples, seqlen, 4, group, False, True, str(output),
            False, overwrite)


def test_cancel_stops_a_running_quantization(client, studio, demo_model_path, calib_file):
    state = studio.app.state.studio
    output = studio.quant_root / "cancelled"
    job = client.submit(*quantize_args(demo_model_path, calib_file, output, samples=32, seqlen=128),
                        api_name="/quantize")
    deadline = time.monotonic() + 60
    def stage():
        latest = state.quant_jobs.latest
        return (latest.snapshot().detail or {}).get("stage") if latest is not None else None

    while stage() != "quantize":
        assert time.monotonic() < deadline and not job.done(), "the quantization did not reach the layer stage"
        time.sleep(0.02)
    running = state.quant_jobs.latest
    second = client.predict(*quantize_args(demo_model_path, calib_file, studio.quant_root / "second"),
                            api_name="/quantize")[0]  # one at a time: it takes the whole GPU
    assert "already running" in second and "another browser tab" in second, second
    assert state.quant_jobs.latest is running and not (studio.quant_root / "second").exists()
    client.predict(api_name="/cancel_quantize")
    status = job.result(timeout=120)[0]
    assert "Cancelled" in status, status
    assert not output.exists()  # nothing half-written that looks finished


@pytest.mark.parametrize("case", ["missing_calib", "bad_group", "not_a_model", "offline_hub_set"])
def test_bad_settings_give_readable_errors(client, studio, demo_model_path, calib_file, tmp_path, monkeypatch, case):
    output = tmp_path / "out"
    args = quantize_args(demo_model_path, calib_file, output)
    if case == "missing_calib":
        args = quantize_args(demo_model_path, tmp_path / "nope.txt", output)
        expect = "does not exist"
    elif case == "bad_group":
        args = quantize_args(demo_model_path, calib_file, output, group=96)
        expect = "group"
    elif case == "not_a_model":
        args = quantize_args(tmp_path, calib_file, output)
        expect = "config.json"
    else:
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        args = quantize_args(demo_model_path, calib_file, output, calib_set="wikitext2")
        expect = "local file"
    status = client.predict(*args, api_name="/quantize")[0]
    assert ("Could not start" in status or "Quantization failed" in status) and expect in status, status
    assert "Traceback" not in status
    assert "--" not in status, status  # the tab's words, not the command line's flags


def test_builtin_offline_calibration_by_default_and_a_fresh_name_or_overwrite(client, studio, demo_model_path,
                                                                             monkeypatch):
    """Offline (the hub unreachable), the default calibration set works; the summary says what it really got;
    a second run into the same folder is refused in the tab's words and offered a fresh name, or overwrites."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from ui.quantize_tab import default_output_dir

    state = studio.app.state.studio
    output = default_output_dir(state, str(demo_model_path), 128)
    base = str(studio.quant_root / f"{demo_model_path.name}-awq-w4g128")  # "-2", "-3" ... once it is taken
    assert output == base or output.startswith(base + "-"), output  # (other tests of the session may have run)
    assert not Path(output).exists()
    args = quantize_args(demo_model_path, "", output, samples=6, seqlen=64, calib_set="builtin")
    status, _chart, next_output = client.predict(*args, api_name="/quantize")  # (the button and State not here)
    assert "Quantization done" in status, status
    assert "Built-in offline text" in status and "6 samples × 64 tokens = 384 tokens" in status, status
    quality = state.quant_jobs.latest.result.quality  # before/after perplexity: two small engines, held-out text
    assert quality["before"] > 1 and quality["after"] > 1 and quality["num_tokens"] > 100, quality
    assert f"16-bit {quality['before']:.2f} → quantized {quality['after']:.2f}" in status, status
    kld = quality["summary"]  # KL divergence against the 16-bit model, pooled over the held-out texts, and per text
    assert kld["kld_mean"] > 0 and kld["kld_p99"] >= kld["kld_mean"] and 0 < kld["top1"] <= 1, kld
    assert f"mean {kld['kld_mean']:.4f} · p99 {kld['kld_p99']:.4f}" in status, status
    for name in ("prose", "code", "chat", "chinese"):
        after = quality["texts"][name]["after"]
        assert f"{name}: ppl {quality['texts'][name]['before']['ppl']:.2f} → {after['ppl']:.2f}" in status, status
    assert state.quantized_models[0] == output and (studio.quant_root / output).is_dir()
    fresh = next_output
    assert fresh.startswith(base + "-") and fresh != output and not Path(fresh).exists()  # a fresh name next
    assert default_output_dir(state, str(demo_model_path), 128) == fresh

    status, *_, suggested = client.predict(*args, api_name="/quantize")  # the same folder again, no Overwrite
    assert "already holds files" in status and "Tick Overwrite" in status and fresh in status, status
    assert "--" not in status and suggested == fresh
    before = (studio.quant_root / output / "quant_report.json").stat().st_mtime_ns
    status = client.predict(*quantize_args(demo_model_path, "", output, samples=6, seqlen=64, calib_set="builtin",
                                           overwrite=True), api_name="/quantize")[0]
    assert "Quantization done" in status, status
    assert (studio.quant_root / output / "quant_report.json").stat().st_mtime_ns != before


def test_too_little_calibration_text_is_said_in_the_summary(client, studio, demo_model_path, tmp_path):
    from studio.demo_model import TRAINING_CORPUS

    small = tmp_path / "small.txt"
    small.write_text(TRAINING_CORPUS)
    args = quantize_args(demo_model_path, small, tmp_path / "out", samples=500, seqlen=64)
    status = client.predict(*args, api_name="/quantize")[0]
    assert "Quantization done" in status, status
    assert "of the 500 samples asked for: the text ran out" in status, status


def test_group_size_offered_fits_the_model(tmp_path, demo_model_path):
    """SmolLM2's hidden size 576 takes group 64, not the usual 128: the tab offers what fits."""
    import json

    from ui.quantize_tab import fitting_group_size

    assert fitting_group_size(str(demo_model_path)) == 128
    cfg = json.loads((demo_model_path / "config.json").read_text())
    cfg.update(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert fitting_group_size(str(tmp_path)) == 64
    assert fitting_group_size(str(tmp_path), 32) == 32  # a size that fits is kept
    assert fitting_group_size(str(tmp_path / "missing"), 64) == 64  # unreadable: the choice stands
