"""Quant Studio: one process serving the Gradio UI at / and the OpenAI-compatible API at /v1 over one engine.

    python app.py [MODEL] --server-name 127.0.0.1 --server-port 7860 [engine flags]

With no MODEL it serves the embedded demo model (built locally; random weights, so replies are gibberish).
It binds 127.0.0.1 by default: reach it from your laptop with `ssh -N -L 7860:127.0.0.1:7860 user@gpu-box`.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import socket
import sys
from pathlib import Path

import gradio as gr
import uvicorn
from fastapi import FastAPI

from api import build_api
from engine.cli import add_engine_args, engine_config_from_args
from engine.demo_model import DEMO_MODEL_NOTE, build_demo_model, default_demo_model_dir
from engine.manager import ModelManager
from ui import CSS, THEME, StudioSettings, StudioState, build_app

log = logging.getLogger("studio")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="model folder or hub id (default: the built-in demo model, random weights)")
    p.add_argument("--server-name", default="127.0.0.1",
                   help="address to bind; 127.0.0.1 (default) keeps it private to SSH port-forwards")
    p.add_argument("--server-port", type=int, default=7860)
    p.add_argument("--root-path", default="", help="URL prefix when served behind a reverse proxy")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="password-protect the UI")
    p.add_argument("--api-keys", nargs="+", default=None, metavar="KEY", help="Bearer keys the /v1 API requires")
    p.add_argument("--allow-origins", nargs="+", default=None, metavar="ORIGIN", help="CORS origins for the API")
    p.add_argument("--max-concurrent-requests", type=int, default=256, help="API requests in flight at once")
    p.add_argument("--served-model-name", default=None, help="model id API clients see (default: folder name)")
    p.add_argument("--quant-output-root", default="quantized", help="where the Quantize tab writes by default")
    p.add_argument("--demo-model-dir", default=None, help="where the demo model is built (default: user cache)")
    p.add_argument("--no-model", action="store_true", help="start with nothing loaded; load from the Model tab")
    p.add_argument("--no-ui", action="store_true", help="serve the API only")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_engine_args(p)
    return p


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth takes USER:PASS")
    return user, password


def create_app(args: argparse.Namespace) -> tuple[FastAPI, ModelManager]:
    """The FastAPI app (API routes first, Gradio mounted at "/") and its ModelManager; loads MODEL unless
    --no-model. Raises on a model that fails to load at startup (the UI reports later load errors itself)."""
    auth = parse_auth(args.auth)
    engine_config = engine_config_from_args(args)
    settings = StudioSettings(
        engine_config=engine_config,
        demo_model_dir=Path(args.demo_model_dir).expanduser() if args.demo_model_dir else default_demo_model_dir(),
        quant_output_root=Path(args.quant_output_root).expanduser().resolve(),
        api_keys_required=bool(args.api_keys),
        served_model_name=args.served_model_name,
        root_path=args.root_path,
        server_port=args.server_port,
    )
    manager = ModelManager()
    if not args.no_model:
        if args.model:
            manager.load(args.model, engine_config)
        else:
            path = build_demo_model(settings.demo_model_dir)
            manager.load(path, engine_config, name="demo-model", is_demo=True)
    app = build_api(manager, api_keys=args.api_keys, allow_origins=args.allow_origins,
                    max_concurrent_requests=args.max_concurrent_requests, served_model_name=args.served_model_name)
    if not args.no_ui:
        state = StudioState(manager=manager, settings=settings)
        app.state.studio = state  # for introspection and tests: the UI's shared state
        blocks = build_app(state)
        blocks.queue(default_concurrency_limit=8)
        app = gr.mount_gradio_app(app, blocks, path="/", auth=auth, root_path=args.root_path or None,
                                  theme=THEME, css=CSS, ssr_mode=False, show_error=True)
    return app, manager


def banner(args: argparse.Namespace, manager: ModelManager) -> str:
    port, host = args.server_port, args.server_name
    public = host not in LOOPBACK
    forward_target = "127.0.0.1" if host in ("0.0.0.0", "::") or not public else host
    root = args.root_path.rstrip("/")
    lines = [
        "",
        f"  Quant Studio is running on {host}:{port}",
        f"    UI:          http://127.0.0.1:{port}{root}/" + ("" if not args.no_ui else "  (disabled: --no-ui)"),
        f"    OpenAI API:  http://127.0.0.1:{port}{root}/v1",
        "",
        f"  From your laptop, forward the port, then open http://localhost:{port}{root}/ :",
        f"    ssh -N -L {port}:{forward_target}:{port} {getpass.getuser()}@{socket.gethostname()}",
        "",
    ]
    loaded = manager.current
    if loaded is None:
        lines.append("  No model loaded: pick one in the Model tab.")
    else:
        lines.append(f"  Model: {loaded.name} ({loaded.path}), loaded in {loaded.load_seconds:.1f} s")
        if loaded.is_demo:
            lines.append(f"  NOTE: {DEMO_MODEL_NOTE}. Pass a model folder for real answers.")
    if public:
        bar = "!" * 78
        open_parts = [part for part, protected in (("the UI (--auth USER:PASS)", args.auth or args.no_ui),
                                                    ("the API (--api-keys KEY)", args.api_keys)) if not protected]
        if open_parts:
            lines += ["", bar,
                      f"  WARNING: listening on {host}, reachable from the network, and nothing protects",
                      f"  {' and '.join(open_parts)}. Anyone who can reach port {port} can use the GPU.",
                      "  Prefer the default 127.0.0.1 plus an SSH port-forward.", bar]
    return "\n".join(lines) + "\n"


class StudioServer(uvicorn.Server):
    """uvicorn.Server that prints the banner once the socket is listening."""

    def __init__(self, config: uvicorn.Config, on_started=None):
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model is None and not args.no_model:
        print(f"No MODEL given: serving the demo model ({DEMO_MODEL_NOTE}).", flush=True)
    try:
        app, manager = create_app(args)
    except Exception as e:  # noqa: BLE001 - a startup model that fails: one readable line, not a traceback
        log.debug("startup failed", exc_info=True)
        print(f"error: could not load {args.model or 'the demo model'}: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=args.server_name, port=args.server_port, log_level=args.log_level,
                            timeout_graceful_shutdown=3)
    server = StudioServer(config, on_started=lambda: print(banner(args, manager), flush=True))
    try:
        server.run()
    finally:
        manager.unload()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
