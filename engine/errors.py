"""User-facing engine errors: the failures a person can fix (their input, their model folder, their settings), each
with a message that says what to change. The front ends map the classes, never the message text: api/ to a status
code and an OpenAI error code, ui/ to a message shown as is. Anything else escaping the engine is a bug.

    EngineError
    ├── BadInputError (ValueError)            a request that cannot be served: 400
    │   ├── PromptTooLongError                longer than the session or the KV cache: 400 context_length_exceeded
    │   ├── ImageInputError                   images sent to a model that takes none: 400
    │   └── InvalidImageError                 an image that cannot be read or is not allowed (bytes, pixels,
    │                                         type, count, URL / path policy): 400
    ├── ModelLoadError (ValueError)           a path that is no loadable model folder
    │   ├── UnsupportedModelError             an architecture or format the engine does not run
    │   └── TokenizerLoadError                no usable tokenizer in the folder
    └── EngineUnavailableError (RuntimeError) nothing can run the request now: 503
        ├── EngineStoppedError                the engine was shut down (model unloaded or swapped)
        └── NoModelLoadedError                no model is loaded

The ValueError / RuntimeError bases keep older `except ValueError` callers working. The classes are re-exported
where they used to be defined (engine.llm_engine, engine.pipeline, engine.loader, ...), so old imports still work.
This module imports nothing: any layer may use it.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors whose message is written for the user."""


class BadInputError(EngineError, ValueError):
    """The request (prompt, generation settings) cannot be served as given."""


class PromptTooLongError(BadInputError):
    pass


class ImageInputError(BadInputError):
    pass


class InvalidImageError(BadInputError):
    pass


class ModelLoadError(EngineError, ValueError):
    """The model folder or hub id cannot be loaded."""


class UnsupportedModelError(ModelLoadError):
    pass


class TokenizerLoadError(ModelLoadError):
    pass


class EngineUnavailableError(EngineError, RuntimeError):
    """Nothing can serve the request right now; retrying later may work."""


class EngineStoppedError(EngineUnavailableError):
    pass


class NoModelLoadedError(EngineUnavailableError):
    pass


class ImagesBusyError(EngineUnavailableError):
    """Too many images are being prepared right now (the image workers' count or byte bound): retry shortly."""


__all__ = [
    "BadInputError",
    "EngineError",
    "EngineStoppedError",
    "EngineUnavailableError",
    "ImageInputError",
    "ImagesBusyError",
    "InvalidImageError",
    "ModelLoadError",
    "NoModelLoadedError",
    "PromptTooLongError",
    "TokenizerLoadError",
    "UnsupportedModelError",
]
