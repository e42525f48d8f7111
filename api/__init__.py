"""The OpenAI-compatible HTTP API (FastAPI, no gradio): `build_api(manager, ...)` -> a FastAPI app that serves
/v1/models, /v1/chat/completions, /v1/completions, /health and /metrics over the studio's ModelManager."""

from api.server import build_api

__all__ = ["build_api"]
