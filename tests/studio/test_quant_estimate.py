"""The quantization time estimate (studio/quant_estimate.py): the real quantizer on the demo model, stopped after
its first layer; nothing is written."""

from __future__ import annotations

import threading

import pytest

from studio.quant_estimate import QuantEstimate, estimate_quantization


def test_times_one_layer_of_the_real_quantizer(demo_model_path, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the run would write: checked empty after
    est = estimate_quantization(demo_model_path, calib_samples=4, calib_seqlen=64, device="cpu")
    assert est.num_layers == 4 and est.layer_seconds > 0 and est.setup_seconds > 0
    assert est.total_seconds == pytest.approx(est.setup_seconds + 4 * est.layer_seconds)
    assert list(tmp_path.iterdir()) == []  # the trial run left nothing behind


def test_scaling_to_another_calibration_size():
    est = QuantEstimate(setup_seconds=10, layer_seconds=30, num_layers=30, samples=16, seqlen=512)
    assert est.total_seconds == 910
    assert est.scaled_seconds(8, 256) == pytest.approx(10 + 30 * 0.25 * 30)


def test_bad_input_raises_the_quantizers_error_and_a_stop_stops(demo_model_path, tmp_path):
    with pytest.raises(Exception, match="does not exist|not found|No such"):
        estimate_quantization(tmp_path / "missing", calib_samples=4, calib_seqlen=64, device="cpu")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Exception, match="[Cc]ancel"):
        estimate_quantization(demo_model_path, calib_samples=4, calib_seqlen=64, device="cpu", cancel=stop)
