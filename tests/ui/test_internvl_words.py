"""The model card's words for InternVL (ui/common.py's vision line): the InternViT tower, 448-pixel tiles and their
count, the token range dynamic tiling gives (a real InternVL3-8B-hf config, no weights), and a loaded tiny folder's
line naming the layout."""

from __future__ import annotations

import json


def test_card_words_at_real_shapes(tmp_path):
    from engine import loader
    from tests.engine.test_internvl import HF_PREPROCESSOR, INTERNVL3_8B_HF
    from ui.common import image_tokens_text, tower_name

    (tmp_path / "config.json").write_text(json.dumps(INTERNVL3_8B_HF))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(HF_PREPROCESSOR))
    vision = loader.read_model_spec(tmp_path).vision
    assert tower_name(vision) == "InternViT/14 (24 layers, width 1024), 448-px tiles, 1–12 + thumbnail"
    assert image_tokens_text(vision) == "256–3,328 image tokens per image (dynamic tiling: depends on its size)"


def test_loaded_model_line(tmp_path):
    from engine import EngineConfig
    from studio.manager import ModelManager
    from tests.internvl_factory import make_internvl
    from ui.common import takes_images, vision_text

    mgr = ModelManager()
    mgr.load(make_internvl(tmp_path / "internvl-hf"), EngineConfig(cache_block_seq_len=16,
                                                                   cpu_kv_cache_bytes=16 * 2**20), name="ivl")
    try:
        loaded = mgr.current
        assert takes_images(loaded)
        line = vision_text(loaded)
        assert line.startswith("InternViT/14 (3 layers, width 32), 112-px tiles, 1–6 + thumbnail · 16–112 image "
                               "tokens per image (dynamic tiling"), line
        assert line.endswith("per chat (InternVL, -hf layout)"), line
    finally:
        mgr.unload()
