"""The AWQ algorithm on tiny in-memory models: the layer walk, scale folding, AWQ vs RTN, progress, cancellation."""

from __future__ import annotations

import threading

import pytest
import torch

from quant.arch import LLAMA_LIKE, find_layers, load_model
from quant.awq import (
    AWQConfig,
    FunctionProgress,
    QuantizationCancelled,
    _LayerContext,
    fold_scale,
    quantize_layers,
)
from tests.quant.conftest import GROUP_SIZE

SALIENT_CHANNELS = [3, 17, 40, 58]
SALIENT_GAIN = 30.0


def random_samples(n=8, seqlen=48, vocab=1000, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def with_salient_channels(model):
    """A few input channels of every norm scaled up: those activations dominate, as real LLMs' outliers do."""
    _, layers = find_layers(model, LLAMA_LIKE)
    with torch.no_grad():
        for layer in layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[SALIENT_CHANNELS] *= SALIENT_GAIN
    return model


@torch.no_grad()
def test_layer_walk_reproduces_the_model(llama_gqa_path):
    """Embedding + layers called the way the walk calls them (no mask, SDPA causal) + norm + head == forward."""
    model = load_model(llama_gqa_path, "float32").model
    ids = random_samples(3, 40)
    base = model.model
    ctx = _LayerContext(base, LLAMA_LIKE, torch.device("cpu"), torch.float32, ids.shape[1])
    h = base.embed_tokens(ids)
    for layer in base.layers:
        h = ctx.layer(layer, h)
    logits = model.lm_head(base.norm(h))
    torch.testing.assert_close(logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_folding_scales_keeps_the_function(llama_path):
    model = load_model(llama_path, "float32").model
    layer = model.model.layers[0]
    ids = random_samples(2, 32)
    ctx = _LayerContext(model.model, LLAMA_LIKE, torch.device("cpu"), torch.float32, 32)
    x = model.model.embed_tokens(ids)
    before = ctx.layer(layer, x)
    g = torch.Generator().manual_seed(1)
    for group in LLAMA_LIKE.groups:
        linears = [layer.get_submodule(n) for n in group.linears]
        s = torch.rand(linears[0].in_features, generator=g) * 4 + 0.25
        fold_scale(layer.get_submodule(group.prev), linears, s)
    torch.testing.assert_close(ctx.layer(layer, x), before, rtol=1e-4, atol=1e-4)


def test_awq_beats_rtn_with_salient_channels(llama_path, fast_awq):
    """The AWQ claim on a model with outlier input channels: block output error well below round-to-nearest."""
    model = with_salient_channels(load_model(llama_path, "float32").model)
    stats = quantize_layers(model, LLAMA_LIKE, random_samples(8, 48), fast_awq)
    ratios = [s.mse_awq / s.mse_rtn for s in stats]
    print("AWQ / RTN layer-output MSE per layer:", [round(r, 3) for r in ratios])
    assert all(r < 0.8 for r in ratios), ratios
    for s in stats:
        for prev, info in s.scale_search.items():
            assert info["loss"] <= info["loss_rtn"], prev  # ratio 0 (plain RTN) is on the grid
        assert s.scale_search["input_layernorm"]["ratio"] > 0  # the salient channels were protected


def test_search_scale_adds_the_weight_aware_form(llama_path):
    model = with_salient_channels(load_model(llama_path, "float32").model)
    cfg = AWQConfig(w_group_size=GROUP_SIZE, n_grid=6, search_scale=True, clip=False)
    stats = quantize_layers(model, LLAMA_LIKE, random_samples(4, 32), cfg)
    forms = {info["form"] for s in stats for info in s.scale_search.values()}
    assert forms <= {"act", "act/weight"}
    assert all(s.mse_awq < s.mse_rtn for s in stats)


def test_gqa_skips_the_v_to_o_fold(llama_gqa_path, fast_awq):
    model = load_model(llama_gqa_path, "float32").model
    stats = quantize_layers(model, LLAMA_LIKE, random_samples(4, 32), fast_awq)
    assert set(stats[0].scale_search) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert "self_attn.o_proj" in stats[0].clip  # still clipped, on its unscaled inputs


def test_rtn_needs_no_data_and_fake_quantizes(llama_path):
    from quant.primitives import fake_quantize

    model = load_model(llama_path, "float32").model
    w0 = model.model.layers[1].mlp.down_proj.weight.clone()
    quantize_layers(model, LLAMA_LIKE, None, AWQConfig(w_group_size=GROUP_SIZE, method="rtn"))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, fake_quantize(w0, 4, GROUP_SIZE))


def test_progress_events_and_cancellation(llama_path, fast_awq):
    model = load_model(llama_path, "float32").model
    events = []
    cancel = threading.Event()

    def on_progress(stage, done, total, message):
        events.append((stage, done, total, message))
        if stage == "quantize" and done == 1:
            cancel.set()  # as a UI's cancel button would, from another thread

    with pytest.raises(QuantizationCancelled, match="before layer 1/2"):
        quantize_layers(
            model, LLAMA_LIKE, random_samples(4, 32), fast_awq, progress=FunctionProgress(on_progress), cancel=cancel
        )
    assert all(stage == "quantize" and total == 2 for stage, _, total, _ in events)
    done = [d for _, d, _, _ in events]
    assert done == sorted(done) and done[-1] == 1
    assert any("scale search" in m for *_, m in events) and any("clip search" in m for *_, m in events)


def test_group_size_not_dividing_is_refused(llama_path):
    model = load_model(llama_path, "float32").model
    with pytest.raises(ValueError, match="does not divide the input width 64"):
        quantize_layers(model, LLAMA_LIKE, random_samples(2, 16), AWQConfig(w_group_size=48))


def test_quantized_inputs_calibrates_the_next_layer_on_the_quantized_outputs(llama_path):
    """quantized_inputs: layer 0 sees the same inputs either way (identical search); layer 1 then calibrates on what
    the quantized layer 0 feeds it, so its fp reference output (and its search) differ from the default walk's."""
    samples = random_samples(4, 32)
    runs = {}
    for flag in (False, True):
        model = with_salient_channels(load_model(llama_path, "float32").model)
        cfg = AWQConfig(w_group_size=GROUP_SIZE, n_grid=6, clip=False, quantized_inputs=flag)
        runs[flag] = quantize_layers(model, LLAMA_LIKE, samples, cfg)
    plain, quantized = runs[False], runs[True]
    assert plain[0].scale_search == quantized[0].scale_search and plain[0].mse_awq == quantized[0].mse_awq
    assert plain[1].out_mean_square != quantized[1].out_mean_square
    assert all(s.mse_awq < s.mse_rtn for s in quantized)
