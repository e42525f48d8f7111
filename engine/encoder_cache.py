"""Image features for a step's prefill: the vision encoder cache and the input embeddings with images written in.

The cache maps a MultiModalItem's content hash to its projected features (on the device), least recently used
out first, bounded in bytes, so a conversation's later turns (which resend the same image) and the later chunks of
a chunked prefill skip the vision tower. A step encodes all the images it is missing in one call to the model
(one batch through the tower), then copies each image's rows for the token range the step covers: a chunk that
ends inside an image gets that image's first rows, the next chunk the rest.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: int) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is None:
            self.num_misses += 1
            return None
        self.num_hits += 1
        self._entries.move_to_end(key)
        return features

    def put(self, key: int, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if key in self._entries or size > self.max_bytes:
            return
        while self._entries and self.num_bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= old.numel() * old.element_size()
        self._entries[key] = features
        self.num_bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.num_bytes = 0


def image_embeddings(model, cache: EncoderCache, seqs, starts: list[int], counts: list[int],
                     input_ids: torch.Tensor) -> torch.Tensor | None:
    """inputs_embeds for a step whose sequence i feeds tokens [starts[i], starts[i] + counts[i]) (rows laid out in
    that order), with image features over the placeholders; None when no image overlaps the step."""
    pieces = []  # (row in the step, item, first feature row, end feature row)
    row = 0
    for seq, start, n in zip(seqs, starts, counts):
        for item in seq.mm_items:
            if item.overlaps(start, start + n):
                lo, hi = max(start, item.offset), min(start + n, item.end)
                pieces.append((row + lo - start, item, lo - item.offset, hi - item.offset))
        row += n
    if not pieces:
        return None
    features: dict[int, torch.Tensor] = {}
    missing = []
    for _, item, _, _ in pieces:
        if item.content_hash in features or any(m.content_hash == item.content_hash for m in missing):
            continue
        cached = cache.get(item.content_hash)
        if cached is not None and cached.shape[0] == item.length:
            features[item.content_hash] = cached
        else:
            missing.append(item)
    if missing:
        for item, f in zip(missing, model.encode_images(missing)):
            features[item.content_hash] = f
            cache.put(item.content_hash, f)
    embeds = model.embed_input_ids(input_ids)  # [num_tokens, hidden]
    for row, item, lo, hi in pieces:
        embeds[row : row + hi - lo] = features[item.content_hash][lo:hi].to(embeds.dtype)
    return embeds
