"""How much one API request may ask of the server, each bound a flag of app.py with a default that leaves normal use
untouched: its body's bytes, its prompt tokens (prompts x length x n, scoring included), its output
(n x max_tokens x (1 + top_logprobs)) and, for an answer that is not streamed, its estimated size. A request past
one is a 400 that names the flag; a request that leaves max_tokens unset gets what fits instead.

    limits = RequestLimits(max_output_tokens=2**19)
    max_new = limits.fit_max_tokens(requested, room, n, top_logprobs, stream)   # APIError 400 past a bound
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from api.api_error import APIError

TOKEN_BYTES = 8  # an answer's bytes per generated token without logprobs (JSON text, escapes averaged)
LOGPROB_BYTES = 96  # per logprob entry (the chosen token or one top alternative: token, logprob, bytes)


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 32 * 2**20  # --max-body-mb: request bodies, counted on the bytes read
    max_prompt_tokens: int = 2**16  # --max-prompt-tokens-per-request: prompt tokens x n (at least session_len)
    max_output_tokens: int = 2**19  # --max-output-tokens-per-request: n x max_tokens x (1 + top_logprobs)
    max_response_bytes: int = 64 * 2**20  # --max-response-mb: a non-streamed answer's estimated size

    def __post_init__(self):
        for name in ("max_body_bytes", "max_prompt_tokens", "max_output_tokens", "max_response_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def check_prompt_tokens(self, num_tokens: int, session_len: int = 0, param: str = "prompt") -> None:
        """At most max_prompt_tokens, or session_len if larger: one prompt that fits the session always passes."""
        limit = max(self.max_prompt_tokens, session_len)
        if num_tokens > limit:
            raise APIError(400, f"this request has {num_tokens:,} prompt tokens (prompts x their length x n), over "
                                f"this server's --max-prompt-tokens-per-request ({limit:,}); send fewer or shorter "
                                "prompts per request", param=param, code="request_too_large")

    def check_scoring_size(self, num_tokens: int, logprobs: int) -> None:
        """Echoed, scored prompts' logprob entries are built at once, streamed or not: they count toward the answer
        size bound either way."""
        self._check_bytes(num_tokens * (TOKEN_BYTES + LOGPROB_BYTES * (1 + logprobs)), "logprobs",
                          "scored prompts' logprobs", "score fewer or shorter prompts per request, or ask for fewer "
                          "logprobs")

    def fit_max_tokens(self, requested: int | None, room: int, n: int, top_logprobs: int | None, stream: bool) -> int:
        """max_tokens for each choice: at most `room` (session_len minus the prompt). A value asked for that makes
        n x max_tokens x (1 + top_logprobs), or a non-streamed answer's size, pass its bound is a 400; unset, it
        is the largest that fits both."""
        entries = 1 + (top_logprobs if top_logprobs is not None else 0)
        per_token = TOKEN_BYTES + (LOGPROB_BYTES * entries if top_logprobs is not None else 0)
        if requested is None:
            fits = min(room, self.max_output_tokens // (n * entries))
            if not stream:
                fits = min(fits, self.max_response_bytes // (n * per_token))
            return max(1, fits)
        max_new = max(1, min(requested, room))
        total = n * max_new * entries
        if total > self.max_output_tokens:
            raise APIError(400, f"n x max_tokens x (1 + top_logprobs) = {n} x {max_new:,} x {entries} = {total:,} is "
                                f"over this server's --max-output-tokens-per-request ({self.max_output_tokens:,}); "
                                "lower n, max_tokens or top_logprobs", param="max_tokens", code="request_too_large")
        if not stream:
            self._check_bytes(n * max_new * per_token, "max_tokens")
        return max_new

    def _check_bytes(self, estimate: int, param: str, what: str = "an answer that is not streamed",
                     hint: str = "send stream: true, or ask for less") -> None:
        if estimate > self.max_response_bytes:
            raise APIError(400, f"the answer could take about {estimate / 2**20:,.1f} MiB, over this server's "
                                f"--max-response-mb ({self.max_response_bytes / 2**20:,.1f}) for {what}: {hint}",
                           param=param, code="response_too_large")


def add_limit_args(p: argparse.ArgumentParser) -> None:
    d = RequestLimits()
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help="request bodies (API and UI events), counted on the bytes read; larger is a 413")
    p.add_argument("--max-prompt-tokens-per-request", type=int, default=d.max_prompt_tokens,
                   help="an API request's prompt tokens (prompts x length x n, scoring included); larger is a 400")
    p.add_argument("--max-output-tokens-per-request", type=int, default=d.max_output_tokens,
                   help="an API request's n x max_tokens x (1 + top_logprobs); larger is a 400 (unset max_tokens "
                        "is fitted to it)")
    p.add_argument("--max-response-mb", type=float, default=d.max_response_bytes / 2**20,
                   help="a non-streamed API answer's estimated size; larger is a 400 that suggests stream: true")


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    """The flags as RequestLimits; SystemExit naming the flag for a value below 1 (or 0 MiB)."""
    for flag in ("max_body_mb", "max_prompt_tokens_per_request", "max_output_tokens_per_request", "max_response_mb"):
        if not getattr(args, flag) > 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    return RequestLimits(max_body_bytes=int(args.max_body_mb * 2**20),
                         max_prompt_tokens=args.max_prompt_tokens_per_request,
                         max_output_tokens=args.max_output_tokens_per_request,
                         max_response_bytes=int(args.max_response_mb * 2**20))
