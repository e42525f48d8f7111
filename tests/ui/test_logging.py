"""Server logs a person can read: the UI's plumbing (the memory panel's once-a-second poll, queue traffic, static
files) leaves no access lines, API requests and failures keep theirs, and a UI action logs one INFO line."""

from __future__ import annotations

import logging

import httpx
import pytest


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_log():
    logger = logging.getLogger("uvicorn.access")
    handler, level = Capture(), logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def paths(handler: Capture) -> list[str]:
    return [str(r.args[2]) for r in handler.records if isinstance(r.args, tuple) and len(r.args) >= 5]


def test_ui_polling_is_quiet_and_api_requests_are_logged(studio, client, access_log):
    for _ in range(3):
        client.predict(api_name="/memory")  # what every open tab does once a second
    httpx.get(studio.url + "/config", timeout=30)
    assert httpx.get(studio.url + "/v1/models", timeout=30).status_code in (200, 503)
    assert httpx.get(studio.url + "/gradio_api/no-such-route", timeout=30).status_code == 404
    logged = paths(access_log)
    assert "/v1/models" in logged, logged
    assert "/gradio_api/no-such-route" in logged, logged  # failures keep their line
    assert not [p for p in logged if p.startswith("/gradio_api/") and p != "/gradio_api/no-such-route"], logged
    assert "/config" not in logged


def test_a_ui_action_logs_one_info_line_without_a_traceback(studio, client, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ui")
    status = client.predict(str(tmp_path / "no-such-model"), "auto", "auto", 0, 0.2, 0, 16, False,
                            api_name="/load_model")[0]
    assert "does not exist" in status
    lines = [r for r in caplog.records if r.name.startswith("ui")]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, [r.getMessage() for r in lines]
    assert "does not exist" in lines[0].getMessage() and lines[0].exc_info is None
