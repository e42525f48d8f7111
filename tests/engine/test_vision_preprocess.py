"""engine/vision/preprocess.py against transformers' image processors (through the engine's own LlavaImageProcessor,
which wraps them), at the real models' settings: CLIP-L/336 (llava-1.5-hf: shortest edge 336, center crop), the
original LLaVA-1.5's pad-to-square, and LLaVA-NeXT's anyres tiling (vicuna-7b's pinpoints).

Tolerances, in normalized pixel units (8-bit value / 255, minus mean, over std):
- the torch path (two antialiased bicubic passes, each rounded to 8 bits like PIL's) is within one 8-bit level of
  PIL on every pixel: max |diff| <= 1 / 255 / min(std) = 0.0150, and mean |diff| < 1e-4 (few pixels differ);
- the PIL path (the CPU engine's) is transformers' own PIL calls: equal to float rounding (1e-6);
- the model's logits from torch-path pixels vs transformers' (tiny LLaVA-NeXT, fp32): max |diff| < 0.05 with logits
  of unit scale (tests/engine/test_llava.py: the engine itself equals transformers to 2e-4 on the same pixels).
The same checks run on the GPU under the `gpu` marker, within two 8-bit levels (measured on an H100: 0.0300 on a
rare pixel of a NeXT tile: CUDA's antialiased filter accumulates in another order than the CPU's).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.models.clip import CLIPVisionSpec
from engine.models.llava import OPENAI_CLIP_STD, LlavaImageProcessor, LlavaVision
from engine.vision import preprocess as pp

ONE_LEVEL = 1 / 255 / min(OPENAI_CLIP_STD) + 1e-6
PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
SIZES = [(480, 640), (640, 480), (333, 1000), (200, 200), (1000, 1500), (40, 900)]
KINDS = ["llava-1.5", "llava-1.5-pad", "llava-next"]


def photo(h: int, w: int, seed: int) -> Image.Image:
    """Noise over smooth gradients: both sharp edges and flat areas for the filters to meet."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    return Image.fromarray(np.clip(smooth * 0.7 + rng.rand(h, w, 3) * 80, 0, 255).astype("uint8"))


def processor(kind: str) -> LlavaImageProcessor:
    clip = CLIPVisionSpec(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                          patch_size=14)
    anyres = kind == "llava-next"
    vision = LlavaVision(layout="hf", clip=clip, feature_layers=[-2], select_strategy="default", projector_layers=2,
                         projector_act="gelu", projector_bias=True, text_hidden=4096, anyres=anyres,
                         grid_pinpoints=PINPOINTS if anyres else [], pad_to_square=kind == "llava-1.5-pad")
    return LlavaImageProcessor(vision)


def check(ours: torch.Tensor, theirs: torch.Tensor, exact: bool, levels: int = 1) -> None:
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    diff = (ours.cpu() - theirs).abs()
    if exact:
        assert diff.max() <= 1e-6, diff.max()
    else:
        assert diff.max() <= levels * ONE_LEVEL, f"{diff.max():.4f} > {levels} 8-bit level(s) ({ONE_LEVEL:.4f} each)"
        assert diff.mean() < 1e-4, diff.mean()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_torch_and_pil_paths_match_transformers_on_cpu(kind, size):
    proc = processor(kind)
    img = photo(*size, seed=size[0])
    theirs, image_size = proc(img)
    assert image_size == (size if kind != "llava-1.5-pad" else (max(size),) * 2)
    config = proc.torch_config()
    check(pp.preprocess(pp.image_tensor(img), config), theirs, exact=False)
    check(pp.preprocess_pil(img, config), theirs, exact=True)


def test_large_images_resize_in_bands(monkeypatch):
    """The horizontal pass converts a few rows at a time: the result does not depend on the band height."""
    img = photo(700, 900, seed=1)
    config = processor("llava-next").torch_config()
    whole = pp.preprocess(pp.image_tensor(img), config)
    monkeypatch.setattr(pp, "BAND_PIXELS", 900 * 7)  # 7 rows per band
    torch.testing.assert_close(pp.preprocess(pp.image_tensor(img), config), whole, rtol=0, atol=0)


def test_geometry_matches_transformers():
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

    for h, w in SIZES + [(336, 336), (1, 5000), (5000, 3)]:
        assert pp.best_grid(h, w, PINPOINTS) == tuple(select_best_resolution((h, w), [list(p) for p in PINPOINTS]))
        grid = pp.best_grid(h, w, PINPOINTS)
        assert pp.fit_size(h, w, *grid) == get_patch_output_size(np.zeros((3, h, w)), grid, "channels_first")


def test_torch_pixels_give_transformers_logits(tmp_path):
    """Tiny LLaVA-NeXT (fp32): transformers' model fed the torch path's pixels vs its own processor's."""
    from transformers import LlavaNextForConditionalGeneration

    from engine import loader
    from engine.models.llava import image_processor
    from tests.llava_factory import make_llava

    path = make_llava(tmp_path / "next", next_=True)
    model = LlavaNextForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    proc = image_processor(loader.read_model_spec(path))
    img = photo(90, 130, seed=3)
    theirs, size = proc(img)
    ours = pp.preprocess(pp.image_tensor(img), proc.torch_config())
    features = proc.num_features(size)
    ids = torch.tensor([[1] + [model.config.image_token_id] * features + [5, 6, 7]])

    def logits(pixels):
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=pixels[None], image_sizes=torch.tensor([list(size)])).logits

    a, b = logits(theirs), logits(ours)
    assert a.abs().mean() > 0.1  # logits of unit scale: the tolerance below means something
    assert (a - b).abs().max() < 0.05, (a - b).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_torch_path_on_the_gpu_matches_transformers(kind):
    proc = processor(kind)
    config = proc.torch_config()
    for size in SIZES + [(4000, 6000)]:
        img = photo(*size, seed=size[1])
        theirs, _ = proc(img)
        ours = pp.preprocess(pp.image_tensor(img, "cuda"), config)
        assert ours.is_cuda
        check(ours, theirs, exact=False, levels=2)  # CUDA's filter arithmetic rounds a rare pixel twice the other way
