"""Prompts with images -> RequestInput, for vision-language models (LLaVA): the images are loaded under the media
policy (engine/media.py), the chat template places an `<image>` marker where each image part was, the text is
tokenized, and each marker becomes as many placeholder tokens as the image has feature rows (its size decides:
models/llava.py's `num_features`), with a MultiModalItem (pixels, content hash) over them.

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
import threading
from collections import OrderedDict
from dataclasses import dataclass

from engine.errors import InvalidImageError
from engine.inputs import MultiModalItem, RequestInput, tensor_hash
from engine.media import MediaPolicy, load_image

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
    """Builds a vision-language model's RequestInputs. Thread-safe: the API encodes on worker threads."""

    MEMO_ENTRIES = 8  # processed images kept by source (the API encodes a prompt twice: to check it, to run it)

    def __init__(self, tokenizer, chat_template: str | None, processor, spec, config):
        self.tokenizer, self.chat_template, self.processor = tokenizer, chat_template, processor
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
        self._memo: OrderedDict[bytes, ProcessedImage] = OrderedDict()
        self._lock = threading.Lock()

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
        key = self._memo_key(ref)
        if key is not None:
            with self._lock:
                hit = self._memo.get(key)
                if hit is not None:
                    self._memo.move_to_end(key)
                    return hit
        image = load_image(ref.source, self.policy, trusted=ref.trusted)
        try:
            pixels, size = self.processor(image)
        except Exception as e:  # noqa: BLE001 - PIL / numpy failures on odd images
            raise InvalidImageError(f"the image could not be prepared for the model ({type(e).__name__}: {e})") from e
        processed = ProcessedImage(pixels, size, self.processor.num_features(size), tensor_hash(pixels, extra=size))
        if key is not None:
            with self._lock:
                self._memo[key] = processed
                while len(self._memo) > self.MEMO_ENTRIES:
                    self._memo.popitem(last=False)
        return processed

    @staticmethod
    def _memo_key(ref: ImageRef) -> bytes | None:
        """Data URLs and bytes are remembered by content; URLs and paths are read again (their content may change)
        and PIL images are not hashed here."""
        source = ref.source
        if isinstance(source, str) and source.startswith("data:"):
            data = source.encode("utf-8", "surrogatepass")
        elif isinstance(source, bytes | bytearray):
            data = bytes(source)
        else:
            return None
        return hashlib.blake2b(data, digest_size=16).digest()
