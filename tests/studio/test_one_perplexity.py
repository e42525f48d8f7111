"""One scoring path: the Compare runner's quality columns and the Quantize tab's before/after check are the same
figures for the same folder and texts (studio.quality.score_texts over LLMEngine.score: perplexity per held-out
text, KL divergence and top-1 against the 16-bit scoring), measured here by the real Compare child processes and the
real quick check, each in its own engine."""

from __future__ import annotations

import pytest

from studio.compare import CompareSpec, Workload, parse_settings, run_compare
from studio.quality import HELDOUT_TEXTS, QUICK_CHECK_TOKENS, quantization_check


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
    assert auto["perplexity_tokens"] == check["num_tokens"] == QUICK_CHECK_TOKENS - 1  # the same tokens scored
    for name in HELDOUT_TEXTS:  # every text: the same perplexity, the same (zero) divergence for the same folder
        before, after = check["texts"][name]["before"], check["texts"][name]["after"]
        assert auto["quality"][name]["ppl"] == pytest.approx(before["ppl"], rel=1e-5) == after["ppl"]
        assert auto["quality"][name]["num_tokens"] == before["num_tokens"]
        assert auto["quality"][name]["kld_mean"] == after["kld_mean"] == 0
        assert auto["quality"][name]["top1"] == after["top1"] == 1
    assert check["summary"]["kld_mean"] == auto["kld_mean"] == 0 and check["summary"]["kld_p99"] == 0
    # and the column still tells settings apart: int8 KV changes the figure a little, not a lot
    assert kv8["perplexity"] != auto["perplexity"]
    assert kv8["perplexity"] == pytest.approx(auto["perplexity"], rel=0.05)
    assert 0 < kv8["kld_mean"] < 0.05 and kv8["kld_p99"] >= kv8["kld_mean"] and 0.5 < kv8["top1"] <= 1
