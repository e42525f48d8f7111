"""The Gradio front end: `build_app(state) -> gr.Blocks`. A header with the loaded model, the live memory panel,
then one tab per task (Model, Quantize, Chat, API), each built by its own module from the shared StudioState.

Room is left for more tabs: add a module with a build function and one `with gr.Tab` here.
Theme and CSS are passed where the Blocks are served (`gr.mount_gradio_app(..., theme=THEME, css=CSS)`)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import gradio as gr

from ui.api_tab import build_api_tab
from ui.chat_tab import build_chat_tab
from ui.common import header_html
from ui.compare_tab import build_compare_tab
from ui.memory_panel import build_memory_panel
from ui.model_tab import build_model_tab, load_model, picker_update, refresh_on_select
from ui.quantize_tab import build_quantize_tab
from ui.state import StudioSettings, StudioState

__all__ = ["CSS", "THEME", "StudioSettings", "StudioState", "build_app"]

CSS = (Path(__file__).with_name("style.css")).read_text()
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate",
                       font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],  # no web fonts: offline
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


UI_PLUMBING = ("/gradio_api/", "/assets/", "/static/", "/theme.css", "/favicon.ico", "/config", "/info",
               "/manifest.json", "/svelte/", "/custom_component/")


class UIPlumbingFilter(logging.Filter):
    """Drops uvicorn's access lines for the UI's plumbing (the memory panel's once-a-second poll, queue joins and
    their event streams, static assets) when they succeed: the UI's handlers log one INFO line per user action
    instead. API requests (/v1, /health, /metrics) and every failed request keep their line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) < 5:
            return True
        path, status = str(args[2]), args[4]
        try:
            ok = int(status) < 400
        except (TypeError, ValueError):
            return True
        return not (ok and (path == "/" or path.startswith(UI_PLUMBING)))


def quiet_ui_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, UIPlumbingFilter) for f in access.filters):
        access.addFilter(UIPlumbingFilter())


def build_app(state: StudioState) -> gr.Blocks:
    quiet_ui_access_log()
    with gr.Blocks(title="Quant Studio", fill_width=True) as app:
        header = gr.HTML(header_html(state.manager.current), elem_id="studio-header-box")
        build_memory_panel(state, header)
        with gr.Tabs(elem_id="studio-tabs"):
            with gr.Tab("Model", id="model", elem_id="tab-model") as model_tab_item:
                model_tab = build_model_tab(state, header)
            with gr.Tab("Quantize", id="quantize", elem_id="tab-quantize"):
                quant_tab = build_quantize_tab(state)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_tab_item:
                chat_tab = build_chat_tab(state)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                build_compare_tab(state)
            with gr.Tab("API", id="api", elem_id="tab-api") as api_tab_item:
                refresh_api, api_outputs = build_api_tab(state)

        model_tab_item.select(lambda: refresh_on_select(state), outputs=[model_tab.info, model_tab.picker],
                              api_visibility="private", queue=False)
        api_tab_item.select(refresh_api, outputs=api_outputs, api_visibility="private", queue=False)
        app.load(refresh_api, outputs=api_outputs, api_visibility="private", queue=False)
        # the chat's line on the model (sees images or reads text only) follows the model loaded now
        # (and the empty chat's text, the saved chats' list, the loaded model's settings preset)
        refresh_chat, chat_inputs = chat_tab.refresh
        chat_tab_item.select(refresh_chat, inputs=chat_inputs, outputs=chat_tab.refresh_outputs,
                             api_visibility="private", queue=False)
        app.load(refresh_chat, inputs=chat_inputs, outputs=chat_tab.refresh_outputs, api_visibility="private",
                 queue=False)

        async def load_quantized(folder, model_format, dtype, quant_policy, cache_max_entry_count, session_len,
                                 max_batch_size, trust_remote_code, progress=gr.Progress()):
            if not folder:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            progress(0.0, desc="Loading the quantized model")
            status, info, head = await asyncio.to_thread(
                load_model, state, folder, model_format, dtype, quant_policy, cache_max_entry_count, session_len,
                max_batch_size, trust_remote_code, progress=progress)
            return status, status, info, head, folder

        quant_tab.load_btn.click(
            load_quantized, inputs=[quant_tab.result_path, *model_tab.settings],
            outputs=[quant_tab.load_status, model_tab.status, model_tab.info, header, model_tab.path],
            api_name="load_quantized", concurrency_id="model-load", concurrency_limit=1,
            show_progress_on=[quant_tab.load_status],
        ).then(lambda: picker_update(state), outputs=model_tab.picker, api_visibility="private")
    return app
