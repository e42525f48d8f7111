"""On the GPU at Llama-2-7B shape (random weights): the planner's total within 5% of the NVML peak of each child,
weights bytes exact, KV capacity ordered by the KV policy. Run by the lead on the H200: pytest -m gpu."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_llama2_7b_predicted_vs_measured_within_5_percent(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU (run it with -m gpu on the GPU box)")
    from studio.compare import CompareSpec, Workload, parse_settings, run_compare

    spec = CompareSpec("shape:llama2-7b", parse_settings("fp16,w4a16,w4a16-kv4"), [2048], [0.4],
                       workload=Workload(prompt_len=128, new_tokens=32, concurrency=4, max_batch_size=8))
    result = run_compare(spec, tmp_path)
    rows = {r["setting"]: r for r in result["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    for r in rows.values():
        assert r["weights_bytes"] == r["pred_weights_bytes"]
        assert abs(r["pred_total_GiB"] - r["memory_peak_GiB"]) / r["memory_peak_GiB"] < 0.05, r
        assert abs(r["kv_capacity_tokens"] - r["pred_kv_capacity_tokens"]) / r["kv_capacity_tokens"] < 0.05, r
    assert rows["w4a16-kv4"]["kv_capacity_tokens"] > 3 * rows["w4a16"]["kv_capacity_tokens"]
