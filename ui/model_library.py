"""The Model tab's library (studio/catalog.py): the model folders this server can see, as a table; clicking a row
fills the Model field (a bad folder's row says why it cannot be loaded instead)."""

from __future__ import annotations

import asyncio
import html
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.catalog import CatalogEntry, hf_cache_root, scan
from ui.common import fmt_bytes, fmt_params
from ui.state import StudioState

COLUMNS = ["Model", "Architecture", "Params", "On disk", "Format", "Images", "Last Compare", "Status", "Folder"]
WIDTHS = ["11%", "13%", "6%", "7%", "11%", "6%", "12%", "16%", "18%"]


def library_roots(state: StudioState) -> list[tuple[Path, str]]:
    settings = state.settings
    roots = [(Path(d), "model dir") for d in settings.model_roots or ()]
    roots.append((settings.quant_output_root, "quantized here"))
    if settings.default_model is not None:
        roots.append((settings.default_model.path, "default model"))
    roots.append((settings.demo_model_dir, "demo model"))
    return roots


def compare_summary(result: dict) -> str:
    """A Compare run's rows in a few words: 'fp16 31 tok/s · w4a16 45 tok/s'."""
    parts = []
    for row in result.get("rows") or []:
        speed = row.get("decode_tok_s")
        parts.append(f"{row.get('setting')} {speed:.0f} tok/s" if isinstance(speed, int | float)
                     else f"{row.get('setting')} {row.get('status') or 'failed'}")
    return " · ".join(parts)


def library_entries(state: StudioState) -> list[CatalogEntry]:
    with state.lock:
        compare = dict(state.compare_results)
    return scan(library_roots(state), compare, hf_cache=hf_cache_root())


def library_frame(entries: list[CatalogEntry]) -> pd.DataFrame:
    rows = [[e.name, e.architecture, fmt_params(e.params) if e.params else "", fmt_bytes(e.size_bytes), e.format,
             ("yes" if e.vision else "no") if e.architecture else "", e.compare,
             "ready" if e.ok else f"cannot load: {e.problem}", f"{e.path} ({e.where})"]
            for e in entries]
    return pd.DataFrame(rows, columns=COLUMNS)


def summary_html(entries: list[CatalogEntry], seconds: float) -> str:
    bad = sum(not e.ok for e in entries)
    return (f'<div class="studio-muted" id="library-summary">{len(entries) - bad} model folder'
            f'{"s" if len(entries) - bad != 1 else ""} ready, {bad} that cannot be loaded · scanned in '
            f"{seconds:.1f} s · click a ready row to fill the Model field</div>")


def build_library(state: StudioState, path_box: gr.Textbox) -> None:
    with gr.Accordion("Model library", open=True, elem_id="library"):
        with gr.Row():
            refresh_btn = gr.Button("Scan folders", size="sm", elem_id="library-refresh", scale=0)
            summary = gr.HTML('<div class="studio-muted" id="library-summary">Not scanned yet.</div>')
        table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, elem_id="library-table",
                             column_widths=WIDTHS, max_height=800)
        picked = gr.HTML("", elem_id="library-picked")
    entries_state = gr.State([])

    async def refresh():
        t0 = time.perf_counter()
        entries = await asyncio.to_thread(library_entries, state)
        return library_frame(entries), summary_html(entries, time.perf_counter() - t0), \
            [e.__dict__ | {"ok": e.ok} for e in entries]

    refresh_btn.click(refresh, outputs=[table, summary, entries_state], api_name="model_library",
                      concurrency_limit=1)

    def pick(entries, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, list | tuple) else None
        if row is None or not 0 <= row < len(entries):
            return gr.skip(), gr.skip()
        entry = entries[row]
        name = html.escape(entry["name"])
        if not entry["ok"]:
            return gr.skip(), (f'<div class="studio-callout studio-error" id="library-pick">{name} cannot be loaded: '
                               f"{html.escape(entry['problem'])}</div>")
        return entry["path"], (f'<div class="studio-callout studio-ok" id="library-pick">{name} is in the Model '
                               "field: press Load.</div>")

    table.select(pick, inputs=entries_state, outputs=[path_box, picked], api_visibility="private", queue=False)
