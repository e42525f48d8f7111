"""Calibration data: the built-in offline set (`builtin`, the default), hub dataset names (wikitext2, ptb, c4,
pileval through `datasets.load_dataset`) or local files (.txt, .jsonl, .json, .csv, .parquet, or a folder written by
`datasets.save_to_disk`).

`builtin` needs no network and no file: it is English prose every Python installation already has, read on the
spot in a fixed order: Python's licence, the reference documentation behind `help()` (`pydoc_data.topics`), then
the docstrings of the standard library's modules, classes and functions (about 1.3 MB of text, a few hundred
thousand tokens; reading stops once enough tokens are there).

LMDeploy style: the texts are concatenated, tokenized, and cut into `n_samples` blocks of `seqlen` tokens
(consecutive, non-overlapping). Hub datasets are shuffled with a fixed seed first so the blocks do not all come
from the first article; local files are read in order. Offline, a hub name fails fast with a message that says what
to use instead: `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` are honoured, and otherwise the hub endpoint is probed
with a short timeout before `datasets` gets a chance to retry for minutes.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
import random
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import envs
from engine.hub import hub_unreachable_reason
from quant.errors import CalibDataError

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "content", "sentence", "document", "prompt", "question", "instruction")
CHAT_COLUMNS = ("messages", "conversations", "conversation")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
HUB_TIMEOUT_S = 5.0  # connect timeout of the hub probe; datasets' own retries can take minutes offline
TOKENIZE_BATCH = 256  # texts per tokenizer call
TXT_CHUNK_CHARS = 1 << 16  # a .txt file is tokenized in pieces of about this many characters


@dataclass(frozen=True)
class HubDataset:
    path: str
    name: str | None
    split: str
    column: str
    data_files: dict = field(default_factory=dict)


HUB_DATASETS = {
    "wikitext2": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    "ptb": HubDataset("ptb-text-only/ptb_text_only", "penn_treebank", "train", "sentence"),
    "c4": HubDataset("allenai/c4", None, "train", "text", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}),
    "pileval": HubDataset("mit-han-lab/pile-val-backup", None, "validation", "text"),
}

BUILTIN = "builtin"
BUILTIN_DESCRIPTION = "built-in offline text (Python's licence, reference docs and standard-library docstrings)"
_LOCAL_HINT = (
    f"use the built-in offline set '{BUILTIN}' (text this machine already has), or a local file: "
    "path/to/data.txt (plain text), .jsonl / .json (records with a 'text' field), .csv / .parquet (a 'text' "
    "column), or a folder written by datasets' save_to_disk"
)


def hub_offline_reason(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """None when the hub may be used (no offline variable set, its endpoint answers within `timeout`); else why."""
    var = envs.hf_offline_variable()
    return f"{var} is set" if var else hub_unreachable_reason(timeout)


def _apply_offline_env() -> None:
    """datasets / huggingface_hub read the offline variables at import; honour them if they were set later."""
    import datasets

    datasets.config.HF_HUB_OFFLINE = True
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def _check_hub(key: str, timeout: float) -> None:
    spec = HUB_DATASETS[key]
    if envs.hf_offline_variable():
        return  # may still be in the local datasets cache: loading will tell
    reason = hub_offline_reason(timeout)
    if reason is not None:
        raise CalibDataError(
            f"calibration dataset {key!r} comes from the Hugging Face hub ({spec.path}), which cannot be reached: "
            f"{reason}. If it is in your local datasets cache, set HF_HUB_OFFLINE=1 before starting; otherwise "
            f"{_LOCAL_HINT}."
        )


def _load_hub_texts(key: str, timeout: float) -> list[str]:
    spec = HUB_DATASETS[key]
    _check_hub(key, timeout)
    offline = envs.hf_offline_variable()
    try:
        import datasets

        if offline:
            _apply_offline_env()
        kwargs = {"split": spec.split}
        if spec.data_files:
            kwargs["data_files"] = spec.data_files
        ds = datasets.load_dataset(spec.path, spec.name, **kwargs)
    except Exception as e:
        where = f"offline ({offline} is set) and it is not in the local datasets cache" if offline else "failed"
        raise CalibDataError(
            f"loading calibration dataset {key!r} ({spec.path}) {where}: {type(e).__name__}: {e}. Instead, "
            f"{_LOCAL_HINT}."
        ) from e
    texts = [t for t in ds[spec.column] if isinstance(t, str) and t.strip()]
    random.Random(42).shuffle(texts)
    return texts


def _record_text(rec, columns: Iterable[str] | None = None) -> str | None:
    """The text of one record: a string, a dict's text-like field, or a chat's joined message contents."""
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return None
    for col in columns or TEXT_COLUMNS:
        v = rec.get(col)
        if isinstance(v, str):
            return v
    for col in CHAT_COLUMNS:
        msgs = rec.get(col)
        if isinstance(msgs, list):
            parts = [m.get("content") or m.get("value") for m in msgs if isinstance(m, dict)]
            parts = [p for p in parts if isinstance(p, str)]
            if parts:
                return "\n".join(parts)
    for v in rec.values():
        if isinstance(v, str):
            return v
    return None


def _pick_column(names: list[str], path: Path) -> str:
    for col in (*TEXT_COLUMNS, *CHAT_COLUMNS):
        if col in names:
            return col
    raise CalibDataError(f"{path} has no text column (looked for {', '.join(TEXT_COLUMNS)}); its columns: {names}")


def _iter_txt(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        buf: list[str] = []
        size = 0
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= TXT_CHUNK_CHARS:
                yield "".join(buf)
                buf, size = [], 0
        if buf:
            yield "".join(buf)


def _iter_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibDataError(f"{path}:{lineno} is not valid JSON: {e}") from e
            text = _record_text(rec)
            if text:
                yield text + "\n\n"


def _iter_json(path: Path) -> Iterator[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CalibDataError(f"{path} is not valid JSON ({e}); for one record per line name it .jsonl") from e
    if isinstance(data, dict):
        lists = [v for k, v in data.items() if isinstance(v, list) and k in (*TEXT_COLUMNS, "data", "train", "rows")]
        if not lists:
            raise CalibDataError(f"{path}: expected a list of records, or an object with a 'text' / 'data' list")
        data = lists[0]
    if not isinstance(data, list):
        raise CalibDataError(f"{path}: expected a list of records or strings")
    for rec in data:
        text = _record_text(rec)
        if text:
            yield text + "\n\n"


def _iter_csv(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        col = _pick_column(list(reader.fieldnames or []), path)
        for row in reader:
            if row.get(col):
                yield row[col] + "\n\n"


def _iter_table_rows(rows: Iterable[dict], column: str) -> Iterator[str]:
    for row in rows:
        text = _record_text(row, columns=(column,))
        if text:
            yield text + "\n\n"


def _iter_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    col = _pick_column(pf.schema_arrow.names, path)
    for batch in pf.iter_batches(columns=[col], batch_size=1024):
        yield from _iter_table_rows(batch.to_pylist(), col)


def _iter_saved_dataset(path: Path) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise CalibDataError(f"{path} is a folder but not one written by datasets' save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    col = _pick_column(list(ds.column_names), path)
    yield from _iter_table_rows(ds.select_columns([col]), col)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _licence_texts() -> Iterator[str]:
    for place in (Path(sys.base_prefix), _stdlib_dir(), Path(sys.prefix)):
        licence = place / "LICENSE.txt"
        if licence.is_file():
            yield licence.read_text(encoding="utf-8", errors="replace")
            return


def _pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions leave it out; the docstrings are still there
        return
    for key in sorted(topics):
        yield topics[key] + "\n\n"


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 80:  # one-liners are mostly "Return x."; prose is what calibrates
                yield doc + "\n\n"


def _stdlib_files() -> list[Path]:
    """The standard library's .py files in a fixed order; tests, bundled third-party trees and caches left out."""
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__", "config-3"}
    files = []
    for dirpath, dirnames, filenames in os.walk(_stdlib_dir()):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("config-"))
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files)


def _stdlib_docstrings() -> Iterator[str]:
    for f in _stdlib_files():
        yield from _docstrings(f)


def iter_builtin_texts() -> Iterator[str]:
    """The built-in offline calibration text, in its fixed order (see the module docstring)."""
    yield from _licence_texts()
    yield from _pydoc_topics()
    yield from _stdlib_docstrings()


def describe_calib_source(name_or_path: str | os.PathLike) -> str:
    """What a calibration set is, in words (for the UI and the report)."""
    key = str(name_or_path)
    if key.lower() == BUILTIN:
        return BUILTIN_DESCRIPTION
    if key.lower() in HUB_DATASETS:
        return f"{key.lower()} from the Hugging Face hub ({HUB_DATASETS[key.lower()].path})"
    path = Path(key).expanduser()
    if path.is_file():
        return f"local file {path.name}"
    if path.is_dir():
        return f"local dataset folder {path.name}"
    return key


_LOCAL_READERS = {
    ".txt": _iter_txt,
    ".jsonl": _iter_jsonl,
    ".json": _iter_json,
    ".csv": _iter_csv,
    ".parquet": _iter_parquet,
}


def check_calib_source(name_or_path: str | os.PathLike, hub_timeout: float = HUB_TIMEOUT_S) -> str:
    """ "builtin", "local" or "hub"; raises CalibDataError at once for an unknown name, a missing or unsupported
    file, or an unreachable hub, so a bad calibration set fails before the model is loaded."""
    key = str(name_or_path)
    if key.lower() == BUILTIN:
        return BUILTIN
    path = Path(key).expanduser()
    if path.is_dir():
        return "local"
    if path.is_file():
        if path.suffix.lower() not in _LOCAL_READERS:
            raise CalibDataError(
                f"{path}: unsupported calibration file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}"
            )
        return "local"
    if key.lower() in HUB_DATASETS:
        _check_hub(key.lower(), hub_timeout)
        return "hub"
    if path.suffix.lower() in LOCAL_SUFFIXES or os.sep in key:
        raise CalibDataError(f"calibration file {key!r} does not exist")
    raise CalibDataError(
        f"unknown calibration dataset {key!r}: use one of {', '.join(HUB_DATASETS)} (from the Hugging Face hub), "
        f"or {_LOCAL_HINT}"
    )


def iter_calib_texts(name_or_path: str | os.PathLike, hub_timeout: float = HUB_TIMEOUT_S) -> Iterator[str]:
    """Texts of a calibration set, in the order they are used."""
    kind = check_calib_source(name_or_path, hub_timeout)
    path = Path(str(name_or_path)).expanduser()
    if kind == BUILTIN:
        return iter_builtin_texts()
    if kind == "hub":
        return iter(_load_hub_texts(str(name_or_path).lower(), hub_timeout))
    if path.is_dir():
        return _iter_saved_dataset(path)
    return _LOCAL_READERS[path.suffix.lower()](path)


def load_calib_samples(
    name_or_path: str | os.PathLike,
    tokenizer,
    n_samples: int = 128,
    seqlen: int = 2048,
    *,
    hub_timeout: float = HUB_TIMEOUT_S,
) -> torch.Tensor:
    """Token blocks for calibration: LongTensor [n, seqlen], n = n_samples unless the data is shorter.

    Fewer than n_samples blocks (but at least one) -> a warning and the blocks there are; not one -> CalibDataError.
    """
    if n_samples < 1 or seqlen < 1:
        raise CalibDataError(f"calib samples and seqlen must be positive, got {n_samples} and {seqlen}")
    needed = n_samples * seqlen
    ids: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        enc = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for row in enc:
            ids.extend(row)
        batch.clear()

    for text in iter_calib_texts(name_or_path, hub_timeout):
        if not text.strip():
            continue
        batch.append(text)
        if len(batch) >= TOKENIZE_BATCH:
            flush()
            if len(ids) >= needed:
                break
    if batch and len(ids) < needed:
        flush()
    n_blocks = min(n_samples, len(ids) // seqlen)
    if n_blocks == 0:
        raise CalibDataError(
            f"calibration data {str(name_or_path)!r} gives {len(ids)} tokens, fewer than one block of "
            f"{seqlen} tokens; give more text or a shorter sequence length"
        )
    if n_blocks < n_samples:
        log.warning(
            "calibration data %s gives %d tokens: %d blocks of %d instead of the %d asked for",
            name_or_path,
            len(ids),
            n_blocks,
            seqlen,
            n_samples,
        )
    return torch.tensor(ids[: n_blocks * seqlen], dtype=torch.long).view(n_blocks, seqlen)
