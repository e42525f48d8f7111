"""Model folders written atomically: the one writer behind the quantizer's export (quant/export.py), the demo model
and the converted default model (studio/). A folder is written into a hidden staging sibling
(`.NAME.tmp-PID-XXXXXXXX`) and renamed onto its name only once complete, so a crash, a cancel or a concurrent
writer never leaves a half-written folder behind a complete-looking name; staging folders of dead writers are
cleaned up by the next write next to them. A marker file written last (`marker_matches`) tells a finished build of
the current recipe from anything else."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_STAGING = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def is_staging_dir(path: Path) -> bool:
    """A hidden `.NAME.tmp-PID-XXXXXXXX` folder: a model being written, never a model to list or load."""
    return _STAGING.match(path.name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process (or an odd pid): not ours to judge, keep its folder
    return True


def clean_stale_staging(parent: Path) -> list[Path]:
    """Delete the staging folders in `parent` whose writer process is gone (killed mid-write); returns them."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _STAGING.match(entry.name)
        if m is not None and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(m.group("pid"))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def staged_folder(target: str | os.PathLike, keep_if: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yields a hidden staging sibling of `target` to write into. On normal exit it replaces `target` (a folder
    already there is moved aside first and removed after); on any exception (cancel, Ctrl-C) it is deleted and
    `target` is left as it was. keep_if(target) -> True: a concurrent writer that finished first won the rename,
    and its folder is kept instead of failing."""
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target.parent)  # a writer killed before (SIGKILL, power loss) left its staging folder behind
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(target, old)
        except FileNotFoundError:
            old = None  # nothing there, or a concurrent writer moved it first
        try:
            os.replace(tmp, target)
        except OSError:
            if keep_if is None or not keep_if(target):  # the one expected failure: a concurrent writer finished
                raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def marker_matches(folder: str | os.PathLike, marker: str, key: str, version: int) -> bool:
    """True when `folder/marker` (JSON, written last by a build) says `key` == version: the folder is whole and of
    the current recipe."""
    try:
        return json.loads((Path(folder) / marker).read_text()).get(key) == version
    except (OSError, ValueError, AttributeError):
        return False
