"""Export staging folders: a kill during export leaves `.NAME.tmp-PID-*`; the next export removes those of dead
processes (never those of a live one) and they are never taken for models."""

from __future__ import annotations

import os
import subprocess
import sys

from quant.export import is_staging_dir, remove_stale_staging, staged_output_dir


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_dead_process_is_removed_on_next_export(tmp_path):
    stale = tmp_path / f".model-awq.tmp-{dead_pid()}-0123abcd"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half-written")
    live = tmp_path / f".other.tmp-{os.getpid()}-89abcdef"  # this process: still exporting
    live.mkdir()
    assert is_staging_dir(stale) and is_staging_dir(live) and not is_staging_dir(tmp_path / "model-awq")

    with staged_output_dir(tmp_path / "model-awq") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists(), "a dead export's staging folder must be cleaned on the next run"
    assert live.exists(), "a running export's staging folder must be left alone"
    assert (tmp_path / "model-awq" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not is_staging_dir(p)) == ["model-awq"]


def test_remove_stale_staging_ignores_ordinary_folders(tmp_path):
    (tmp_path / "my.tmp-folder").mkdir()
    (tmp_path / f".x.tmp-{dead_pid()}-nothex00").mkdir()  # not our pattern (suffix is not hex)
    assert remove_stale_staging(tmp_path) == []
    assert remove_stale_staging(tmp_path / "missing") == []
