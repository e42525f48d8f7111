"""One scoring path: the Compare runner's perplexity column and the Quantize tab's before/after check are the same
figure for the same folder and text (studio.quality.heldout_perplexity over LLMEngine.score), measured here by
the real Compare child process and the real quick check, each in its own engine."""

from __future__ import annotations

import pytest

from studio.compare import CompareSpec, Workload, parse_settings, run_compare
from studio.quality import QUICK_CHECK_CHARS, heldout_text, quantization_check


@pytest.mark.slow
def test_compare_and_the_quantize_check_report_the_same_perplexity(demo_model_path, tmp_path):
    check = quantization_check(str(demo_model_path), str(demo_model_path))  # "before" and "after": the same folder
    assert check["before"] == pytest.approx(check["after"], rel=1e-9)  # the check itself is deterministic
    spec = CompareSpec(str(demo_model_path), parse_settings("auto,auto-kv8"), [None], [0.8], None,
                       Workload(prompt_len=8, new_tokens=4, concurrency=1, device="cpu"))
    result = run_compare(spec, tmp_path / "out")
    auto, kv8 = result["rows"]
    assert auto["status"] == kv8["status"] == "ok", (auto.get("error"), kv8.get("error"))
    assert auto["perplexity"] == pytest.approx(check["before"], rel=1e-5)
    assert auto["perplexity_tokens"] == check["num_tokens"] > 100  # the same text, every token of it scored
    assert len(heldout_text(QUICK_CHECK_CHARS)) <= QUICK_CHECK_CHARS
    # and the column still tells settings apart: int8 KV changes the figure a little, not a lot
    assert kv8["perplexity"] != auto["perplexity"]
    assert kv8["perplexity"] == pytest.approx(auto["perplexity"], rel=0.05)
