"""The Quantize tab's events through gradio_client: Cancel stops a running quantization, and bad settings come
back as readable messages. (The full run, with its progress bar and "Load this model", is in test_browser.py.)"""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from engine.demo_model import TRAINING_CORPUS

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TRAINING_CORPUS * 20)
    return path


def quantize_args(demo_model_path, calib, output, samples=8, seqlen=64, group=128, calib_set="local path"):
    # quantize(model, calibration set, uploaded file, local path, samples, seq len, bits, group size, search scale,
    #          clip, output folder)
    return (str(demo_model_path), calib_set, None, str(calib), samples, seqlen, 4, group, False, True, str(output))


def test_cancel_stops_a_running_quantization(client, studio, demo_model_path, calib_file):
    state = studio.app.state.studio
    output = studio.quant_root / "cancelled"
    job = client.submit(*quantize_args(demo_model_path, calib_file, output, samples=32, seqlen=128),
                        api_name="/quantize")
    deadline = time.monotonic() + 60
    while state.quant_job is None or state.quant_job.stage != "quantize":
        assert time.monotonic() < deadline and not job.done(), "the quantization did not reach the layer stage"
        time.sleep(0.02)
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
