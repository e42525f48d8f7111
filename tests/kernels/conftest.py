"""Kernel tests run the Triton kernels under the interpreter on CPU. On a CUDA machine the same small-shape tests
run compiled on the GPU, and `-m gpu` adds the large-shape ones.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when it decorates), so it
is set here, at collection time, and only when no GPU is present.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the small-shape tests run here: interpreted on CPU, compiled on a GPU machine
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty return NaN-filled float tensors, so any output element a kernel forgets to write fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
