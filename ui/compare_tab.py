"""Compare tab: one model under several settings (fp16 / bf16 / W4A16 x KV off / int8 / int4, session lengths, cache
fractions), side by side: memory by part, KV capacity, decode and throughput, quality against the 16-bit model
(perplexity, KL divergence mean / p99, top-1 agreement, per held-out text), a greedy reply, and a verdict: the fastest
setting that meets the constraints (GPU memory, sessions x session length, the largest acceptable mean KL divergence).

The predicted table (studio/planner.py, config.json only) and its per-setting fit ("fits" / "does not fit" / "fits,
but only N sessions") update as the settings change, before anything runs.
Run starts the comparison as a background job (studio.compare.start_compare on studio/jobs.py): every setting runs
in a fresh child process, so the chat tab's model is untouched and the numbers are clean. The job outlives the
browser tab; every tab (a reload, a new login) shows it through a timer: progress per setting with an ETA, Cancel
(kills the running child), and once it has ended its results (table, chart, JSON / markdown / PNG files)."""

from __future__ import annotations

import html
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.compare import (
    DEFAULT_MAX_KLD,
    QUALITY_COLUMNS,
    CompareOutcome,
    CompareSpec,
    Workload,
    parse_settings,
    plan_fit_lines,
    predict_rows,
    quality_rows,
    start_compare,
)
from studio.demo_model import build_demo_model
from studio.jobs import JobBusyError, JobSnapshot
from ui.common import error_html, fmt_seconds, friendly_error, log, whole_number
from ui.job_view import job_progress_html, until_ended, watch_jobs
from ui.model_library import compare_summary
from ui.state import StudioState

SETTING_CHOICES = ["fp16", "fp16-kv8", "fp16-kv4", "bf16", "w4a16", "w4a16-kv8", "w4a16-kv4", "fp32", "fp32-kv4"]
CPU_CHOICE = [("none here: runs on the CPU", "local")]
GPU_CHOICES = [("this machine's GPU", "local"), ("24 GB", "24"), ("48 GB", "48"), ("80 GB", "80"), ("141 GB", "141")]
PREDICTED_COLUMNS = ["setting", "session_len", "cache_max_entry_count", "pred_weights_GiB", "pred_kv_bytes_per_token",
                     "pred_kv_capacity_tokens", "pred_max_sessions", "pred_total_GiB", "pred_fits", "error"]
RESULT_COLUMNS = ["setting", "session_len", "cache_max_entry_count", "status", "pred_weights_GiB", "weights_GiB",
                  "kv_capacity_tokens", "pred_kv_capacity_tokens", "max_sessions", "memory_after_load_GiB",
                  "memory_peak_GiB", "decode_tok_s", "throughput_tok_s", "ttft_ms", "perplexity", "kld_mean", "kld_p99",
                  "top1", "greedy_match", "error"]
STARTING = '<div class="studio-card" id="compare-status">Starting...</div>'
NO_RESULTS = '<div class="studio-muted" id="compare-status">No comparison run yet.</div>'


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
               concurrency, gpu_memory, quantize=False, sessions=1, max_kld=DEFAULT_MAX_KLD) -> CompareSpec:
    """The form's values -> a validated CompareSpec (ValueError with a sentence for anything wrong)."""
    model = (model or "").strip() or str(state.settings.default_model_path)
    for path in (model, (awq_model or "").strip()):  # the Model tab's folder policy (--model-dir), same answer
        if path:
            state.settings.check_model_path(path)
    if not settings:
        raise ValueError("tick at least one setting to compare")
    workload = Workload(whole_number(prompt_len, "Prompt length", minimum=1),
                        whole_number(new_tokens, "New tokens", minimum=2),
                        whole_number(concurrency, "Concurrency", minimum=1))
    gpu = None if gpu_memory in (None, "", "local") else float(gpu_memory)
    sessions = whole_number(sessions if sessions not in (None, "") else 1, "Sessions", minimum=1)
    try:
        max_kld = float(DEFAULT_MAX_KLD if max_kld in (None, "") else max_kld)
    except (TypeError, ValueError):
        raise ValueError("Largest mean KL divergence: give a number, e.g. 0.05") from None
    if not max_kld >= 0:
        raise ValueError("Largest mean KL divergence: give a number of 0 or more, e.g. 0.05")
    return CompareSpec(model, parse_settings(list(settings)), _session_lens(session_lens),
                       _float_list(fractions, "Cache fraction"), (awq_model or "").strip() or None, workload, gpu,
                       sessions=sessions, max_kld=max_kld)


def predicted_table(state: StudioState, *form) -> tuple[pd.DataFrame, str]:
    try:
        spec = build_spec(state, *form)
        if state.is_demo_path(spec.model):
            build_demo_model(state.settings.demo_model_dir)
        rows = predict_rows(spec, quantize=bool(form[9]) if len(form) > 9 else False)
        fit = plan_fit_lines(rows, spec.sessions)
        for r in rows:
            if r.get("pred_fits") is False:
                r["error"] = r.get("pred_fits_note")
        items = "".join(f"<li>{html.escape(line)}</li>" for line in fit)
        return _frame(rows, PREDICTED_COLUMNS), (f'<div class="studio-card" id="compare-plan-fit"><b>Can it fit?</b> '
                                                 f'(planner, before the run)<ul>{items}</ul></div>')
    except Exception as e:  # noqa: BLE001 - a sentence under the table
        return _frame([], PREDICTED_COLUMNS), error_html("Cannot plan these settings", friendly_error(e))


def results_outputs(snap: JobSnapshot | None):
    """(table, chart, files, status) of a comparison that has ended (None: none has)."""
    if snap is None or snap.result is None:
        status = NO_RESULTS if snap is None else error_html("Comparison failed", friendly_error(snap.error))
        return _frame([], RESULT_COLUMNS), gr.update(value=None), gr.update(value=None), status
    outcome: CompareOutcome = snap.result
    result = outcome.result
    kind = result.get("memory_kind") or ""
    demo = any(r.get("is_demo") for r in result["rows"])
    note = (" Random weights (demo model or shape:), so perplexity and replies are meaningless." if demo else "")
    n_ok = sum(r.get("status") == "ok" for r in result["rows"])
    if result.get("cancelled"):
        return (_frame(result["rows"], RESULT_COLUMNS), gr.update(value=None), gr.update(value=None),
                f'<div class="studio-callout studio-warn" id="compare-cancelled"><b>Comparison cancelled</b> after '
                f"{fmt_seconds(snap.elapsed_s)}: {n_ok} of {len(result['rows'])} settings measured.</div>")
    verdict = (result.get("verdict") or {}).get("line")
    verdict_html = (f'<div class="studio-card" id="compare-verdict"><b>{html.escape(verdict)}</b></div>'
                    if verdict else "")
    status = (f'<div class="studio-callout studio-ok" id="compare-done" data-job="{snap.id}"><b>Comparison done</b>: '
              f'{n_ok} of '
              f'{len(result["rows"])} settings measured on {html.escape(result["device"])} in '
              f"{fmt_seconds(snap.elapsed_s)}. Memory: {html.escape(kind)}.{html.escape(note)}</div>{verdict_html}"
              + quality_table_html(result["rows"]))
    png = next((f for f in outcome.files if f.endswith(".png")), None)
    return _frame(result["rows"], RESULT_COLUMNS), gr.update(value=png), gr.update(value=outcome.files), status


def quality_table_html(rows: list[dict]) -> str:
    """Per held-out text: perplexity, KL divergence against the 16-bit reference (mean, p99), top-1 agreement."""
    per_text = quality_rows(rows)
    if not per_text:
        return ""

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v if v is not None else ""))

    head = "".join(f"<th>{c}</th>" for c in QUALITY_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in QUALITY_COLUMNS) + "</tr>"
                   for r in per_text)
    return (f'<details class="studio-card" id="compare-quality"><summary>Quality by held-out text</summary>'
            f'<table class="studio-table"><tr>{head}</tr>{body}</table></details>')


def finished(state: StudioState) -> JobSnapshot | None:
    job = state.compare_jobs.latest
    return job.snapshot() if job is not None and job.finished.is_set() else None


def progress_card(snap: JobSnapshot) -> str:
    steps = [f"{label}: {stage} ({fraction * 100:.0f}%)" for label, (stage, fraction) in (snap.detail or {}).items()]
    return job_progress_html(snap, "compare-job", steps)


def build_compare_tab(state: StudioState):
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
                # on a machine without a GPU the settings run (and are planned) on the CPU: no card size to choose
                gpu_memory = gr.Dropdown(GPU_CHOICES if not cpu else CPU_CHOICE, value="local",
                                         label="GPU memory (plan)", interactive=not cpu, elem_id="compare-gpu")
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
                sessions_n = gr.Number(value=1, precision=0, label="Sessions at once (verdict)",
                                       elem_id="compare-sessions")
                max_kld = gr.Number(value=DEFAULT_MAX_KLD, label="Largest mean KL divergence vs 16-bit (verdict)",
                                    elem_id="compare-max-kld")
            with gr.Row():
                run_btn = gr.Button("Run comparison", variant="primary", elem_id="compare-run")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="compare-cancel")
        with gr.Column(scale=3):
            gr.Markdown("#### Predicted (memory planner, before anything loads)")
            form = [model, awq_model, settings, session_lens, fractions, prompt_len, new_tokens, concurrency,
                    gpu_memory, quantize, sessions_n, max_kld]
            defaults = [c.value for c in form]
            predicted = gr.Dataframe(lambda: predicted_table(state, *defaults)[0], elem_id="compare-predicted",
                                     interactive=False, wrap=True)
            plan_note = gr.HTML(lambda: predicted_table(state, *defaults)[1], elem_id="compare-plan-note")
            status = gr.HTML(NO_RESULTS, elem_id="compare-status-box")
    gr.Markdown("#### Measured (each setting in a fresh process)")
    results = gr.Dataframe(_frame([], RESULT_COLUMNS), elem_id="compare-results", interactive=False, wrap=True)
    chart = gr.Image(None, label="Memory by part · tokens/s · perplexity by text · KL divergence vs 16-bit",
                     elem_id="compare-chart", type="filepath", interactive=False)
    files = gr.File(None, label="Download (JSON, markdown, PNG)",
                    file_count="multiple", elem_id="compare-files", interactive=False)

    def plan(*values):
        return predicted_table(state, *values)

    for comp in form:
        comp.change(plan, inputs=form, outputs=[predicted, plan_note], api_visibility="private", queue=False)

    async def run(*values):
        try:
            spec = build_spec(state, *values)
            if state.is_demo_path(spec.model):
                build_demo_model(state.settings.demo_model_dir)
            out_dir = state.compare_out_root / time.strftime("%Y%m%d-%H%M%S")
            job = start_compare(state.compare_jobs, spec, out_dir, quantize=bool(values[9]))
        except JobBusyError as e:  # a toast: the box goes on showing the running comparison (the timer draws it)
            gr.Warning(friendly_error(e))
            return gr.skip(), gr.skip(), gr.skip(), error_html("Could not start", friendly_error(e))
        except Exception as e:  # noqa: BLE001
            table, chart_v, files_v, _ = results_outputs(finished(state))
            return table, chart_v, files_v, error_html("Could not start", friendly_error(e))
        log.info("compare: %s, settings %s", spec.model, ",".join(s.name for s in spec.settings))
        snap = await until_ended(job)
        if snap.result is not None and not snap.result.result.get("cancelled"):
            _remember_for_library(state, spec.model, snap.result.result)
        return results_outputs(snap)

    def cancel():
        if not state.compare_jobs.cancel():
            gr.Info("No comparison is running.")
            return
        gr.Info("Cancelling: the running setting's process is stopped.")

    run_btn.click(lambda: STARTING, outputs=status, queue=False, api_visibility="private").then(
        run, inputs=form, outputs=[results, chart, files, status], api_name="compare", concurrency_limit=2,
        show_progress="hidden")
    cancel_btn.click(cancel, api_name="cancel_compare", queue=False)
    watch_jobs(state.compare_jobs, [results, chart, files, status],
               running=lambda snap: (gr.skip(), gr.skip(), gr.skip(), progress_card(snap)), ended=results_outputs)
    return plan, form, [predicted, plan_note]


def _remember_for_library(state: StudioState, model: str, result: dict) -> None:
    """The Model tab's library shows each folder's last Compare run."""
    try:
        key = str(Path(model).expanduser().resolve())
    except OSError:
        return
    with state.lock:
        state.compare_results[key] = compare_summary(result)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["build_compare_tab"]
