"""Model tab: pick a model (local folder, hub id, a folder the Quantize tab wrote, or the demo model), set the
engine options (format, dtype, KV quantization, KV budget, session length, batch size) and Load / Unload.
Failures (bad path, not a model folder, unsupported architecture, out of memory) come back as a readable message;
the server keeps running."""

from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from engine.config import VALID_DTYPES, VALID_MODEL_FORMATS, EngineConfig
from studio.demo_model import DEMO_MODEL_NOTE, build_demo_model
from studio.manager import ModelManager
from ui.common import describe, error_html, friendly_error, header_html, log_failure, ok_html, whole_number
from ui.model_library import build_library
from ui.state import StudioState

log = logging.getLogger("ui.model")

KV_CHOICES = [("off: model dtype (0)", 0), ("int8 KV cache (8)", 8), ("int4 KV cache (4)", 4)]


@dataclass
class ModelTab:
    path: gr.Textbox
    picker: gr.Dropdown
    settings: list  # [model_format, dtype, quant_policy, cache_max_entry_count, session_len, max_batch_size, trust]
    status: gr.HTML
    info: gr.HTML


def info_html(state: StudioState) -> str:
    loaded = state.manager.current
    if loaded is None:
        return '<div class="studio-card studio-muted">No model is loaded.</div>'
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in describe(loaded).items())
    note = f'<div class="studio-callout studio-warn">{html.escape(DEMO_MODEL_NOTE)}</div>' if loaded.is_demo else ""
    return f'<div class="studio-card" id="model-info">{note}<table class="studio-table">{rows}</table></div>'


def precheck(path: str, model_format: str) -> None:
    """Fail on a bad path, a folder that is no model, or an unsupported architecture / format *before* the
    manager unloads the current model, so a typo does not take the served model away."""
    ModelManager.check(path, EngineConfig(model_format=model_format))


def load_model(state: StudioState, path: str, model_format: str, dtype: str, quant_policy, cache_max_entry_count,
               session_len, max_batch_size, trust_remote_code: bool, progress=None, tp=None) -> tuple[str, str, str]:
    """Load a model (blocking). Returns (status html, info html, header html); never raises."""
    path = (path or "").strip()
    try:
        if not path:
            path = str(state.settings.default_model_path)
        state.settings.check_model_path(path)
        is_demo = state.is_demo_path(path)
        session_rule = "0 (the model's maximum) or a number of tokens of at least 2 (a prompt token and a reply)"
        asked_session_len = whole_number(session_len, "Session length", minimum=0, allowed=session_rule)
        if asked_session_len == 1:
            raise ValueError(f"Session length must be {session_rule}; got 1.")
        config = dataclasses.replace(
            state.settings.engine_config,
            model_format=model_format or "auto",
            dtype=dtype or "auto",
            quant_policy=int(quant_policy),
            cache_max_entry_count=float(cache_max_entry_count),
            session_len=asked_session_len or None,
            max_batch_size=whole_number(max_batch_size, "Max batch size", minimum=1),
            trust_remote_code=bool(trust_remote_code),
        )
        if tp is not None:  # tensor parallel ranks (--tp); None keeps the app's setting
            config = dataclasses.replace(config, tp=whole_number(tp, "Tensor parallel", minimum=1))
        if is_demo:
            if progress:
                progress(0.05, desc="Building the demo model (first run only)")
            build_demo_model(state.settings.demo_model_dir)
        else:
            if progress:
                progress(0.1, desc="Checking the model folder")
            precheck(path, config.model_format)
        if progress:
            progress(0.3, desc=f"Loading {Path(path).name or path}: weights, tokenizer, KV cache")
        state.loading = "demo-model" if is_demo else Path(path).name or path
        try:
            default = state.settings.default_model if state.is_default_path(path) else None
            loaded = state.manager.load(path, config, name="demo-model" if is_demo else default and default.name,
                                        is_demo=is_demo, source=default.source if default else "")
        finally:
            state.loading = None
        if progress:
            progress(1.0, desc="Loaded")
        note = DEMO_MODEL_NOTE if is_demo else "Go to the Chat tab, or call it from the API."
        if asked_session_len and loaded.pipeline.session_len < asked_session_len:
            note = (f"Session length {asked_session_len:,} is more than this model allows: using its maximum, "
                    f"{loaded.pipeline.session_len:,} tokens. " + note)
        status = ok_html(f"Loaded {loaded.name} in {loaded.load_seconds:.1f} s", note)
        log.info("loaded %s (%s) in %.1f s, KV quant_policy %d, session length %d", loaded.name, loaded.path,
                 loaded.load_seconds, config.quant_policy, loaded.pipeline.session_len)
    except Exception as e:  # noqa: BLE001 - every failure becomes a message, the server keeps running
        log_failure(log, f"loading {path!r}", e)
        status = error_html("Could not load the model", friendly_error(e))
    return status, info_html(state), header_html(state.manager.current)


def unload_model(state: StudioState) -> tuple[str, str, str]:
    loaded = state.manager.current
    state.manager.unload()
    status = ok_html(f"Unloaded {loaded.name}") if loaded else ok_html("Nothing was loaded")
    return status, info_html(state), header_html(None)


def picker_update(state: StudioState):
    return gr.update(choices=state.model_choices())


def build_model_tab(state: StudioState, header: gr.HTML) -> ModelTab:
    cfg = state.settings.engine_config
    current = state.manager.current
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            path = gr.Textbox(
                label="Model",
                value=str(current.path) if current else str(state.settings.default_model_path),
                placeholder="a local Hugging Face folder, an org/name hub id, or empty for the default model",
                info="Local folder with config.json, or a hub id (needs network). Empty loads the default model "
                     "(SmolLM2-135M-Instruct, else the demo model).",
                elem_id="model-path",
            )
            picker = gr.Dropdown(
                choices=state.model_choices(), value=None, label="Recent and quantized models",
                info="Pick one to fill the Model field.", interactive=True, elem_id="model-picker",
            )
            with gr.Row():
                model_format = gr.Dropdown(list(VALID_MODEL_FORMATS), value=cfg.model_format, label="Weight format",
                                           info="auto reads config.json (AWQ folders are detected)")
                dtype = gr.Dropdown(list(VALID_DTYPES), value=cfg.dtype, label="Compute dtype",
                                    info="auto: checkpoint dtype on GPU, float32 on CPU")
                quant_policy = gr.Dropdown(KV_CHOICES, value=cfg.quant_policy, label="KV cache quantization",
                                           info="quant_policy: int8 / int4 hold 2x / 4x the tokens")
            with gr.Row():
                cache = gr.Slider(0.05, 1.0, value=cfg.cache_max_entry_count, step=0.05, label="KV cache share",
                                  info="cache_max_entry_count: fraction of free memory after weights")
                session_len = gr.Number(value=cfg.session_len or 0, precision=0, label="Session length",
                                        elem_id="model-session-len",
                                        info="max prompt + reply tokens; 0 = model's maximum")
                max_batch = gr.Number(value=cfg.max_batch_size, precision=0, label="Max batch size",
                                      info="sequences decoded together")
                tp = gr.Number(value=cfg.tp, precision=0, label="Tensor parallel", elem_id="model-tp",
                               info="--tp: GPUs the model is split over")
            trust = gr.Checkbox(value=cfg.trust_remote_code, label="Trust remote code",
                                info="run tokenizer code shipped in the folder (InternLM2 needs it)")
            with gr.Row():
                load_btn = gr.Button("Load", variant="primary", elem_id="load-btn")
                unload_btn = gr.Button("Unload", variant="secondary", elem_id="unload-btn")
            status = gr.HTML("", elem_id="model-status")
        with gr.Column(scale=2):
            gr.Markdown("#### Loaded model")
            info = gr.HTML(info_html(state), elem_id="model-info-panel")

    settings = [model_format, dtype, quant_policy, cache, session_len, max_batch, trust]
    build_library(state, path)

    async def on_load(model_path, model_format, dtype, quant_policy, cache_max_entry_count, session_len,
                      max_batch_size, trust_remote_code, tp, progress=gr.Progress()):
        progress(0.0, desc="Starting")
        return await asyncio.to_thread(load_model, state, model_path, model_format, dtype, quant_policy,
                                       cache_max_entry_count, session_len, max_batch_size, trust_remote_code,
                                       progress=progress, tp=tp)

    load_btn.click(on_load, inputs=[path, *settings, tp], outputs=[status, info, header], api_name="load_model",
                   concurrency_limit=1, concurrency_id="model-load", show_progress_on=[status]).then(
        lambda: picker_update(state), outputs=picker, api_visibility="private")
    path.submit(on_load, inputs=[path, *settings, tp], outputs=[status, info, header], api_visibility="private",
                concurrency_limit=1, concurrency_id="model-load", show_progress_on=[status])

    async def on_unload():
        return await asyncio.to_thread(unload_model, state)

    unload_btn.click(on_unload, outputs=[status, info, header], api_name="unload_model",
                     concurrency_id="model-load")
    picker.input(lambda v: v or gr.skip(), inputs=picker, outputs=path, api_visibility="private")
    return ModelTab(path, picker, settings, status, info)


def refresh_on_select(state: StudioState):
    return info_html(state), picker_update(state)
