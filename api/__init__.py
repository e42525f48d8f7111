"""The OpenAI-compatible HTTP API (FastAPI, no gradio): `build_api(manager, ...)` -> a FastAPI app that serves
/v1/models, /v1/chat/completions, /v1/completions, /health and /metrics over the studio's ModelManager;
`uvicorn_options()` for the server's read deadlines and connection cap; `begin_shutdown(app)` to end running
requests cleanly. Loaded on first use, so a light submodule (api.limits for app.py's --help) needs no fastapi."""

__all__ = ["begin_shutdown", "build_api", "uvicorn_options"]


def __getattr__(name: str):
    if name in __all__:
        from api import server  # lazy: fastapi and the engine load only when the API is built (fast --help)

        return getattr(server, name)
    raise AttributeError(f"module 'api' has no attribute {name!r}")
