"""The API tab's snippets (ui/api_snippets.py), each one run as a user would paste it: curl in bash, the Python in
python3 (the real openai client), the JavaScript in node, all against the real server on the demo model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ui.api_snippets import JS_KEY_PLACEHOLDER, snippets

RUN_S = 120  # generous: a loaded 2-core machine


@pytest.fixture(scope="module")
def served(studio, demo_model_path):
    from engine.config import EngineConfig

    if studio.manager.current is None or not studio.manager.current.is_demo:
        studio.manager.load(str(demo_model_path), EngineConfig(cache_max_entry_count=0.2), name="demo-model",
                            is_demo=True)
    return studio.manager.current


def run(kind: str, code: str) -> str:
    command = {"curl": ["bash", "-c", code], "python": [sys.executable, "-c", code],
               "javascript": ["node", "--input-type=module", "-e", code]}[kind]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_S,
                          env={**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    assert done.returncode == 0, (kind, code, done.stderr[-2000:])
    return done.stdout


@pytest.mark.parametrize("kind", ["curl", "python", "javascript"])
def test_every_route_snippet_runs_against_the_server(served, studio, kind):
    routes = snippets(studio.url + "/v1", served.name, keys=False)
    assert [r.path for r in routes] == ["/v1/chat/completions", "/v1/completions", "/v1/models",
                                        "/v1/models/demo-model", "/health", "/metrics"]
    for route in routes:
        out = run(kind, getattr(route, kind))
        if route.path == "/health":
            assert "ok" in out.lower(), out
        elif route.path == "/metrics":
            assert "studio_engine_requests_total" in out, out
        elif "models" in route.path:
            assert "demo-model" in out, out
        else:  # a generated text came back
            assert out.strip(), (route.path, out)


def test_with_keys_every_guarded_route_sends_the_key():
    for route in snippets("http://127.0.0.1:7860/v1", "m", keys=True):
        guarded = route.path != "/health"
        assert ("$STUDIO_API_KEY" in route.curl) == guarded, route
        assert ("STUDIO_API_KEY" in route.python) == guarded, route
        assert (JS_KEY_PLACEHOLDER in route.javascript) == guarded, route
        compile(route.python, route.path, "exec")  # valid Python
