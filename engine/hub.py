"""The Hugging Face hub, seen from here: whether its endpoint answers (no torch, no huggingface_hub import)."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlparse

from engine import envs


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face hub's endpoint (HF_ENDPOINT) accepts a TCP connection within `timeout`; otherwise
    why not, so an offline box learns it in seconds instead of after HTTP retries. The probe runs in a daemon thread
    so a stuck DNS lookup cannot hold the caller past the timeout. (The quantizer's calibration sets and the default
    model's download both ask here.)"""
    url = urlparse(envs.hf_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as e:
            result.append(f"{host}:{port} is unreachable ({type(e).__name__}: {e})")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"{host}:{port} did not answer within {timeout:.0f} s"
    return result[0]
