"""The quantizer's user-facing errors, in engine.errors' hierarchy: the UI and the API map them by class (a
calibration set or architecture the user can change is bad input; a cancel is neither a fault nor bad input),
never by name or message text."""

from __future__ import annotations

from engine.errors import BadInputError, EngineError, ModelLoadError, UnsupportedModelError

ModelPathError = ModelLoadError  # the model folder is missing or is not a Hugging Face model folder


class QuantizationCancelled(EngineError, RuntimeError):
    """Raised between layers when the cancel event is set; nothing is left behind that looks finished."""


class CalibDataError(BadInputError):
    """A calibration set that cannot be loaded or is too small; the message says what to pass instead."""


class UnsupportedArchitectureError(UnsupportedModelError):
    """The quantizer has no scale-group table (quant/arch.py) for this architecture."""
