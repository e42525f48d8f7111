"""Fixtures for the quantizer tests: a calibration text file, the local tokenizer, and one torch thread.

The tiny checkpoints themselves come from tests/conftest.py (tests.model_factory): llama_path (MHA),
llama_gqa_path, qwen2_path (GQA, q/k/v biases, tied embeddings), internlm2_paths.
"""

from __future__ import annotations

import pytest

GROUP_SIZE = 32  # divides the factory models' widths (hidden 64, intermediate 128)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors + OpenMP on a shared 2-core box: 2 threads make each op ~1000x slower than 1 thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    from studio.demo_model import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory):
    """About 10k tokens of English prose and code: enough for a few blocks of 32-64 tokens."""
    from studio.demo_model import TRAINING_CORPUS

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TRAINING_CORPUS * 8, encoding="utf-8")
    return path


@pytest.fixture
def fast_awq():
    """AWQConfig for the tiny models: the real algorithm, smaller grids."""
    from quant.awq import AWQConfig

    return AWQConfig(w_group_size=GROUP_SIZE, n_grid=10)
