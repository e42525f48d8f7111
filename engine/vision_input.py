"""Prompts with images -> RequestInput, for vision-language models (LLaVA): each image's encoded bytes are read under
the media policy (engine/media.py) and hashed before any work; an image prepared lately (same hash) is taken from a
small memo, any other is decoded once and preprocessed (engine/vision/preprocess.py: on the GPU, or with PIL on a CPU
engine); the chat template places an `<image>` marker where each image part was, the text is tokenized, and each
marker becomes as many placeholder tokens as the image has feature rows (its size decides: models/llava.py's
`num_features`), with a MultiModalItem (pixels, content hash) over them. The content hash keys the encoder cache and
the prefix cache too, so a repeated image skips preprocessing, the tower and its prefix blocks' prefill.

Prompt forms: a string (one user turn, or raw text with apply_chat_template=False), OpenAI-style messages whose
content may hold `{"type": "image_url", "image_url": {"url": ...}}` parts (or HF-style `{"type": "image", "image":
PIL}` parts), and `(text, image)` / `(text, [images])` tuples from Python callers (PIL images, bytes, paths, URLs;
trusted, so paths and URLs load without the folder / URL rules). In a tuple, `<image>` markers in the text say where
the images go; without any, the images come first.

Tokenizing: when the tokenizer has `<image>` as one token (llava-hf), the whole text is tokenized and each of those
tokens expanded, as transformers' processor does; otherwise (original-layout folders) the text is split at the
markers and the pieces tokenized one by one, as LLaVA's tokenizer_image_token does, with a placeholder id in the
image slots (their embeddings are replaced by the image features anyway).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from engine.errors import InvalidImageError
from engine.inputs import MultiModalItem, RequestInput
from engine.media import MediaPolicy, as_rgb, decode_image, encoded_image, encoded_size
from engine.vision.preprocess import image_tensor, preprocess, preprocess_pil

ROLES = ("system", "user", "assistant")


def media_policy(config) -> MediaPolicy:
    return MediaPolicy(allow_urls=config.allow_media_urls, allowed_local_dir=config.allowed_local_media_path,
                       max_images=config.limit_images_per_prompt, max_bytes=config.max_image_bytes,
                       max_pixels=config.max_image_pixels)


@dataclass(frozen=True)
class ImageRef:
    """An image part before loading: what names it, and whether that came from a trusted (Python) caller."""

    source: object
    trusted: bool


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: object  # torch.Tensor [3, H, W] or [num_tiles, 3, H, W]
    image_size: tuple[int, int]
    num_features: int
    content_hash: int


def _parts(content) -> list:
    """Message content -> a list of str (text) and ImageRef (image) parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(str(part.get("text") or ""))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise InvalidImageError("an image_url part needs {'image_url': {'url': 'data:image/png;base64,...'}}")
            out.append(ImageRef(url, trusted=False))
        elif kind == "image":
            source = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
            if source is None:
                raise InvalidImageError("an image part needs an 'image' (or 'url' / 'path') entry")
            out.append(ImageRef(source, trusted=not isinstance(source, str)))  # objects only come from Python
        else:
            raise ValueError(f"unsupported message content part {part!r}")
    return out


class VisionPrompter:
    """Builds a vision-language model's RequestInputs. Thread-safe: the image workers (engine/vision/workers.py)
    build several at once. Prepared images are remembered by content hash (bounded in bytes), so an image sent
    again (every chat turn resends the chat's images) is neither decoded nor preprocessed again."""

    def __init__(self, tokenizer, chat_template: str | None, processor, spec, config, device=None, dtype=None):
        self.tokenizer, self.chat_template, self.processor = tokenizer, chat_template, processor
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None and self.device.type == "cuda" else torch.float32
        # processors with a plain-torch / PIL description of their steps (LLaVA's) use it; the others (Qwen2-VL's
        # native-resolution processor) run their own transformers steps
        self.preprocess_backend = preprocess_backend(self.device) if hasattr(processor, "torch_config") else "hf"
        self.torch_config = processor.torch_config() if self.preprocess_backend != "hf" else None
        self.memo_bytes = config.image_memo_bytes
        self.policy = media_policy(config)
        self.marker = getattr(processor, "image_marker", "<image>")  # the template's image slot (Qwen2-VL's own)
        self.image_text = getattr(processor, "image_text", self.marker + "\n")  # an image in text without a template
        vision = spec.vision
        vocab = spec.vocab_size
        marker_id = tokenizer.convert_tokens_to_ids(self.marker)
        unk = getattr(tokenizer, "unk_token_id", None)
        is_one_token = (isinstance(marker_id, int) and marker_id != unk and 0 <= marker_id < vocab
                        and tokenizer.encode(self.marker, add_special_tokens=False) == [marker_id])
        self.marker_id = marker_id if is_one_token else None
        placeholder = vision.image_token_id if vision.image_token_id is not None else self.marker_id
        if placeholder is None or not 0 <= placeholder < vocab:
            placeholder = next((t for t in (getattr(tokenizer, "pad_token_id", None), unk, 0)
                                if t is not None and 0 <= t < vocab), 0)
        self.placeholder_id = int(placeholder)
        self._memo: OrderedDict[int, ProcessedImage] = OrderedDict()
        self._memo_used = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self.stats = {"images_decoded": 0, "image_memo_hits": 0}

    # ---- prompt -> text with markers + image refs -----------------------------------------------------------------
    def build(self, prompt, apply_chat_template: bool = True) -> RequestInput:
        if isinstance(prompt, tuple):
            text, refs = self._tuple_prompt(prompt)
            if apply_chat_template:
                parts = ([] if self.marker in text else list(refs)) + [text]
                text = self.render([{"role": "user", "content": parts}])
                return self.tokenize(text, refs, add_special_tokens=self._needs_bos(text))
            if self.marker not in text:
                text = self.image_text * len(refs) + text
            return self.tokenize(text, refs, add_special_tokens=True)
        if isinstance(prompt, str) and not apply_chat_template:
            return self.tokenize(prompt, [], add_special_tokens=True)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
            raise ValueError("a prompt is a string, a list of messages or a (text, images) tuple, got "
                             f"{type(prompt).__name__}")
        messages = self._messages(prompt)
        refs = [p for m in messages for p in m["content"] if isinstance(p, ImageRef)]
        text = self.render(messages)
        return self.tokenize(text, refs, add_special_tokens=self._needs_bos(text))

    def _tuple_prompt(self, prompt: tuple) -> tuple[str, list[ImageRef]]:
        if len(prompt) != 2 or not isinstance(prompt[0], str):
            raise ValueError("an image prompt is (text, image) or (text, [images])")
        images = prompt[1] if isinstance(prompt[1], list | tuple) else [prompt[1]]
        return prompt[0], [ImageRef(image, trusted=True) for image in images]

    def _messages(self, messages: list[dict]) -> list[dict]:
        clean = []
        for m in messages:
            if m.get("role") not in ROLES:
                raise ValueError(f"message role must be system, user or assistant, got {m.get('role')!r}")
            clean.append({"role": m["role"], "content": _parts(m.get("content"))})
        return clean

    def chat_text(self, messages: list[dict]) -> str:
        """OpenAI-style messages -> the chat template's text, `<image>` where the images go."""
        return self.render(self._messages(messages))

    def render(self, messages: list[dict]) -> str:
        """The chat template's text with one marker per image. Templates written for multimodal content (llava-hf's:
        a list of {"type": "image"} / {"type": "text"} parts) get lists; a template that drops image parts or takes
        only strings gets strings, with "<image>\\n" where each image part was."""
        texts = [p for m in messages for p in m["content"] if isinstance(p, str)]
        num_images = sum(isinstance(p, ImageRef) for m in messages for p in m["content"])
        expected = num_images + sum(t.count(self.marker) for t in texts)
        as_lists = [{"role": m["role"], "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                                    {"type": "image"} for p in m["content"]]} for m in messages]
        try:
            text = self._apply(as_lists)
            if text.count(self.marker) == expected and all(t.strip() in text for t in texts):
                return text
        except Exception:  # noqa: BLE001 - a string-only template: render with strings below
            pass
        as_strings = [{"role": m["role"], "content": "".join(p if isinstance(p, str) else self.image_text
                                                             for p in m["content"])} for m in messages]
        return self._apply(as_strings)

    def _needs_bos(self, text: str) -> bool:
        """llava-hf's templates leave the BOS to the tokenizer (transformers' processor tokenizes the rendered text
        with special tokens); templates that write it themselves (the fallback's bos_token) must not get two."""
        bos = getattr(self.tokenizer, "bos_token", None)
        return bool(bos) and not text.startswith(bos)

    def _apply(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)

    # ---- text + images -> RequestInput -------------------------------------------------------------------------
    def tokenize(self, text: str, refs: list, add_special_tokens: bool) -> RequestInput:
        wrap = getattr(self.processor, "image_wrap", None)  # InternVL: <img> ... </img> around an image's tokens
        if wrap and refs:
            text = text.replace(self.marker, wrap[0] + self.marker + wrap[1])
        if len(refs) > self.policy.max_images:
            raise InvalidImageError(f"the prompt has {len(refs)} images; at most {self.policy.max_images} are "
                                    "allowed per request")
        if self.marker_id is not None:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            slots = [i for i, t in enumerate(ids) if t == self.marker_id]
            pieces = [ids[a + 1 : b] for a, b in zip([-1] + slots, slots + [len(ids)])]
        else:
            chunks = text.split(self.marker)
            pieces = [self.tokenizer.encode(c, add_special_tokens=add_special_tokens and i == 0) if c or i == 0
                      else [] for i, c in enumerate(chunks)]
        if len(pieces) - 1 != len(refs):
            raise InvalidImageError(f"the prompt has {len(pieces) - 1} {self.marker} marker(s) for {len(refs)} "
                                    f"image(s): send one image per marker (or no {self.marker} in the text)")
        images = [self.process(ref) for ref in refs]
        token_ids, items = list(pieces[0]), []
        for image, piece in zip(images, pieces[1:]):
            items.append(MultiModalItem(offset=len(token_ids), length=image.num_features,
                                        content_hash=image.content_hash, pixel_values=image.pixel_values,
                                        image_size=image.image_size))
            token_ids += [self.placeholder_id] * image.num_features
            token_ids += piece
        return RequestInput(token_ids, tuple(items))

    def process(self, ref: ImageRef) -> ProcessedImage:
        """One image: its content hash first (from the encoded bytes, or a given PIL image's pixels), then, unless
        an identical image was prepared lately, decoded once and preprocessed (on the engine's GPU when it has
        one, else by transformers' processor)."""
        encoded = encoded_image(ref.source, self.policy, trusted=ref.trusted)
        key = content_hash(encoded)
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None:
                self._memo.move_to_end(key)
                self.stats["image_memo_hits"] += 1
                return hit
        image = as_rgb(encoded) if isinstance(encoded, Image.Image) else decode_image(encoded, self.policy)
        with self._lock:
            self.stats["images_decoded"] += 1
        try:
            pixels, size = self._preprocess(image)
        except Exception as e:  # noqa: BLE001 - PIL / numpy failures on odd images
            raise InvalidImageError(f"the image could not be prepared for the model ({type(e).__name__}: {e})") from e
        del image
        processed = ProcessedImage(pixels, size, self.processor.num_features(size), key)
        size_bytes = pixels.numel() * pixels.element_size()
        with self._lock:
            if key not in self._memo and size_bytes <= self.memo_bytes:
                self._memo[key] = processed
                self._memo_used += size_bytes
                while self._memo_used > self.memo_bytes:
                    _, old = self._memo.popitem(last=False)
                    self._memo_used -= old.pixel_values.numel() * old.pixel_values.element_size()
        return processed

    def _preprocess(self, image):
        """RGB PIL image -> (pixel_values, (height, width))."""
        size = (image.height, image.width)
        if self.torch_config is not None and self.torch_config.square_fill is not None:
            size = (max(size), max(size))  # original LLaVA-1.5 "pad": the image is the padded square, as in "hf"
        if self.preprocess_backend == "hf":
            return self.processor(image)
        if self.preprocess_backend == "pil":
            return preprocess_pil(image, self.torch_config), size
        if self.device.type != "cuda":
            return preprocess(image_tensor(image), self.torch_config), size
        stream = getattr(self._local, "stream", None)
        if stream is None:  # one stream per worker thread: its work never waits behind the engine's steps
            stream = self._local.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            pixels = preprocess(image_tensor(image, self.device), self.torch_config).to(self.dtype)
        stream.synchronize()  # ready before the engine's stream reads it (encode_images records that use)
        return pixels, size

    def image_load(self, prompt) -> tuple[int, int]:
        """(images, an upper bound of their encoded bytes) of a prompt, without reading any image."""
        if isinstance(prompt, tuple):
            refs = self._tuple_prompt(prompt)[1]
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            refs = [p for m in prompt for p in _parts(m.get("content")) if isinstance(p, ImageRef)]
        else:
            refs = []
        return len(refs), sum(encoded_size(r.source, self.policy) for r in refs)

    def memory(self) -> dict:
        with self._lock:
            return {**self.stats, "image_memo_bytes": self._memo_used, "image_memo_capacity_bytes": self.memo_bytes,
                    "image_memo_entries": len(self._memo), "image_preprocess": self.preprocess_backend}


def content_hash(encoded) -> int:
    """A 63-bit hash of an image's encoded bytes, or of a PIL image's mode, size and pixels."""
    h = hashlib.blake2b(digest_size=8)
    if isinstance(encoded, bytes | bytearray):
        h.update(b"bytes:")
        h.update(encoded)
    else:
        h.update(repr(("pixels", encoded.mode, encoded.size)).encode())
        h.update(encoded.tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def preprocess_backend(device, requested: str | None = None) -> str:
    """How images are preprocessed: "torch" (engine/vision/preprocess.py's tensor ops on the engine's device),
    "pil" (the same steps with PIL's resize: transformers' PIL processor exactly, without its full-size copies) or
    "hf" (transformers' processor itself). Measured on CPU (a 640x480 photo, one core): PIL's resize 2.7 ms, torch's
    4.1 ms, and torch's multi-threaded ops contend with the engine's own CPU work; transformers' processor holds
    about 3.5 copies of a full-size image (a 40-megapixel PNG: ~550 MB per image being prepared). So a CPU engine
    uses "pil", a GPU engine "torch" on the GPU. ENGINE_IMAGE_PREPROCESS=torch|pil|hf overrides."""
    requested = requested or os.environ.get("ENGINE_IMAGE_PREPROCESS", "auto")
    if requested not in ("auto", "torch", "pil", "hf"):
        raise ValueError(f"ENGINE_IMAGE_PREPROCESS must be auto, torch, pil or hf, got {requested!r}")
    if requested != "auto":
        return requested
    return "torch" if device is not None and torch.device(device).type == "cuda" else "pil"
