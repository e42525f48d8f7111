"""The Quantize tab's time estimate: before starting, how long this setting will take on this machine (the first
layer is timed for real, studio/quant_estimate.py), and a quick setting offered beside it."""

from __future__ import annotations

import asyncio
import html
import logging

import gradio as gr

from studio.demo_model import build_demo_model
from studio.quant_estimate import QUICK_SETTING, estimate_quantization
from ui.common import error_html, fmt_seconds, friendly_error, log_failure, whole_number
from ui.state import StudioState

log = logging.getLogger("ui.quantize")

QUICK_LABEL = f"Quick setting ({QUICK_SETTING[0]} × {QUICK_SETTING[1]})"


def estimate_html(est, samples: int, seqlen: int) -> str:
    quick = est.scaled_seconds(*QUICK_SETTING)
    offer = (f"{html.escape(QUICK_LABEL)}: about {fmt_seconds(quick)} (scaled from the timed layer), coarser scales."
             if quick < est.total_seconds else
             f"This setting is already smaller than the {html.escape(QUICK_LABEL.lower())}.")
    return (
        f'<div class="studio-callout studio-ok" id="quant-estimate"><b>This setting ({samples} × {seqlen}): about '
        f"{fmt_seconds(est.total_seconds)} on this machine</b> (loading and calibration data "
        f"{fmt_seconds(est.setup_seconds)}, then {est.num_layers} layers × {fmt_seconds(est.layer_seconds)}: the "
        f"first layer, timed just now; the perplexity check afterwards adds a little).<br>{offer}</div>")


def build_estimate(state: StudioState, resolve_calib, model_path, calib, calib_file, calib_path, samples, seqlen,
                   bits, group, search_scale, clip, trust) -> None:
    """`resolve_calib(choice, uploaded, local)`: the Quantize tab's calibration choice -> quantize_model's value."""
    with gr.Row():
        estimate_btn = gr.Button("How long will this take?", size="sm", elem_id="quant-estimate-btn")
        quick_btn = gr.Button(QUICK_LABEL, size="sm", elem_id="quant-quick")
    out = gr.HTML("", elem_id="quant-estimate-box")

    async def estimate(model, calib_choice, uploaded, local, n_samples, n_seqlen, w_bits, group_size, scale_search,
                       clip_search, trust_remote_code, progress=gr.Progress()):
        try:
            model = (model or "").strip() or str(state.settings.default_model_path)
            state.settings.check_model_path(model)
            n_samples = whole_number(n_samples, "Samples", minimum=1)
            n_seqlen = whole_number(n_seqlen, "Sequence length", minimum=16)
            if state.quant_jobs.running is not None:
                raise ValueError("a quantization is running: its own progress bar says how long is left")
            if state.is_demo_path(model):
                build_demo_model(state.settings.demo_model_dir)
            progress(0.1, desc="Timing the first layer with this setting (loading the model and calibration data)")
            est = await asyncio.to_thread(
                estimate_quantization, model, calib_dataset=resolve_calib(calib_choice, uploaded, local),
                calib_samples=n_samples, calib_seqlen=n_seqlen, w_bits=int(w_bits), w_group_size=int(group_size),
                search_scale=bool(scale_search), clip=bool(clip_search), trust_remote_code=bool(trust_remote_code))
            return estimate_html(est, n_samples, n_seqlen)
        except Exception as e:  # noqa: BLE001
            log_failure(log, "estimating the quantization time", e)
            return error_html("Could not time it", friendly_error(e))

    estimate_btn.click(estimate, inputs=[model_path, calib, calib_file, calib_path, samples, seqlen, bits, group,
                                         search_scale, clip, trust], outputs=out, api_name="quantize_estimate",
                       concurrency_limit=1, show_progress_on=[out])
    quick_btn.click(lambda: QUICK_SETTING, outputs=[samples, seqlen], api_visibility="private", queue=False)
