"""One lock for every route that reaches the engine or the disk: with --api-keys the UI and its Gradio API need a
login too (any API key is a password), nothing about the server shows before login, failed logins are slowed,
and beyond loopback the UI reaches only the configured model and output folders."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import app as studio_app


@pytest.fixture(scope="module")
def keyed_app(demo_model_path, tmp_path_factory):
    from fastapi.testclient import TestClient

    args = studio_app.build_parser().parse_args([
        "--no-model", "--api-keys", "k1", "--demo-model-dir", str(demo_model_path),
        "--quant-output-root", str(tmp_path_factory.mktemp("q")),
    ])
    app, manager = studio_app.create_app(args)
    with TestClient(app) as client:
        yield client, str(demo_model_path)
    manager.unload()


def test_api_keys_lock_the_gradio_side_too(keyed_app):
    client, demo = keyed_app
    assert client.get("/config").status_code == 401
    assert client.get("/gradio_api/info").status_code == 401
    r = client.post("/gradio_api/call/load_model", json={"data": ["/etc"]})
    assert r.status_code in (401, 403), r.text
    assert client.get("/v1/models").status_code == 401


def test_nothing_about_the_server_before_login(keyed_app):
    client, demo = keyed_app
    page = client.get("/")
    assert page.status_code == 200
    assert demo not in page.text and str(Path.home()) not in page.text
    assert "window.gradio_api_info = null" in page.text
    assert client.get("/docs").status_code == 404  # no public API docs on a keyed server


def test_an_api_key_is_a_ui_password(keyed_app, monkeypatch):
    client, demo = keyed_app
    from api import guard

    monkeypatch.setattr(guard, "LOGIN_DELAY_S", 0.0)
    assert client.post("/login", data={"username": "anyone", "password": "wrong"}).status_code >= 400
    ok = client.post("/login", data={"username": "anyone", "password": "k1"})
    assert ok.status_code == 200, ok.text
    assert client.get("/config").status_code == 200  # the login cookie opens the UI
    client.cookies.clear()


def test_failed_logins_are_slowed_per_client(keyed_app):
    client, _ = keyed_app
    from api.guard import LOGIN_DELAY_S

    client.post("/login", data={"username": "x", "password": "bad1"})
    start = time.monotonic()
    client.post("/login", data={"username": "x", "password": "bad2"})
    assert time.monotonic() - start >= LOGIN_DELAY_S * 0.95  # at least one failure's delay before answering
    client.post("/login", data={"username": "x", "password": "k1"})  # a success clears the count
    client.cookies.clear()


def test_ui_login_rule():
    check = studio_app.ui_login(("me", "pw"), ["k1", "k2"])
    assert check("me", "pw") and check("whoever", "k2") and not check("me", "k3") and not check("other", "pw")
    assert studio_app.ui_login(None, None) is None
    assert studio_app.ui_login(None, ["k"])("u", "k") and not studio_app.ui_login(None, ["k"])("u", "")


def test_paths_beyond_loopback_stay_under_the_configured_roots(tmp_path, demo_model_path):
    from ui.model_tab import load_model
    from ui.state import PathNotAllowedError

    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    out = tmp_path / "out"
    from ui.state import StudioSettings, StudioState

    s = StudioSettings(model_roots=(models.resolve(), out.resolve()), output_roots=(out.resolve(),))
    s.check_model_path(str(models / "m"))
    s.check_model_path("org/some-model")  # a hub id naming no local folder
    s.check_output_path(str(out / "new-awq"))
    for bad in ("/etc", str(tmp_path), str(models / ".." / "elsewhere")):
        with pytest.raises(PathNotAllowedError, match="outside"):
            s.check_model_path(bad)
    with pytest.raises(PathNotAllowedError):
        s.check_output_path(str(tmp_path / "x"))
    state = StudioState(settings=s)
    status, _, _ = load_model(state, "/etc", "auto", "auto", 0, 0.5, 0, 8, False)
    assert "outside" in status and "passwd" not in status


def test_public_bind_restricts_paths_loopback_does_not(tmp_path, demo_model_path):
    def settings(*extra):
        args = studio_app.build_parser().parse_args([
            "--no-model", "--demo-model-dir", str(demo_model_path), "--quant-output-root", str(tmp_path / "q"),
            "--model-dir", str(tmp_path / "models"), *extra])
        app, manager = studio_app.create_app(args)
        return app.state.studio.settings

    public = settings("--server-name", "0.0.0.0", "--auth", "a:b")
    assert (tmp_path / "models").resolve() in public.model_roots
    assert public.output_roots == ((tmp_path / "q").resolve(),)
    assert settings().model_roots is None and settings().output_roots is None
