"""The typed request input that flows pipeline -> engine -> sequence -> model runner: the prompt's token ids plus
its multimodal items (an image's pixels or precomputed features, where its placeholder tokens sit, a content hash).

The content hash keys both the encoder cache (an image is encoded once, however many turns mention it) and the
prefix cache (engine/block_manager.py: a block covering an image's placeholders hashes the image too, so two
different images behind the same placeholder ids never share a cached block, and the same image does).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


def tensor_hash(*tensors: torch.Tensor, extra: tuple = ()) -> int:
    """A stable 63-bit hash of tensors' bytes (shape and dtype included) and some extra values."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(repr(extra).encode())
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass(frozen=True, eq=False)
class MultiModalItem:
    """One image of a prompt. Its `length` placeholder tokens start at token position `offset`; the model writes
    the image's `length` feature vectors there. Either `pixel_values` (the image processor's output for this
    image: [3, H, W] or anyres tiles [num_tiles, 3, H, W], with `image_size` = the original (height, width)) or
    `features` ([length, hidden], already projected into the language model's embedding space) is given."""

    offset: int
    length: int
    content_hash: int
    pixel_values: torch.Tensor | None = None
    image_size: tuple[int, int] | None = None
    features: torch.Tensor | None = None

    def __post_init__(self):
        if self.offset < 0 or self.length < 1:
            raise ValueError(f"a multimodal item needs offset >= 0 and length >= 1, got {self.offset}, {self.length}")
        if (self.pixel_values is None) == (self.features is None):
            raise ValueError("a multimodal item takes pixel_values or features, exactly one of them")
        if self.features is not None and self.features.shape[0] != self.length:
            raise ValueError(f"features have {self.features.shape[0]} rows for {self.length} placeholder tokens")

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlaps(self, start: int, stop: int) -> bool:
        return self.offset < stop and start < self.end


@dataclass
class RequestInput:
    """A prompt ready for the engine: token ids (image placeholders included, expanded to one id per feature
    slot) and the multimodal items that fill those slots, in position order, never overlapping."""

    token_ids: list[int]
    mm_items: tuple[MultiModalItem, ...] = field(default_factory=tuple)

    def __post_init__(self):
        self.token_ids = list(self.token_ids)
        self.mm_items = tuple(sorted(self.mm_items, key=lambda m: m.offset))
        prev_end = 0
        for item in self.mm_items:
            if item.offset < prev_end or item.end > len(self.token_ids):
                raise ValueError(f"multimodal item at [{item.offset}, {item.end}) overlaps another or runs past "
                                 f"the prompt's {len(self.token_ids)} tokens")
            prev_end = item.end

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_images(self) -> int:
        return len(self.mm_items)


def block_extra_keys(mm_items: tuple[MultiModalItem, ...], start: int, stop: int) -> tuple[int, ...]:
    """Content hashes of the items whose placeholders overlap token positions [start, stop) (one block)."""
    return tuple(m.content_hash for m in mm_items if m.overlaps(start, stop))
