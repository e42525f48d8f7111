"""Images from what a prompt carries to RGB PIL images, under a policy: data URLs (base64) always, http(s) URLs only
when allowed (fetched with a timeout and a byte limit), local files only inside an allowed folder, PIL images as
they are. Every way an image can be refused (unreadable, not an image, too many bytes or pixels, a source that is
not allowed) raises InvalidImageError (a BadInputError: HTTP 400) with a message that says what to change.

Sources that come from a Python caller directly (`pipe((text, image))`) are trusted: their paths and URLs load
without the folder / URL rules (the size limits still apply). OpenAI-style message parts (what the API and the UI
send) are untrusted and follow the policy.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidImageError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what PIL is allowed to decode (no TIFF, PSD, EPS ...)
IMAGE_MIME_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp"}
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[\w.+-]+)*)(;base64)?,", re.IGNORECASE)


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may send as images. Defaults keep a server safe: no URL fetches, no local files."""

    allow_urls: bool = False  # fetch http(s) image URLs named in messages (the server makes the request)
    allowed_local_dir: str | None = None  # message image paths / file:// URLs must lie inside it; None: refused
    max_images: int = 4  # images in one prompt
    max_bytes: int = 20 * 2**20  # encoded bytes of one image
    max_pixels: int = 40_000_000  # width * height of one image (a decompression bomb is refused before decoding)
    max_aspect_ratio: float = 50.0  # long side / short side (resizing a 1 x 10000 strip would need huge buffers)
    url_timeout_s: float = 10.0


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def decode_data_url(url: str, policy: MediaPolicy) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidImageError("an image data URL must look like data:image/png;base64,<base64 bytes>")
    mime, _, is_base64 = match.groups()
    if mime is not None and mime.lower() not in IMAGE_MIME_TYPES:
        raise InvalidImageError(f"the data URL holds {mime!r}, not an image (send PNG, JPEG, WebP, GIF or BMP)")
    if not is_base64:
        raise InvalidImageError("an image data URL must be base64-encoded (data:image/png;base64,...)")
    payload = url[match.end():]
    if len(payload) * 3 // 4 > policy.max_bytes + 3:  # refused before decoding anything
        raise InvalidImageError(f"the image is larger than {policy.max_bytes} bytes")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError(f"the image data URL is not valid base64 ({e})") from None
    return data


def fetch_url(url: str, policy: MediaPolicy) -> bytes:
    """GET an http(s) image with a timeout, reading at most max_bytes + 1 bytes."""
    request = urllib.request.Request(url, headers={"User-Agent": "quant-studio", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=policy.url_timeout_s) as response:  # noqa: S310 - http(s) only
            kind = (response.headers.get_content_type() or "").lower()
            if kind.startswith("text/") or kind in ("application/json", "application/xml"):
                raise InvalidImageError(f"the image URL {_short(url)} returned {kind}, not an image")
            data = response.read(policy.max_bytes + 1)
    except InvalidImageError:
        raise
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, HTTP error status ...
        raise InvalidImageError(f"the image URL {_short(url)} could not be fetched ({type(e).__name__}: {e})") from None
    if len(data) > policy.max_bytes:
        raise InvalidImageError(f"the image at {_short(url)} is larger than {policy.max_bytes} bytes")
    return data


def read_local_file(path: str | Path, policy: MediaPolicy, trusted: bool) -> bytes:
    p = Path(path).expanduser()
    if not trusted:
        if policy.allowed_local_dir is None:
            raise InvalidImageError("local image paths are not allowed here: send the image as a data URL "
                                    "(data:image/png;base64,...), or start the server with "
                                    "--allowed-local-media-path DIR")
        root = Path(policy.allowed_local_dir).expanduser().resolve()
        try:
            resolved = p.resolve()
        except (OSError, RuntimeError):
            raise InvalidImageError("the image path cannot be resolved") from None
        if not resolved.is_relative_to(root):
            raise InvalidImageError(f"image paths must lie inside the allowed media folder {root}")
        p = resolved
    if not p.is_file():
        raise InvalidImageError(f"no image file at {_short(str(path))}")
    size = p.stat().st_size
    if size > policy.max_bytes:
        raise InvalidImageError(f"the image file is larger than {policy.max_bytes} bytes")
    return p.read_bytes()


def source_bytes(source: str, policy: MediaPolicy, trusted: bool) -> bytes:
    """The encoded bytes a string source names: a data URL, an http(s) URL, a file:// URL or a path."""
    if source.startswith("data:"):
        return decode_data_url(source, policy)
    lowered = source[:8].lower()
    if lowered.startswith(("http://", "https://")):
        if not (trusted or policy.allow_urls):
            raise InvalidImageError("image URLs are not fetched by this server: send the image as a data URL "
                                    "(data:image/png;base64,...), or start the server with --allow-media-urls")
        return fetch_url(source, policy)
    if lowered.startswith("file://"):
        return read_local_file(urllib.request.url2pathname(source[len("file://"):]), policy, trusted)
    if "://" in source[:16]:
        raise InvalidImageError(f"unsupported image URL scheme in {_short(source)}: use data:, http(s): or a path")
    return read_local_file(source, policy, trusted)


def check_pixels(width: int, height: int, policy: MediaPolicy) -> None:
    if width < 1 or height < 1:
        raise InvalidImageError(f"the image has no pixels ({width} x {height})")
    if width * height > policy.max_pixels:
        raise InvalidImageError(f"the image has {width} x {height} pixels, more than the {policy.max_pixels} "
                                "allowed: scale it down")
    if max(width, height) / min(width, height) > policy.max_aspect_ratio:
        raise InvalidImageError(f"the image is {width} x {height}: its aspect ratio is above "
                                f"{policy.max_aspect_ratio:g}")


def decode_image(data: bytes, policy: MediaPolicy):
    """Encoded bytes -> RGB PIL image; the size is checked from the header before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > policy.max_bytes:
        raise InvalidImageError(f"the image is larger than {policy.max_bytes} bytes")
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        check_pixels(image.width, image.height, policy)
        image.load()
        return as_rgb(image)
    except InvalidImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise InvalidImageError("the data is not an image this server reads (PNG, JPEG, WebP, GIF or BMP)") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files fail in many ways inside PIL
        raise InvalidImageError(f"the image could not be decoded ({type(e).__name__}: {e})") from None


def encoded_image(source, policy: MediaPolicy, trusted: bool = False):
    """What names an image -> its encoded bytes (data URL, URL, path, bytes), or the PIL image a Python caller gave,
    checked against the policy but not decoded: what the content hash is taken from, before any work."""
    from PIL import Image

    if isinstance(source, Image.Image):
        check_pixels(source.width, source.height, policy)
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, Path):
        data = read_local_file(source, policy, trusted)
    elif isinstance(source, str):
        if not source:
            raise InvalidImageError("the image URL is empty")
        data = source_bytes(source, policy, trusted)
    else:
        raise InvalidImageError(f"an image must be a PIL image, bytes, a path or a URL, got {type(source).__name__}")
    if len(data) > policy.max_bytes:
        raise InvalidImageError(f"the image is larger than {policy.max_bytes} bytes")
    return data


def encoded_size(source, policy: MediaPolicy) -> int:
    """A cheap upper bound of an image's encoded bytes before reading it (what the image workers admit by)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return len(source)
    if isinstance(source, str) and source.startswith("data:"):
        return min(len(source) * 3 // 4, policy.max_bytes)
    if hasattr(source, "width") and hasattr(source, "height"):  # a PIL image: its pixels
        return source.width * source.height * 3
    return policy.max_bytes  # a path or URL: read later, at most max_bytes


def as_rgb(image):
    """A decoded (or given) PIL image in RGB, converted only when it is not already (a copy of a 40-megapixel
    image is 120 MB)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(source, policy: MediaPolicy, trusted: bool = False):
    """A PIL image, encoded bytes, a path or a URL string -> RGB PIL image, checked against the policy."""
    from PIL import Image

    encoded = encoded_image(source, policy, trusted)
    return as_rgb(encoded) if isinstance(encoded, Image.Image) else decode_image(encoded, policy)
