"""Terminal multi-turn chat with any OpenAI-compatible server (this studio's API, LMDeploy, vLLM, OpenAI), streaming:

    python -m studio.client http://127.0.0.1:7860 [--model NAME] [--api-key KEY] [--system TEXT]

The whole conversation is sent each turn; replies print as they stream. Type /reset to start over, /exit or
Ctrl-D to quit; Ctrl-C stops the reply being written (the server then aborts it). Talks HTTP through httpx only,
so it runs anywhere: no engine, torch or gradio needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator

import httpx


class ChatError(RuntimeError):
    pass


def api_base(url: str) -> str:
    """'http://host:port' or 'http://host:port/v1' (with or without a trailing slash) -> 'http://host:port/v1'."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


def make_client(url: str, api_key: str | None = None, timeout_s: float = 600.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=api_base(url), headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))


def _error_message(response: httpx.Response) -> str:
    try:
        body = json.loads(response.read())
        return body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason_phrase


def list_models(client: httpx.Client) -> list[str]:
    response = client.get("/models")
    if response.status_code != 200:
        raise ChatError(f"GET /v1/models: HTTP {response.status_code}: {_error_message(response)}")
    return [m["id"] for m in response.json().get("data", [])]


def stream_chat(client: httpx.Client, model: str, messages: list[dict], **params) -> Iterator[str]:
    """Yield the reply's text deltas. Leaving the loop early closes the connection, which aborts the request."""
    body = {"model": model, "messages": messages, "stream": True, **params}
    with client.stream("POST", "/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise ChatError(f"HTTP {response.status_code}: {_error_message(response)}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise ChatError(event["error"].get("message", str(event["error"])))
            for choice in event.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text


def chat_loop(client: httpx.Client, model: str, *, system: str | None = None, params: dict | None = None,
              read: Callable[[str], str] | None = None, write: Callable[[str], object] | None = None) -> None:
    """Read a line (default: input()), stream the reply (default: to stdout), repeat, until /exit or end of input."""
    read = read or input
    write = write or sys.stdout.write
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    while True:
        try:
            line = read("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(base)
            write("(new conversation)\n")
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for delta in stream_chat(client, model, messages, **(params or {})):
                reply.append(delta)
                write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            write("\n(stopped)\n")
            messages.pop()
            continue
        except (ChatError, httpx.HTTPError) as e:
            write(f"\n[error] {e}\n")
            messages.pop()
            continue
        write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="server address, e.g. http://127.0.0.1:7860 (a trailing /v1 is optional)")
    parser.add_argument("--model", default=None, help="model id (default: the server's first model)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="Bearer key for servers started with --api-keys (default: $OPENAI_API_KEY)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    params = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                ("max_tokens", args.max_tokens)) if v is not None}
    with make_client(args.url, args.api_key) as client:
        try:
            model = args.model
            if model is None:
                models = list_models(client)
                if not models:
                    print(f"{api_base(args.url)} serves no model yet", file=sys.stderr)
                    return 1
                model = models[0]
        except (ChatError, httpx.HTTPError) as e:
            print(f"cannot reach {api_base(args.url)}: {e}", file=sys.stderr)
            return 1
        print(f"chatting with {model} at {api_base(args.url)}; /reset starts over, /exit quits")
        chat_loop(client, model, system=args.system, params=params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
