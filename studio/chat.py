"""Terminal chat: `python -m studio.chat [MODEL] [engine flags]`. Multi-turn, streaming.

With no MODEL it uses SmolLM2-135M-Instruct (studio/default_model.py), or with --demo (or when that cannot be had)
the embedded demo model (random weights: replies are gibberish). Commands at the prompt: /exit, /reset (new
conversation), /system TEXT (set a system prompt), /image PATH (attach an image to your next message;
vision-language models). Ctrl-C stops a reply.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine.config import GenerationConfig
from studio.default_model import resolve_default_model
from studio.demo_model import DEMO_MODEL_NOTE, build_demo_model
from studio.engine_args import add_engine_args, engine_config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.chat", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?",
                        help="model folder or hub id (default: SmolLM2-135M-Instruct, else the demo model)")
    parser.add_argument("--demo", action="store_true", help="with no MODEL, chat with the random-weight demo model")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    add_engine_args(parser)
    args = parser.parse_args(argv)

    from engine import pipeline  # lazy: torch and the engine load after the arguments parse (fast --help)

    model = args.model
    if model is None and args.demo:
        model = build_demo_model()
        print(f"[{DEMO_MODEL_NOTE}]")
    elif model is None:
        default = resolve_default_model()
        model = default.path
        print(f"[{default.name}: {default.source}{'; ' + default.note if default.note else ''}]")
    try:
        pipe = pipeline(model, engine_config_from_args(args))
    except (ValueError, OSError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                           repetition_penalty=args.repetition_penalty, seed=args.seed)
    print(f"model: {pipe.model_path} on {pipe.engine.device} | session_len {pipe.session_len} | /exit /reset /system")
    messages: list[dict] = []
    images: list[bytes] = []  # attached with /image, sent with the next message
    system = None
    try:
        while True:
            try:
                user = input("\n>>> ").strip()
            except EOFError:
                break
            if not user:
                continue
            if user == "/exit":
                break
            if user == "/reset":
                messages = []
                print("(new conversation)")
                continue
            if user.startswith("/system"):
                system = user[len("/system") :].strip() or None
                messages = []
                print(f"(system prompt {'set' if system else 'cleared'}; new conversation)")
                continue
            if user.startswith("/image"):
                try:
                    images.append(Path(user[len("/image") :].strip()).expanduser().read_bytes())
                    print(f"({len(images)} image(s) attached to your next message)")
                except OSError as e:
                    print(f"[error: {e}]")
                continue
            content = [{"type": "image", "image": data} for data in images] + [{"type": "text", "text": user}]
            messages.append({"role": "user", "content": content if images else user})
            images = []
            prompt = ([{"role": "system", "content": system}] if system else []) + messages
            reply, n, start = "", 0, time.monotonic()
            try:
                for delta in pipe.stream(prompt, gen):
                    print(delta.text, end="", flush=True)
                    reply += delta.text
                    n = delta.generate_token_len
                    if delta.finish_reason == "error":
                        print(f"\n[error: {delta.error}]")
            except KeyboardInterrupt:
                print("\n[stopped]")
            except ValueError as e:  # prompt too long for the session, an unreadable image ...
                print(f"\n[error: {e}]")
                messages.pop()
                continue
            elapsed = time.monotonic() - start
            print(f"\n[{n} tokens, {n / elapsed:.1f} tok/s]" if elapsed > 0 else "")
            messages.append({"role": "assistant", "content": reply})
    finally:
        pipe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
