"""The API's one error type, kept free of fastapi so light modules (api/limits.py, read by app.py's argument
parser before the web stack loads) can raise it; api/errors.py turns it into OpenAI error JSON."""

from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
