"""Compare tab: one model under several settings (fp16 / bf16 / W4A16 x KV off / int8 / int4, session lengths, cache
fractions), side by side: memory by part, KV capacity, decode and throughput, perplexity, a greedy reply.

The predicted table (engine/planner.py, config.json only) updates as the settings change, before anything runs.
Run starts benchmarks.compare.run_compare in a worker thread: every setting runs in a fresh child process, so the
chat tab's model is untouched and the numbers are clean; progress shows per setting, Cancel kills the running
child. The last results (table, chart, JSON / markdown / PNG files) are kept while the app runs."""

from __future__ import annotations

import asyncio
import html
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd

from benchmarks.compare import (
    ChildRunner,
    CompareSpec,
    Workload,
    parse_settings,
    predict_rows,
    run_compare,
    write_outputs,
)
from ui.common import error_html, friendly_error, log, whole_number
from ui.state import StudioState

SETTING_CHOICES = ["fp16", "fp16-kv8", "fp16-kv4", "bf16", "w4a16", "w4a16-kv8", "w4a16-kv4", "fp32", "fp32-kv4"]
GPU_CHOICES = [("this machine's GPU", "local"), ("24 GB", "24"), ("48 GB", "48"), ("80 GB", "80"), ("141 GB", "141")]
PREDICTED_COLUMNS = ["setting", "session_len", "cache_max_entry_count", "pred_weights_GiB", "pred_kv_bytes_per_token",
                     "pred_kv_capacity_tokens", "pred_max_sessions", "pred_total_GiB", "pred_fits", "error"]
RESULT_COLUMNS = ["setting", "session_len", "cache_max_entry_count", "status", "pred_weights_GiB", "weights_GiB",
                  "kv_capacity_tokens", "pred_kv_capacity_tokens", "max_sessions", "memory_after_load_GiB",
                  "memory_peak_GiB", "decode_tok_s", "throughput_tok_s", "ttft_ms", "perplexity", "greedy_match",
                  "error"]
POLL_S = 0.25


@dataclass
class CompareRun:
    """One Run click: the worker thread, its child runner, per-setting progress and the outcome."""

    runner: ChildRunner = field(default_factory=ChildRunner)
    jobs: dict = field(default_factory=dict)  # label -> (stage, fraction)
    fraction: float = 0.0
    rows: list = field(default_factory=list)
    result: dict | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


@dataclass
class CompareStore:
    """The tab's memory while the app runs: the running comparison and the last finished one."""

    running: CompareRun | None = None
    result: dict | None = None
    files: list[str] = field(default_factory=list)
    out_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="studio-compare-")))
    lock: threading.Lock = field(default_factory=threading.Lock)


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    def cell(v):
        if isinstance(v, float):
            return round(v, 4)
        return "" if v is None else v

    return pd.DataFrame([[cell(r.get(c)) for c in columns] for r in rows], columns=columns)


def _float_list(text: str, label: str) -> list[float]:
    try:
        values = [float(x) for x in str(text or "").replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{label}: give numbers separated by commas, e.g. 0.8, 0.4") from None
    if not values:
        raise ValueError(f"{label}: give at least one value")
    return values


def _session_lens(text: str) -> list[int | None]:
    items = str(text or "").replace(",", " ").split()
    if not items:
        return [None]
    return [whole_number(x, "Session length", minimum=2) for x in items]


def build_spec(state: StudioState, model, awq_model, settings, session_lens, fractions, prompt_len, new_tokens,
               concurrency, gpu_memory, quantize=False) -> CompareSpec:
    """The form's values -> a validated CompareSpec (ValueError with a sentence for anything wrong)."""
    model = (model or "").strip() or str(state.settings.default_model_path)
    if not settings:
        raise ValueError("tick at least one setting to compare")
    workload = Workload(whole_number(prompt_len, "Prompt length", minimum=1),
                        whole_number(new_tokens, "New tokens", minimum=2),
                        whole_number(concurrency, "Concurrency", minimum=1))
    gpu = None if gpu_memory in (None, "", "local") else float(gpu_memory)
    return CompareSpec(model, parse_settings(list(settings)), _session_lens(session_lens),
                       _float_list(fractions, "Cache fraction"), (awq_model or "").strip() or None, workload, gpu)


def predicted_table(state: StudioState, *form) -> tuple[pd.DataFrame, str]:
    try:
        spec = build_spec(state, *form)
        if state.is_demo_path(spec.model):
            from engine.demo_model import build_demo_model

            build_demo_model(state.settings.demo_model_dir)
        rows = predict_rows(spec, quantize=bool(form[-1]) if len(form) > 9 else False)
        for r in rows:
            if r.get("pred_fits") is False:
                r["error"] = r.get("pred_fits_note")
        return _frame(rows, PREDICTED_COLUMNS), ""
    except Exception as e:  # noqa: BLE001 - a sentence under the table
        return _frame([], PREDICTED_COLUMNS), error_html("Cannot plan these settings", friendly_error(e))


def progress_html(run: CompareRun) -> str:
    items = "".join(
        f'<li><b>{html.escape(label)}</b>: {html.escape(stage)} ({fraction * 100:.0f}%)</li>'
        for label, (stage, fraction) in run.jobs.items())
    return f'<div class="studio-card" id="compare-progress"><ul>{items}</ul></div>'


def results_outputs(store: CompareStore):
    result = store.result
    if result is None:
        return (_frame([], RESULT_COLUMNS), gr.update(value=None), gr.update(value=None),
                '<div class="studio-muted" id="compare-status">No comparison run yet.</div>')
    kind = result.get("memory_kind") or ""
    demo = any(r.get("is_demo") for r in result["rows"])
    note = (" Random weights (demo model or shape:), so perplexity and replies are meaningless." if demo else "")
    n_ok = sum(r.get("status") == "ok" for r in result["rows"])
    status = (f'<div class="studio-callout studio-ok" id="compare-done"><b>Comparison done</b>: {n_ok} of '
              f'{len(result["rows"])} settings measured on {html.escape(result["device"])}'
              + (" (cancelled)" if result.get("cancelled") else "")
              + f'. Memory: {html.escape(kind)}.{html.escape(note)}</div>')
    png = next((f for f in store.files if f.endswith(".png")), None)
    return _frame(result["rows"], RESULT_COLUMNS), gr.update(value=png), gr.update(value=store.files), status


def build_compare_tab(state: StudioState):
    store = CompareStore()
    cpu = not _has_gpu()
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            model = gr.Textbox(label="Model (16-bit folder, or shape:llama2-7b for random weights at a real shape)",
                               value=str(state.settings.default_model_path), elem_id="compare-model")
            awq_model = gr.Textbox(label="AWQ folder of the same model (for the W4A16 settings)", value="",
                                   elem_id="compare-awq", placeholder="empty: W4A16 settings need one (or a shape:)")
            settings = gr.CheckboxGroup(SETTING_CHOICES, value=["fp16", "fp16-kv4"] if cpu else
                                        ["fp16", "w4a16", "w4a16-kv8", "w4a16-kv4"], label="Settings",
                                        elem_id="compare-settings")
            with gr.Row():
                session_lens = gr.Textbox(label="Session lengths", value="256" if cpu else "2048, 4096",
                                          elem_id="compare-session-lens")
                fractions = gr.Textbox(label="Cache fraction", value="0.8",
                                       info="cache_max_entry_count; several: 0.5, 0.8",
                                       elem_id="compare-fractions")
                gpu_memory = gr.Dropdown(GPU_CHOICES, value="local" if not cpu else "80", label="GPU memory (plan)",
                                         elem_id="compare-gpu")
            with gr.Row():
                prompt_len = gr.Number(value=16 if cpu else 128, precision=0, label="Prompt length",
                                       elem_id="compare-prompt-len")
                new_tokens = gr.Number(value=8 if cpu else 128, precision=0, label="New tokens",
                                       elem_id="compare-new-tokens")
                concurrency = gr.Number(value=2 if cpu else 16, precision=0, label="Concurrency",
                                        elem_id="compare-concurrency")
            quantize = gr.Checkbox(value=False, label="No AWQ folder: quantize first (AWQ, built-in calibration text)",
                                   elem_id="compare-quantize")
            with gr.Row():
                run_btn = gr.Button("Run comparison", variant="primary", elem_id="compare-run")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="compare-cancel")
        with gr.Column(scale=3):
            gr.Markdown("#### Predicted (memory planner, before anything loads)")
            form = [model, awq_model, settings, session_lens, fractions, prompt_len, new_tokens, concurrency,
                    gpu_memory, quantize]
            defaults = [c.value for c in form]
            predicted = gr.Dataframe(lambda: predicted_table(state, *defaults)[0], elem_id="compare-predicted",
                                     interactive=False, wrap=True)
            plan_note = gr.HTML("", elem_id="compare-plan-note")
            status = gr.HTML(lambda: results_outputs(store)[3], elem_id="compare-status-box")
    gr.Markdown("#### Measured (each setting in a fresh process)")
    results = gr.Dataframe(lambda: results_outputs(store)[0], elem_id="compare-results", interactive=False, wrap=True)
    chart = gr.Image(lambda: results_outputs(store)[1]["value"], label="Memory by part · tokens/s · perplexity",
                     elem_id="compare-chart", type="filepath", interactive=False)
    files = gr.File(lambda: results_outputs(store)[2]["value"], label="Download (JSON, markdown, PNG)",
                    file_count="multiple", elem_id="compare-files", interactive=False)

    def plan(*values):
        return predicted_table(state, *values)

    for comp in form:
        comp.change(plan, inputs=form, outputs=[predicted, plan_note], api_visibility="private", queue=False)

    async def run(*values, progress=gr.Progress()):
        try:
            spec = build_spec(state, *values)
            if state.is_demo_path(spec.model):
                from engine.demo_model import build_demo_model

                build_demo_model(state.settings.demo_model_dir)
            with store.lock:
                if store.running is not None and not store.running.finished.is_set():
                    raise ValueError("a comparison is already running (maybe from another browser tab): wait for "
                                     "it or cancel it")
                current = store.running = CompareRun()
        except Exception as e:  # noqa: BLE001
            table, chart_v, files_v, _ = results_outputs(store)
            return table, chart_v, files_v, error_html("Could not start", friendly_error(e))
        out_dir = store.out_root / time.strftime("%Y%m%d-%H%M%S")

        def on_progress(index, count, label, stage, fraction):
            current.jobs[label] = (stage, fraction)
            current.fraction = (index + fraction) / count if count else 0.0  # count 0: quantizing first

        def work():
            try:
                current.result = run_compare(spec, out_dir, quantize=bool(values[-1]), on_progress=on_progress,
                                             runner=current.runner, on_row=current.rows.append)
            except BaseException as e:  # noqa: BLE001
                current.error = e
            finally:
                current.finished.set()

        log.info("compare: %s, settings %s", spec.model, ",".join(s.name for s in spec.settings))
        threading.Thread(target=work, name="compare", daemon=True).start()
        try:
            while not current.finished.is_set():
                label = next(reversed(current.jobs), "starting")
                stage = current.jobs.get(label, ("", 0))[0]
                progress(current.fraction, desc=f"{label}: {stage}")
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:  # the browser went away: stop the child too
            current.runner.cancel()
            raise
        if current.error is not None:
            table, chart_v, files_v, _ = results_outputs(store)
            return table, chart_v, files_v, error_html("Comparison failed", friendly_error(current.error))
        _remember_for_library(state, spec.model, current.result)
        with store.lock:
            store.result = current.result
            store.files = [str(out_dir / n) for n in ("compare.json", "compare.md", "compare.png")]
        return results_outputs(store)

    def cancel():
        current = store.running
        if current is None or current.finished.is_set():
            gr.Info("No comparison is running.")
            return
        current.runner.cancel()
        gr.Info("Cancelling: the running setting's process is stopped.")

    run_btn.click(run, inputs=form, outputs=[results, chart, files, status], api_name="compare",
                  concurrency_limit=2, show_progress_on=[status])
    cancel_btn.click(cancel, api_name="cancel_compare", queue=False)
    return plan, form, [predicted, plan_note]


def _remember_for_library(state: StudioState, model: str, result: dict) -> None:
    """The Model tab's library shows each folder's last Compare run."""
    from ui.model_library import compare_summary

    try:
        key = str(Path(model).expanduser().resolve())
    except OSError:
        return
    with state.lock:
        state.compare_results[key] = compare_summary(result)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["build_compare_tab", "write_outputs"]
