"""The live memory panel shown above every tab: per-GPU used / total from NVML with this process's share, the
engine's breakdown (weights, KV cache allocated and in use, a vision model's tower and image (encoder) cache,
activations / other), and a plot of the last two minutes. Without NVML it says so and shows CPU memory (process
RSS, machine total / available) instead.

One reading serves all open browser tabs: a reading younger than SAMPLE_EVERY_S is reused, so ten open tabs do not
poll NVML ten times a second."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from engine.memory import cpu_snapshot, gpu_snapshot
from studio.memory_history import MemoryRecorder
from ui.common import fmt_bytes, header_html, log
from ui.state import StudioState

SAMPLE_EVERY_S = 0.9
GIB = 1024**3
# Plot lines in the bars' colours (style.css), each series told apart at a glance: "this process" indigo, weights
# emerald, KV in use amber; GPUs' "used" lines take colours none of those is close to.
PROCESS_COLOR, WEIGHTS_COLOR, KV_USED_COLOR = "#6366f1", "#059669", "#f59e0b"
_GPU_PALETTE = ("#64748b", "#0ea5e9", "#ec4899", "#a16207", "#a855f7", "#dc2626", "#0f766e", "#1e293b")
SERIES_COLORS = {
    "process RSS": PROCESS_COLOR, "KV in use": KV_USED_COLOR, "weights": WEIGHTS_COLOR,
    **{f"GPU {i} used": _GPU_PALETTE[i % len(_GPU_PALETTE)] for i in range(16)},
    **{f"GPU {i} this process": PROCESS_COLOR if i == 0 else _GPU_PALETTE[(i + 4) % len(_GPU_PALETTE)]
       for i in range(16)},
}


@dataclass
class MemoryPanel:
    html: gr.HTML
    plot: gr.LinePlot
    timer: gr.Timer


def take_reading(state: StudioState) -> dict:
    """{'time', 'gpu': gpu_snapshot(), 'cpu': cpu_snapshot(), 'engine': pipe.memory() or None}; cached ~1 s."""
    loaded = state.manager.current
    # which model a reading is of: a reading of the model before a swap is never reused (no reference is kept)
    model_key = (id(loaded), str(loaded.path), loaded.load_seconds) if loaded is not None else None
    with state.lock:
        last = state.memory_history[-1] if state.memory_history else None
        if last is not None and time.time() - last["time"] < SAMPLE_EVERY_S and last.get("model_key") == model_key:
            return last
    engine, engine_error = None, None
    if loaded is not None:
        try:
            engine = loaded.pipeline.memory()
        except Exception as e:  # noqa: BLE001 - e.g. a model being swapped out; the next tick reads the new one
            log.warning("memory(): engine not readable", exc_info=True)
            engine_error = f"{type(e).__name__}: {e}"
    reading = {"time": time.time(), "gpu": gpu_snapshot(), "cpu": cpu_snapshot(), "engine": engine,
               "engine_error": engine_error, "model_key": model_key}
    with state.lock:
        state.memory_history.append(reading)
    return reading


def _bar(segments: list[tuple[float, str, str]], total: float) -> str:
    """A stacked horizontal bar: (bytes, css class, tooltip) segments out of total bytes."""
    parts = []
    for value, cls, title in segments:
        pct = 0.0 if not total else max(0.0, min(100.0, 100.0 * value / total))
        if pct > 0:
            parts.append(f'<div class="mem-seg {cls}" style="width:{pct:.2f}%" title="{html.escape(title)}"></div>')
    return f'<div class="mem-bar">{"".join(parts)}</div>'


def _legend(items: list[tuple[str, str, str]]) -> str:
    return '<div class="mem-legend">' + "".join(
        f'<span class="mem-key"><i class="mem-dot {cls}"></i>{html.escape(label)} <b>{html.escape(value)}</b></span>'
        for label, cls, value in items
    ) + "</div>"


def _engine_rows(eng: dict | None, device_total: float | None, error: str | None = None) -> str:
    if error is not None:
        return f'<div class="mem-row mem-note">Engine memory could not be read: {html.escape(error)}</div>'
    if eng is None:
        return '<div class="mem-row mem-muted">Engine: no model loaded.</div>'
    kv_used = eng["kv_cache_bytes"] * eng["kv_usage"]
    other = eng.get("activations_other_bytes")
    vision = eng.get("vision_bytes") or 0
    # projected image features kept for later turns; on a GPU they are part of what torch allocated beyond the
    # weights, KV cache and tower, so they are taken out of "activations/other" and drawn on their own
    encoder = eng.get("encoder_cache_bytes")
    if other is not None and encoder:
        other = max(0, other - encoder)
    items = [
        ("weights", "seg-weights", fmt_bytes(eng["weights_bytes"])),
        ("KV in use", "seg-kv-used", f"{fmt_bytes(kv_used)} ({eng['kv_usage']:.0%}, "
                                     f"{eng['used_kv_blocks']}/{eng['num_kv_blocks']} blocks)"),
        ("KV allocated", "seg-kv-free", fmt_bytes(eng["kv_cache_bytes"])),
    ]
    if vision:
        items.append(("vision tower", "seg-vision", fmt_bytes(vision)))
    if encoder is not None:
        entries = eng.get("encoder_cache_entries", 0)
        items.append(("image cache", "seg-encoder",
                      f"{fmt_bytes(encoder)} / {fmt_bytes(eng.get('encoder_cache_capacity_bytes'))} "
                      f"({entries} image{'s' if entries != 1 else ''}, {eng.get('encoder_cache_hits', 0)} hits)"))
    items.append(("activations/other", "seg-other", fmt_bytes(other) if other is not None else "n/a on CPU"))
    total = eng["weights_bytes"] + eng["kv_cache_bytes"] + vision + (encoder or 0) + (other or 0)
    segments = [
        (eng["weights_bytes"], "seg-weights", "weights"),
        (vision, "seg-vision", "vision tower + projector"),
        (encoder or 0, "seg-encoder", "image cache (encoded images)"),
        (kv_used, "seg-kv-used", "KV cache in use"),
        (eng["kv_cache_bytes"] - kv_used, "seg-kv-free", "KV cache allocated, free"),
        (other or 0, "seg-other", "activations / other"),
    ]
    scale = device_total if device_total else total
    return (
        f'<div class="mem-row"><div class="mem-label">Engine <span class="mem-muted">'
        f'{html.escape(eng["device"])} · {fmt_bytes(total)}</span></div>{_bar(segments, scale)}</div>'
        + _legend(items)
    )


def render_html(reading: dict) -> str:
    gpu, cpu, eng = reading["gpu"], reading["cpu"], reading["engine"]
    rows = []
    device_total = None
    if gpu["available"] and gpu["gpus"]:
        for g in gpu["gpus"]:
            proc = g["process_bytes"]
            others = max(0, g["used_bytes"] - (proc or 0))
            share = f"this process {fmt_bytes(proc)}" if proc is not None else "this process: not visible here"
            rows.append(
                f'<div class="mem-row"><div class="mem-label">GPU {g["index"]} · {html.escape(g["name"])} '
                f'<span class="mem-muted">{fmt_bytes(g["used_bytes"])} / {fmt_bytes(g["total_bytes"])} used · '
                f'{share}</span></div>'
                + _bar([(proc or 0, "seg-proc", "this process"), (others, "seg-others", "other processes")],
                       g["total_bytes"])
                + "</div>"
            )
        if eng is not None and eng["device"].startswith("cuda"):
            idx = int(eng["device"].split(":")[1]) if ":" in eng["device"] else 0
            device_total = next((g["total_bytes"] for g in gpu["gpus"] if g["index"] == idx), None)
    else:
        reason = gpu.get("reason") or "no GPU"
        total, avail, rss = cpu["total_bytes"], cpu["available_bytes"], cpu["process_rss_bytes"]
        used = (total - avail) if total and avail is not None else None
        rows.append(f'<div class="mem-row mem-note">No GPU monitoring: {html.escape(reason)}. '
                    "Showing CPU memory instead.</div>")
        rows.append(
            f'<div class="mem-row"><div class="mem-label">CPU RAM <span class="mem-muted">this process (RSS) '
            f'{fmt_bytes(rss)} · machine {fmt_bytes(used)} / {fmt_bytes(total)} used, {fmt_bytes(avail)} '
            f"available</span></div>"
            + _bar([(rss or 0, "seg-proc", "this process"), (max(0, (used or 0) - (rss or 0)), "seg-others",
                                                             "other processes")], total or 0)
            + "</div>"
        )
    rows.append(_engine_rows(eng, device_total, reading.get("engine_error")))
    stamp = time.strftime("%H:%M:%S", time.localtime(reading["time"]))
    rows.append(f'<div class="mem-stamp" id="mem-stamp">updated {stamp}</div>')
    return f'<div class="mem-panel" id="mem-panel">{"".join(rows)}</div>'


def history_frame(state: StudioState) -> pd.DataFrame:
    """Long-format frame (seconds, GiB, series) over the rolling window, newest at 0."""
    with state.lock:
        history = list(state.memory_history)
    if not history:
        return pd.DataFrame({"seconds": [], "GiB": [], "series": []})
    now = history[-1]["time"]
    rows = []
    for r in history:
        t = round(r["time"] - now, 1)
        gpu, eng = r["gpu"], r["engine"]
        if gpu["available"] and gpu["gpus"]:
            for g in gpu["gpus"]:
                rows.append((t, g["used_bytes"] / GIB, f"GPU {g['index']} used"))
                if g["process_bytes"] is not None:
                    rows.append((t, g["process_bytes"] / GIB, f"GPU {g['index']} this process"))
        elif r["cpu"]["process_rss_bytes"] is not None:
            rows.append((t, r["cpu"]["process_rss_bytes"] / GIB, "process RSS"))
        if eng is not None:
            rows.append((t, eng["kv_cache_bytes"] * eng["kv_usage"] / GIB, "KV in use"))
            rows.append((t, eng["weights_bytes"] / GIB, "weights"))
    return pd.DataFrame(rows, columns=["seconds", "GiB", "series"])


def refresh(state: StudioState):
    try:
        reading = take_reading(state)
        return header_html(state.manager.current, state.loading), render_html(reading), history_frame(state)
    except Exception as e:  # noqa: BLE001 - the panel must never break the page
        log.exception("memory panel refresh failed")
        return gr.skip(), f'<div class="mem-panel mem-note">Memory reading failed: {html.escape(str(e))}</div>', \
            gr.skip()


def build_memory_panel(state: StudioState, header: gr.HTML) -> MemoryPanel:
    reading = take_reading(state)
    if state.memory_recorder is None:  # the history is recorded with or without a page open
        state.memory_recorder = MemoryRecorder(lambda: take_reading(state), every_s=SAMPLE_EVERY_S + 0.1).start()
    with gr.Accordion("Memory", open=True, elem_id="memory-accordion"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=360):
                panel_html = gr.HTML(render_html(reading), elem_id="memory-panel")
            with gr.Column(scale=2, min_width=280):
                plot = gr.LinePlot(
                    history_frame(state), x="seconds", y="GiB", color="series", height=170,
                    show_label=False, x_title="seconds ago", y_title="GiB", elem_id="memory-plot",
                    color_map=SERIES_COLORS,
                )
    timer = gr.Timer(1.0)
    timer.tick(lambda: refresh(state), outputs=[header, panel_html, plot], api_name="memory",
               show_progress="hidden", queue=False)
    return MemoryPanel(panel_html, plot, timer)
