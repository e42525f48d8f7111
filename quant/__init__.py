"""AWQ W4A16 quantization tool: `python -m quant MODEL --work-dir OUT ...` or `quantize_model(...)`.

Writes AutoAWQ-GEMM-format Hugging Face folders that the engine (and AutoAWQ / vLLM / transformers) load.
"""

from quant.api import quantize_loaded, quantize_model
from quant.arch import ModelPathError, UnsupportedArchitectureError
from quant.awq import (
    AWQConfig,
    FunctionProgress,
    NullProgress,
    ProgressCallback,
    QuantizationCancelled,
    TqdmProgress,
    quantize_layers,
)
from quant.calib_data import CalibDataError, load_calib_samples

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
