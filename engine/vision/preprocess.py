"""LLaVA's image preprocessing as plain torch tensor ops, on whatever device the tensors live on (the engine's GPU, or
the CPU): resize (bicubic, antialiased), center crop, pad to square (original LLaVA-1.5's "pad"), LLaVA-NeXT's anyres
tiling (fit into the best grid, pad, cut into tiles, plus the whole image squashed as the base tile), rescale and
normalize. No torchvision (its wheel does not load beside CI's CPU torch).

It reproduces transformers' PIL image processors (CLIPImageProcessorPil, LlavaNextImageProcessorPil) step for step:
PIL resizes an 8-bit image in two passes (horizontal, then vertical), each rounded to 8 bits, with the antialiased
bicubic filter (a = -0.5) that torch's `interpolate(..., antialias=True)` also implements; so do we, which leaves
at most one 8-bit level between the two on a few pixels (tests/engine/test_vision_preprocess.py states the
tolerance). The horizontal pass of a large image runs in bands of rows, so a 40-megapixel photo never exists as
float32 all at once.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BAND_PIXELS = 4_000_000  # the horizontal pass converts at most this many source pixels to float at a time
BICUBIC = 3  # PIL's resampling code for bicubic: the only filter this module reproduces


@dataclass(frozen=True)
class PreprocessConfig:
    """What transformers' processor would do, as plain numbers (see `from_hf`)."""

    shortest_edge: int | None  # resize the short side to this, keeping the aspect ratio (CLIP) ...
    resize_hw: tuple[int, int] | None  # ... or to exactly (height, width); both None: no resize
    crop_hw: tuple[int, int] | None  # center crop; None: none
    rescale: float | None  # 1 / 255; None: none
    mean: tuple[float, ...] | None  # normalize; None: none
    std: tuple[float, ...] | None
    square_fill: tuple[int, int, int] | None = None  # pad to a square of this colour first (original 1.5 "pad")
    pinpoints: tuple[tuple[int, int], ...] = ()  # anyres grids (height, width); empty: one tile per image
    tile: int = 336  # anyres tile side
    base_hw: tuple[int, int] | None = None  # anyres: the base tile's resize (the whole image, squashed)

    @classmethod
    def from_hf(cls, hf, pinpoints=(), square_fill=None) -> PreprocessConfig:
        """From a transformers image processor (CLIPImageProcessor(Pil) / LlavaNextImageProcessor(Pil)) object."""
        if getattr(hf, "do_resize", True) and int(getattr(hf, "resample", BICUBIC)) != BICUBIC:
            raise ValueError(f"only bicubic resizing is reproduced, the processor uses resample={hf.resample}")

        def hw(size):
            if size is None:
                return None
            get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
            return (int(get("height")), int(get("width"))) if get("height") and get("width") else None

        size = hf.size
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        shortest = get("shortest_edge") if getattr(hf, "do_resize", True) else None
        resize_hw = hw(size) if getattr(hf, "do_resize", True) and not shortest else None
        crop_hw = hw(getattr(hf, "crop_size", None)) if getattr(hf, "do_center_crop", False) else None
        base = resize_hw or ((int(shortest), int(shortest)) if shortest else None)
        tile = crop_hw[0] if crop_hw else (base[0] if base else 336)
        return cls(
            shortest_edge=int(shortest) if shortest else None, resize_hw=resize_hw, crop_hw=crop_hw,
            rescale=float(hf.rescale_factor) if getattr(hf, "do_rescale", True) else None,
            mean=tuple(float(m) for m in hf.image_mean) if getattr(hf, "do_normalize", True) else None,
            std=tuple(float(s) for s in hf.image_std) if getattr(hf, "do_normalize", True) else None,
            square_fill=square_fill, pinpoints=tuple((int(h), int(w)) for h, w in pinpoints), tile=tile,
            base_hw=base)


# ---- geometry (the same integer arithmetic as transformers) ----------------------------------------------------
def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The size an image is resized to before it is padded into a target grid (transformers' get_patch_output_size)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def best_grid(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The grid resolution that keeps most of the image's pixels, then wastes least (select_best_resolution)."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


# ---- ops -------------------------------------------------------------------------------------------------------
def _round8(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).clamp_(0, 255)  # PIL rounds half up and clips to 8 bits after each pass


def _resize_width(image: torch.Tensor, width: int) -> torch.Tensor:
    """[C, H, W] 8-bit values (any dtype) -> [C, H, width] float, PIL's horizontal pass; bands of rows at a time."""
    c, h, w = image.shape
    if w == width:
        return image.float()
    out = torch.empty((c, h, width), dtype=torch.float32, device=image.device)
    rows = max(1, BAND_PIXELS // w)
    for top in range(0, h, rows):
        band = image[:, top : top + rows].float()[None]  # [1, C, rows, W]
        out[:, top : top + rows] = _round8(F.interpolate(band, size=(band.shape[-2], width), mode="bicubic",
                                                         antialias=True, align_corners=False))[0]
    return out


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[C, H, W] 8-bit values -> [C, height, width] float holding 8-bit values, as PIL's bicubic resize."""
    x = _resize_width(image, width)
    if x.shape[-2] != height:
        x = _round8(F.interpolate(x[None], size=(height, width), mode="bicubic", antialias=True,
                                  align_corners=False))[0]
    return x


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[C, H, W] -> [C, height, width] from the middle; a smaller image is first padded with zeros around it."""
    c, h, w = image.shape
    if h < height or w < width:
        nh, nw = max(h, height), max(w, width)
        padded = image.new_zeros((c, nh, nw))
        top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        padded[:, top : top + h, left : left + w] = image
        image, h, w = padded, nh, nw
    top, left = (h - height) // 2, (w - width) // 2
    return image[:, top : top + height, left : left + width]


def pad_to(image: torch.Tensor, height: int, width: int, fill=0) -> torch.Tensor:
    """[C, H, W] centred on a [C, height, width] canvas of `fill` (a number or one per channel); the odd pixel of
    padding goes to the bottom / right."""
    c, h, w = image.shape
    canvas = torch.empty((c, height, width), dtype=image.dtype, device=image.device)
    canvas[:] = torch.as_tensor(fill, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[:, top : top + h, left : left + w] = image
    return canvas


def normalize(tiles: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """[N, C, H, W] 8-bit values -> rescaled and normalized, all tiles at once."""
    x = tiles.float()
    if config.rescale is not None:
        x = x * config.rescale
    if config.mean is not None:
        mean = torch.tensor(config.mean, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(config.std, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def _one_tile(image: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """CLIP's path: resize (short side, or fixed), center crop -> [C, h, w] 8-bit values."""
    h, w = image.shape[-2:]
    if config.shortest_edge:
        image = resize(image, *shortest_edge_size(h, w, config.shortest_edge))
    elif config.resize_hw:
        image = resize(image, *config.resize_hw)
    if config.crop_hw:
        image = center_crop(image, *config.crop_hw)
    return image.float()


def anyres_tiles(image: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """NeXT: [C, H, W] -> [1 + grid tiles, C, tile, tile] 8-bit values: the base tile (the whole image squashed to
    base_hw), then the image fitted into the best grid, padded with black and cut into tiles row by row."""
    h, w = image.shape[-2:]
    grid_h, grid_w = best_grid(h, w, config.pinpoints)
    fitted = resize(image, *fit_size(h, w, grid_h, grid_w))
    grid = pad_to(fitted, grid_h, grid_w, 0)
    t = config.tile
    tiles = grid.reshape(grid.shape[0], grid_h // t, t, grid_w // t, t).permute(1, 3, 0, 2, 4).flatten(0, 1)
    base = _one_tile(resize(image, *config.base_hw), config)  # then the usual resize / crop, as every tile gets
    if _one_tile(torch.zeros((1, t, t)), config).shape[-2:] != (t, t):  # which are no-ops when tile = crop = edge
        tiles = torch.stack([_one_tile(tile, config) for tile in tiles])
    return torch.cat([base[None], tiles.float()])


def preprocess(image: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """One image, [C, H, W] uint8 (or 8-bit values in any dtype) on any device -> the model's pixel_values:
    [C, h, w] (one tile) or [num_tiles, C, tile, tile] (anyres), float32, normalized."""
    if image.dim() != 3:
        raise ValueError(f"an image is [channels, height, width], got shape {tuple(image.shape)}")
    if config.square_fill is not None and image.shape[-1] != image.shape[-2]:
        side = max(image.shape[-2:])
        image = pad_to(image, side, side, list(config.square_fill))
    if config.pinpoints:
        return normalize(anyres_tiles(image, config), config)
    return normalize(_one_tile(image, config)[None], config)[0]


def image_tensor(image, device: torch.device | str = "cpu") -> torch.Tensor:
    """An RGB PIL image -> [3, H, W] uint8 on `device` (one host copy, then one transfer; a view, not contiguous)."""
    import numpy as np

    with warnings.catch_warnings():  # PIL's array is read-only; it is only ever read (every op here makes new tensors)
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(np.asarray(image))  # [H, W, 3] uint8
    return tensor.to(device).permute(2, 0, 1)


# ---- the same steps on PIL images (the CPU engine: no float copy of a large image) ------------------------------
def _pil_one_tile(image, config: PreprocessConfig):
    from PIL import Image

    if config.shortest_edge:
        h, w = shortest_edge_size(image.height, image.width, config.shortest_edge)
        image = image.resize((w, h), Image.BICUBIC) if (h, w) != (image.height, image.width) else image
    elif config.resize_hw and config.resize_hw != (image.height, image.width):
        image = image.resize(config.resize_hw[::-1], Image.BICUBIC)
    tile = torch.from_numpy(_array(image)).permute(2, 0, 1)  # [C, h, w] uint8
    return center_crop(tile, *config.crop_hw) if config.crop_hw else tile


def _array(image):
    import numpy as np

    return np.array(image)  # [H, W, 3] uint8, writable


def _pil_pad(image, height: int, width: int, fill):
    from PIL import Image

    canvas = Image.new("RGB", (width, height), tuple(fill))
    canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
    return canvas


def preprocess_pil(image, config: PreprocessConfig) -> torch.Tensor:
    """`preprocess` with PIL doing the resizes, padding and cropping: exactly what transformers' PIL processors do
    (the same PIL calls on the same 8-bit pixels), without their float and channel-first copies of the full-size
    image; only the small resized tiles become tensors."""
    from PIL import Image

    if config.square_fill is not None and image.width != image.height:
        side = max(image.width, image.height)
        image = _pil_pad(image, side, side, config.square_fill)
    if not config.pinpoints:
        return normalize(_pil_one_tile(image, config).float()[None], config)[0]
    grid_h, grid_w = best_grid(image.height, image.width, config.pinpoints)
    fit_h, fit_w = fit_size(image.height, image.width, grid_h, grid_w)
    fitted = image.resize((fit_w, fit_h), Image.BICUBIC) if (fit_h, fit_w) != (image.height, image.width) else image
    grid = _pil_pad(fitted, grid_h, grid_w, (0, 0, 0))
    t = config.tile
    tiles = [grid.crop((x, y, x + t, y + t)) for y in range(0, grid_h, t) for x in range(0, grid_w, t)]
    base = image.resize(config.base_hw[::-1], Image.BICUBIC) if config.base_hw != (image.height, image.width) \
        else image
    return normalize(torch.stack([_pil_one_tile(x, config).float() for x in [base] + tiles]), config)
