"""In-process LLM engine: paged (optionally int8/int4) KV cache, continuous batching, Triton kernels on GPU and
plain-torch reference ops on CPU. Public surface: pipeline, EngineConfig, GenerationConfig, Response."""

from engine.config import EngineConfig, GenerationConfig
from engine.llm_engine import PromptTooLongError
from engine.loader import ModelLoadError
from engine.models.spec import UnsupportedModelError
from engine.pipeline import ImageInputError, Pipeline, Response, pipeline
from engine.tokenizer import TokenizerLoadError

__all__ = [
    "EngineConfig",
    "GenerationConfig",
    "ImageInputError",
    "ModelLoadError",
    "Pipeline",
    "PromptTooLongError",
    "Response",
    "TokenizerLoadError",
    "UnsupportedModelError",
    "pipeline",
]
