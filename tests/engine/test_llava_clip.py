"""The CLIP vision tower agrees with transformers' CLIPVisionModel on the same random weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from engine.layers.linear import load_shard
from engine.models.clip import CLIPVisionSpec, CLIPVisionTower

SHARDS = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _load(tower: CLIPVisionTower, state: dict) -> int:
    params = dict(tower.named_parameters())
    loaded = 0
    for name, t in state.items():
        if not tower.keeps_tensor(name) or "position_ids" in name:
            continue
        part = next((p for p in SHARDS if f".{p}." in name), None)
        if part is None:
            params[name].data.copy_(t)
        else:
            target = params[name.replace(f".{part}.", ".qkv_proj.")]
            load_shard(target, t, [tower.spec.hidden_size] * 3, SHARDS[part])
        loaded += 1
    return loaded


@pytest.mark.parametrize("layers", [[-2], [-1], [0, 2]])
def test_clip_tower_matches_transformers(layers):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=28, patch_size=14)
    torch.manual_seed(0)
    ref = CLIPVisionModel(cfg).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    tower = CLIPVisionTower(CLIPVisionSpec.from_config(cfg.to_dict()), layers, torch.float32)
    state = {f"vision_model.{k}": v for k, v in ref.state_dict().items()}  # hub spelling
    assert _load(tower, state) > 0
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        hs = ref(pixels, output_hidden_states=True).hidden_states
        theirs = torch.cat([hs[i] for i in layers], dim=-1)
        ours = tower(pixels)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
