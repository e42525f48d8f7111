"""app.py's command line: defaults, the start-up banner (URLs and the exact ssh -L line), the warning for a
network-facing bind without protection, and an API-only app (--no-ui)."""

from __future__ import annotations

import getpass
import socket

import pytest

import app as studio_app


def parse(*argv: str):
    return studio_app.build_parser().parse_args(list(argv))


def test_defaults_bind_loopback():
    args = parse()
    assert args.server_name == "127.0.0.1" and args.server_port == 7860 and args.model is None
    assert args.quant_policy == 0 and args.cache_max_entry_count == 0.8  # engine flags, LMDeploy spelling


def test_banner_has_urls_and_the_ssh_line():
    text = studio_app.banner(parse("--server-port", "7999"), _NoModel())
    assert "http://127.0.0.1:7999/" in text and "http://127.0.0.1:7999/v1" in text
    assert f"ssh -N -L 7999:127.0.0.1:7999 {getpass.getuser()}@{socket.gethostname()}" in text
    assert "WARNING" not in text


@pytest.mark.parametrize("extra, open_parts", [
    ((), ("the UI", "the API")),
    (("--auth", "me:secret"), ("the API",)),
    (("--api-keys", "k1"), ()),  # the UI then needs a login too (an API key as the password)
    (("--auth", "me:secret", "--api-keys", "k1"), ()),
])
def test_public_bind_warns_about_what_is_unprotected(extra, open_parts):
    text = studio_app.banner(parse("--server-name", "0.0.0.0", *extra), _NoModel())
    assert "ssh -N -L 7860:127.0.0.1:7860" in text
    if open_parts:
        assert "WARNING" in text and all(part in text for part in open_parts)
    else:
        assert "WARNING" not in text


def test_auth_must_be_user_colon_pass():
    assert studio_app.parse_auth("a:b") == ("a", "b")
    with pytest.raises(SystemExit):
        studio_app.parse_auth("nopassword")


def test_api_only_app_has_no_ui():
    from fastapi.testclient import TestClient

    app, manager = studio_app.create_app(parse("--no-model", "--no-ui"))
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code in (200, 503)
        assert client.get("/").status_code == 404
    assert manager.current is None


def test_auth_protects_the_ui_and_api_keys_the_api(demo_model_path):
    from fastapi.testclient import TestClient

    app, _ = studio_app.create_app(parse("--no-model", "--auth", "me:pw", "--api-keys", "k1",
                                         "--demo-model-dir", str(demo_model_path)))
    with TestClient(app) as client:
        assert client.get("/config").status_code == 401
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert client.post("/login", data={"username": "me", "password": "pw"}).status_code == 200
        assert client.get("/config").status_code == 200


class _NoModel:
    current = None


def test_busy_port_is_reported_before_any_model_loads(monkeypatch, capsys):
    def must_not_load(args):
        raise AssertionError("create_app ran although the port is taken")

    monkeypatch.setattr(studio_app, "create_app", must_not_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert studio_app.main(["--server-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "--server-port" in err
