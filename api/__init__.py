"""The OpenAI-compatible HTTP API (FastAPI, no gradio): `build_api(manager, ...)` -> a FastAPI app that serves
/v1/models, /v1/chat/completions, /v1/completions, /health and /metrics over the studio's ModelManager;
`uvicorn_options()` for the server's read deadlines and connection cap; `begin_shutdown(app)` to end running
requests cleanly."""

from api.server import begin_shutdown, build_api, uvicorn_options

__all__ = ["begin_shutdown", "build_api", "uvicorn_options"]
