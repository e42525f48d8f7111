"""Calibration data: local files in every supported form, and fast, clear errors offline or on bad input."""

from __future__ import annotations

import json
import time

import pytest
import torch

from quant.calib_data import (
    BUILTIN,
    CalibDataError,
    check_calib_source,
    describe_calib_source,
    iter_builtin_texts,
    load_calib_samples,
)

TEXTS = [f"Record number {i} says the quick brown fox jumps over {i % 7} lazy dogs." for i in range(200)]


def expected_blocks(tokenizer, texts, n, seqlen):
    ids = []
    for t in texts:
        ids += tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n * seqlen]).view(n, seqlen)


def test_txt_is_concatenated_and_cut_into_blocks(tokenizer, calib_txt):
    blocks = load_calib_samples(calib_txt, tokenizer, n_samples=4, seqlen=64)
    assert blocks.shape == (4, 64) and blocks.dtype == torch.long
    ids = tokenizer(calib_txt.read_text(), add_special_tokens=False)["input_ids"]
    assert torch.equal(blocks.flatten(), torch.tensor(ids[: 4 * 64]))


def test_jsonl_records_and_chats(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS[:100])]
    lines.append("")  # blank lines are skipped
    lines += [json.dumps({"messages": [{"role": "user", "content": t}]}) for t in TEXTS[100:]]
    path.write_text("\n".join(lines))
    blocks = load_calib_samples(path, tokenizer, n_samples=8, seqlen=32)
    assert torch.equal(blocks, expected_blocks(tokenizer, TEXTS, 8, 32))


def test_json_parquet_csv_and_saved_dataset(tokenizer, tmp_path):
    import datasets

    want = expected_blocks(tokenizer, TEXTS, 6, 32)
    (tmp_path / "list.json").write_text(json.dumps([{"text": t} for t in TEXTS]))
    (tmp_path / "columns.json").write_text(json.dumps({"text": TEXTS}))
    ds = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))})
    ds.to_parquet(str(tmp_path / "data.parquet"))
    ds.to_csv(str(tmp_path / "data.csv"), index=False)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    for name in ("list.json", "columns.json", "data.parquet", "data.csv", "saved"):
        assert torch.equal(load_calib_samples(tmp_path / name, tokenizer, 6, 32), want), name


def test_short_data_gives_fewer_blocks_or_a_clear_error(tokenizer, tmp_path, caplog):
    path = tmp_path / "short.txt"
    path.write_text(" ".join(TEXTS[:10]))
    n_tokens = len(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    blocks = load_calib_samples(path, tokenizer, n_samples=1000, seqlen=32)
    assert blocks.shape == (n_tokens // 32, 32)
    assert "instead of the 1000 asked for" in caplog.text
    with pytest.raises(CalibDataError, match="fewer than one block"):
        load_calib_samples(path, tokenizer, n_samples=4, seqlen=n_tokens + 1)


def test_unknown_name_missing_file_bad_suffix(tokenizer, tmp_path):
    with pytest.raises(CalibDataError, match="unknown calibration dataset 'wikitext3'.*local file"):
        load_calib_samples("wikitext3", tokenizer, 4, 32)
    with pytest.raises(CalibDataError, match="does not exist"):
        check_calib_source(tmp_path / "nope.jsonl")
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(CalibDataError, match="unsupported calibration file type"):
        check_calib_source(tmp_path / "data.xml")


def test_hub_name_offline_env_fails_fast(tokenizer, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the loader turns these import-time flags on to honour the variable; put them back afterwards
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    t0 = time.perf_counter()
    expect = r"offline \(HF_HUB_OFFLINE is set\).*Instead, use the built-in offline set 'builtin'.*path/to/data.txt"
    with pytest.raises(CalibDataError, match=expect):
        load_calib_samples("wikitext2", tokenizer, 4, 32)
    assert time.perf_counter() - t0 < 15


def test_hub_name_unreachable_fails_fast(tokenizer, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    t0 = time.perf_counter()
    with pytest.raises(CalibDataError, match="cannot be reached.*HF_HUB_OFFLINE=1.*local file"):
        load_calib_samples("pileval", tokenizer, 4, 32, hub_timeout=2.0)
    assert time.perf_counter() - t0 < 5


def test_builtin_set_works_offline_from_text_the_machine_has(tokenizer, monkeypatch):
    """The default set needs no network and no file: Python's licence, pydoc topics and stdlib docstrings."""
    import pydoc_data.topics
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert check_calib_source(BUILTIN) == BUILTIN and check_calib_source("BuiltIn") == BUILTIN
    blocks = load_calib_samples(BUILTIN, tokenizer, n_samples=32, seqlen=256)
    assert blocks.shape == (32, 256)
    texts = iter_builtin_texts()
    first = [next(texts) for _ in range(3)]
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in first[0]  # the licence first, then the reference docs
    assert first[1].strip() == pydoc_data.topics.topics[sorted(pydoc_data.topics.topics)[0]].strip()
    # the same text in the same order every time: the blocks are the tokenized start of that text
    again = load_calib_samples(BUILTIN, tokenizer, n_samples=32, seqlen=256)
    assert torch.equal(blocks, again)
    ids = tokenizer("".join(first), add_special_tokens=False)["input_ids"]
    n = min(len(ids), 256) - 8  # compare well inside the first block (token boundaries at text joins may differ)
    assert blocks[0, :n].tolist() == ids[:n]
    assert "offline" in describe_calib_source(BUILTIN)


def test_builtin_set_is_big_enough_for_the_usual_default(tokenizer):
    """128 x 2048 tokens (AutoAWQ's default size) come out of the built-in text in full."""
    blocks = load_calib_samples(BUILTIN, tokenizer, n_samples=128, seqlen=2048)
    assert blocks.shape == (128, 2048)
