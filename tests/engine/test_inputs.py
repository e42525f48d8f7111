"""Typed request inputs: validation, and prefix-cache block hashes that take images' content hashes as extra keys."""

from __future__ import annotations

import pytest
import torch

from engine.block_manager import BlockManager
from engine.config import GenerationConfig
from engine.inputs import MultiModalItem, RequestInput, tensor_hash
from engine.sequence import SamplingState, Sequence

BS = 4


def _seq(ids, items=()):
    return Sequence(ids, SamplingState(GenerationConfig(), 0, frozenset()), 64, BS, items)


def _image(offset, length, value):
    pixels = torch.full((3, 2, 2), float(value))
    return MultiModalItem(offset, length, tensor_hash(pixels), pixel_values=pixels)


def test_tensor_hash_tells_contents_apart():
    a, b = torch.zeros(3, 2, 2), torch.zeros(3, 2, 2)
    assert tensor_hash(a) == tensor_hash(b)
    b[0, 0, 0] = 1e-3
    assert tensor_hash(a) != tensor_hash(b)
    assert tensor_hash(a) != tensor_hash(a.reshape(3, 4))


def test_request_input_rejects_bad_items():
    with pytest.raises(ValueError, match="overlaps"):
        RequestInput([0] * 8, (_image(0, 4, 1), _image(2, 4, 2)))
    with pytest.raises(ValueError, match="runs past"):
        RequestInput([0] * 8, (_image(6, 4, 1),))
    with pytest.raises(ValueError, match="exactly one"):
        MultiModalItem(0, 2, 1)
    inp = RequestInput([0] * 12, (_image(8, 2, 1), _image(1, 3, 2)))
    assert [m.offset for m in inp.mm_items] == [1, 8] and inp.num_images == 2


def test_extra_keys_only_on_blocks_with_placeholders():
    seq = _seq(list(range(16)), (_image(5, 2, 1),))
    assert seq.block_extra_keys(0) == ()
    assert seq.block_extra_keys(1) == (seq.mm_items[0].content_hash,)
    assert seq.block_extra_keys(2) == ()


def _run_prefill(bm, seq):
    bm.allocate(seq)
    seq.num_computed_tokens = len(seq)
    bm.register_computed_blocks(seq)
    bm.deallocate(seq)


def test_prefix_cache_separates_images_and_reuses_the_same_one():
    ids = [7] * 13  # three full blocks, placeholders in the second
    bm = BlockManager(num_blocks=32, block_size=BS)
    _run_prefill(bm, _seq(ids, (_image(4, 4, 1),)))
    other = _seq(ids, (_image(4, 4, 2),))  # same placeholder ids, another image
    bm.allocate(other)
    assert other.num_cached_tokens == BS  # only the text block before the image is shared
    bm.deallocate(other)
    same = _seq(ids, (_image(4, 4, 1),))
    bm.allocate(same)
    assert same.num_cached_tokens == 3 * BS
    bm.deallocate(same)
    text = _seq(ids)
    bm.allocate(text)
    assert text.num_cached_tokens == BS  # a text-only prompt never reads a block an image filled


def test_text_only_hashing_unchanged():
    bm = BlockManager(num_blocks=16, block_size=BS)
    _run_prefill(bm, _seq(list(range(9))))
    again = _seq(list(range(9)) + [99])
    bm.allocate(again)
    assert again.num_cached_tokens == 2 * BS
