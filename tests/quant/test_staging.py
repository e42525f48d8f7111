"""A run killed during export leaves its `.NAME.tmp-PID-*` staging folder behind: the next export next to it deletes
the folders of dead writers (and only those), and none of them counts as a model folder."""

from __future__ import annotations

import os
import subprocess
import sys

from quant.export import clean_stale_staging, is_staging_dir, staged_output_dir


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_folders_of_dead_writers_are_cleaned_on_the_next_run(tmp_path):
    dead = tmp_path / f".model-awq.tmp-{dead_pid()}-0123abcd"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half written")
    (dead / "config.json").write_text("{}")
    alive = tmp_path / f".other-awq.tmp-{os.getppid()}-89abcdef"  # a writer that still runs: left alone
    alive.mkdir()
    ours = tmp_path / f".mine-awq.tmp-{os.getpid()}-00000000"
    ours.mkdir()
    unrelated = tmp_path / ".model-awq.tmp-notapid"
    unrelated.mkdir()
    assert is_staging_dir(dead) and is_staging_dir(alive) and not is_staging_dir(unrelated)
    with staged_output_dir(tmp_path / "model-awq") as out:
        (out / "config.json").write_text("{}")
    assert not dead.exists()
    assert alive.exists() and ours.exists() and unrelated.exists()
    assert (tmp_path / "model-awq" / "config.json").is_file()
    assert not any(is_staging_dir(p) for p in [tmp_path / "model-awq"])
    assert clean_stale_staging(tmp_path) == []  # nothing stale is left
