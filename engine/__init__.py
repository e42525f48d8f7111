"""In-process LLM engine: paged (optionally int8/int4) KV cache, continuous batching, Triton kernels on GPU and
plain-torch reference ops on CPU. Public surface: pipeline, EngineConfig, GenerationConfig, Response.

The public names are imported lazily (PEP 562 module `__getattr__`), so importing a light submodule
(`engine.config`, `engine.errors`, `engine.envs`: what command lines need to parse their arguments) never pulls in
torch: `from engine import pipeline` still works as before."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

_PUBLIC = {
    "EngineConfig": "engine.config",
    "GenerationConfig": "engine.config",
    "ImageInputError": "engine.pipeline",
    "InvalidImageError": "engine.errors",
    "ModelLoadError": "engine.loader",
    "Pipeline": "engine.pipeline",
    "PromptTooLongError": "engine.llm_engine",
    "Response": "engine.pipeline",
    "TokenizerLoadError": "engine.tokenizer",
    "UnsupportedModelError": "engine.models.spec",
    "pipeline": "engine.pipeline",
}

__all__ = [
    "EngineConfig",
    "GenerationConfig",
    "ImageInputError",
    "InvalidImageError",
    "ModelLoadError",
    "Pipeline",
    "PromptTooLongError",
    "Response",
    "TokenizerLoadError",
    "UnsupportedModelError",
    "pipeline",
]
assert sorted(__all__) == sorted(_PUBLIC)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from engine.config import EngineConfig, GenerationConfig
    from engine.errors import InvalidImageError
    from engine.llm_engine import PromptTooLongError
    from engine.loader import ModelLoadError
    from engine.models.spec import UnsupportedModelError
    from engine.pipeline import ImageInputError, Pipeline, Response, pipeline
    from engine.tokenizer import TokenizerLoadError


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _EngineModule(types.ModuleType):
    """`engine.pipeline` is the function, as it was with eager imports, even after the submodule of the same name
    is imported (the import system then sets the submodule as the package's attribute: that write is ignored)."""

    @property
    def pipeline(self):
        return importlib.import_module("engine.pipeline").pipeline

    @pipeline.setter
    def pipeline(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _EngineModule
