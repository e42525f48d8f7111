"""The whole app (API + Gradio UI, app.create_app) behind one rule: with --api-keys the UI and its Gradio API need a
login too; the login page tells nothing about the server; failed logins slow down per client; model and output
paths stay inside configured roots beyond loopback; errors never list folders; /v1 answers OpenAI errors for unknown
paths and wrong methods even with the UI mounted at "/"."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import app as studio_app


def parse(*argv: str):
    return studio_app.build_parser().parse_args(list(argv))


@pytest.fixture(scope="module")
def keyed_app(demo_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized-out")
    app, manager = studio_app.create_app(parse("--no-model", "--api-keys", "k1", "--demo-model-dir",
                                               str(demo_model_path), "--quant-output-root", str(out)))
    return app, demo_model_path, out


def test_api_keys_put_the_ui_and_its_gradio_api_behind_a_login(keyed_app):
    app, _, _ = keyed_app
    with TestClient(app) as client:
        assert client.get("/config").status_code == 401
        for name in ("unload_model", "load_model", "quantize", "chat"):
            assert client.post(f"/gradio_api/call/{name}", json={"data": []}).status_code == 401, name
        assert client.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0,
                                                           "session_hash": "x"}).status_code == 401
        assert client.get("/gradio_api/info").status_code == 401
        assert client.get("/v1/models").status_code == 401
        assert client.post("/login", data={"username": "anyone", "password": "k1"}).status_code == 200
        assert client.get("/config").status_code == 200


def test_the_login_page_shows_nothing_about_the_server(keyed_app):
    app, demo_path, out = keyed_app
    with TestClient(app) as client:
        for page in ("/", "/?view=api"):
            html = client.get(page).text
            assert "auth_required" in html
            assert str(demo_path) not in html and str(out) not in html and "load_model" not in html


def test_failed_logins_slow_down_per_client(keyed_app):
    app, _, _ = keyed_app
    with TestClient(app) as client:
        times = []
        for _ in range(4):
            start = time.monotonic()
            assert client.post("/login", data={"username": "a", "password": "wrong"}).status_code == 400
            times.append(time.monotonic() - start)
        assert times[3] >= 1.4  # three recent failures: 3 x 0.5 s before the fourth is even checked
        assert client.post("/login", data={"username": "a", "password": "k1"}).status_code == 200
        start = time.monotonic()
        client.post("/login", data={"username": "a", "password": "wrong"})
        assert time.monotonic() - start < 1.0  # a success clears the client's record


def test_unknown_v1_paths_and_wrong_methods_get_openai_errors_with_the_ui_mounted(demo_model_path):
    app, _ = studio_app.create_app(parse("--no-model", "--demo-model-dir", str(demo_model_path)))
    with TestClient(app) as client:
        r = client.get("/v1/nope")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
        r = client.get("/v1/chat/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST" and "POST" in r.json()["error"]["message"]
        r = client.delete("/v1/models")
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        assert client.post("/v1/models/x").status_code == 405


def test_paths_are_kept_inside_the_roots_beyond_loopback(tmp_path, demo_model_path):
    from ui.model_tab import load_model
    from ui.state import StudioSettings, StudioState

    assert studio_app.model_roots(parse()) is None  # loopback: any path
    assert studio_app.model_roots(parse("--server-name", "0.0.0.0")) == ()
    models = tmp_path / "models"
    models.mkdir()
    roots = studio_app.model_roots(parse("--server-name", "0.0.0.0", "--model-dir", str(models)))
    assert roots == (models.resolve(),)
    settings = StudioSettings(demo_model_dir=Path(demo_model_path), quant_output_root=tmp_path / "out",
                              model_roots=roots)
    state = StudioState(settings=settings)
    (models / "mine").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "passwords.txt").write_text("x")
    status, _, _ = load_model(state, str(tmp_path / "secret"), "auto", "auto", 0, 0.5, 256, 4, False)
    assert "must be inside" in status and "passwords.txt" not in status
    status, _, _ = load_model(state, str(models / ".." / "secret"), "auto", "auto", 0, 0.5, 256, 4, False)
    assert "must be inside" in status
    status, _, _ = load_model(state, str(models / "mine"), "auto", "auto", 0, 0.5, 256, 4, False)
    assert "must be inside" not in status and "not a model folder" in status  # inside: checked as a model folder
    settings.check_model_path("org/some-model")  # a hub id goes to the HF cache
    settings.check_output_path(tmp_path / "out" / "m-awq")
    with pytest.raises(PermissionError, match="written inside"):
        settings.check_output_path("/etc/cron.d/m-awq")
    assert state.manager.current is None
