"""AWQ W4A16 quantization tool: `python -m quant MODEL --work-dir OUT ...` or `quantize_model(...)`.

Writes AutoAWQ-GEMM-format Hugging Face folders that the engine (and AutoAWQ / vLLM / transformers) load.
The public names are imported lazily (PEP 562 module `__getattr__`), so `python -m quant --help` and
`from quant.errors import ...` answer without importing torch first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "AWQConfig": "quant.awq",
    "CalibDataError": "quant.errors",
    "FunctionProgress": "quant.awq",
    "ModelPathError": "quant.errors",
    "NullProgress": "quant.awq",
    "ProgressCallback": "quant.awq",
    "QuantizationCancelled": "quant.errors",
    "TqdmProgress": "quant.awq",
    "UnsupportedArchitectureError": "quant.errors",
    "load_calib_samples": "quant.calib_data",
    "quantize_layers": "quant.awq",
    "quantize_loaded": "quant.api",
    "quantize_model": "quant.api",
}
__all__ = [
    "AWQConfig",
    "CalibDataError",
    "FunctionProgress",
    "ModelPathError",
    "NullProgress",
    "ProgressCallback",
    "QuantizationCancelled",
    "TqdmProgress",
    "UnsupportedArchitectureError",
    "load_calib_samples",
    "quantize_layers",
    "quantize_loaded",
    "quantize_model",
]
assert sorted(__all__) == sorted(_PUBLIC)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from quant.api import quantize_loaded, quantize_model
    from quant.awq import AWQConfig, FunctionProgress, NullProgress, ProgressCallback, TqdmProgress, quantize_layers
    from quant.calib_data import load_calib_samples
    from quant.errors import CalibDataError, ModelPathError, QuantizationCancelled, UnsupportedArchitectureError


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
