"""Quantize tab: AWQ W4A16 quantization of a Hugging Face folder, point and click.

Start runs the quantization as a background job (studio/quantize_job.py on studio/jobs.py), not inside the browser
tab's event: it goes on when the tab closes, and every tab (a reload, a new login) shows the same job through a
timer: its progress (layer x of N, stage, an ETA from finished layers), Cancel (the quantizer stops between
steps), and once it has ended its summary (time, what calibration really got, size on disk before / after, the
before/after perplexity, per-layer error chart) and "Load this model". One job runs at a time: quantizing takes
the whole GPU. The `quantize` event (and API) starts the job and returns its summary when it ends.

The default calibration set is the built-in offline text (quant.calib_data's `builtin`): it needs no network.
Messages speak the tab's words, not the CLI's flags."""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from quant.api import fitting_group_sizes
from quant.calib_data import BUILTIN
from studio.demo_model import build_demo_model
from studio.jobs import CANCELLED, FAILED, JobBusyError, JobSnapshot
from studio.quantize_job import QuantizeOutcome, start_quantize
from ui.common import error_html, fmt_bytes, fmt_seconds, friendly_error, whole_number
from ui.job_view import job_progress_html, until_ended, watch_jobs
from ui.quantize_estimate import build_estimate
from ui.state import StudioState

log = logging.getLogger("ui.quantize")

HUB_CALIB_SETS = ["wikitext2", "ptb", "c4", "pileval"]
UPLOAD, LOCAL = "uploaded file", "local path"
CALIB_CHOICES = ([("Built-in text (offline)", BUILTIN)]
                 + [(f"{name} (Hugging Face hub: needs network)", name) for name in HUB_CALIB_SETS]
                 + [("Upload a file", UPLOAD), ("Local file or folder", LOCAL)])
CALIB_LABELS = {value: label for label, value in CALIB_CHOICES}
GPU_CALIB = (128, 2048)  # samples x tokens: AutoAWQ / LMDeploy's defaults, about a minute for a 7B model on a GPU
CPU_CALIB = (16, 512)  # without a GPU: 128 x 2048 took 4 minutes even for the 853K-parameter demo model
# CLI wording in messages from quant/ -> the words of this tab (the longest first)
UI_WORDS = [
    ("pass --overwrite (overwrite=True) to replace it", "tick Overwrite to replace it, or pick another output folder"),
    ("--work-dir must differ from the model folder", "the output folder must differ from the model folder"),
    ("pass --trust-remote-code", "tick Trust remote code"),
    (f"the built-in offline set '{BUILTIN}'", f"the calibration set \u201c{CALIB_LABELS[BUILTIN]}\u201d"),
    ("--work-dir", "output folder"), ("--w-group-size", "Group size"), ("--w-bits", "Weight bits"),
    ("--calib-seqlen", "Sequence length"), ("--calib-samples", "Samples"), ("--calib-dataset", "Calibration set"),
    ("--trust-remote-code", "Trust remote code"), ("pass --device cpu (slow)", "quantize on a machine with a GPU"),
]
IDLE_HTML = ('<div class="studio-card studio-muted" id="quant-status">Not started. Progress (layer, stage, ETA) '
             "shows here.</div>")
STARTING_HTML = '<div class="studio-card" id="quant-status">Starting...</div>'


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def fitting_group_size(model_path: str, wanted=None) -> int:
    """The group size to offer for a model: `wanted` (or 128) when it divides every linear's input width, else the
    largest that does (SmolLM2's hidden size 576 takes 64, not 128). Anything unreadable keeps the wanted one."""
    try:
        wanted = int(wanted) if wanted not in (None, "") else 128
    except (TypeError, ValueError):
        return 128
    try:
        config = Path(model_path or "").expanduser() / "config.json"
        fits = fitting_group_sizes(json.loads(config.read_text()))  # a LLaVA's language model widths count
    except (OSError, ValueError, TypeError, AttributeError):
        return wanted
    return wanted if wanted in fits or not fits else fits[0]


def default_output_dir(state: StudioState, model_path: str, group_size) -> str:
    """A fresh output folder under the output root: NAME-awq-w4gG, or NAME-awq-w4gG-2, -3 ... when that is taken."""
    name = Path((model_path or "model").rstrip("/")).name or "model"
    try:
        group = int(group_size)
    except (TypeError, ValueError):
        group = 128
    base = state.settings.quant_output_root / f"{name}-awq-w4g{group}"
    candidate, n = base, 1
    while candidate.exists() and (is_nonempty_dir(candidate) or not candidate.is_dir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return str(candidate)


def ui_words(message: str) -> str:
    for cli, ui in UI_WORDS:
        message = message.replace(cli, ui)
    return message


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_calib(choice: str, uploaded, local_path: str) -> str:
    if choice == UPLOAD:
        path = uploaded if isinstance(uploaded, str) else getattr(uploaded, "name", None)
        if not path:
            raise ValueError("upload a calibration file (.txt, .jsonl, .json, .csv or .parquet) first")
        return path
    if choice == LOCAL:
        if not (local_path or "").strip():
            raise ValueError("enter the path of a local calibration file or dataset folder")
        path = Path(local_path.strip()).expanduser()
        if not path.exists():
            raise ValueError(f"calibration path {str(path)!r} does not exist")
        return str(path)
    return choice


def calibration_text(settings: dict) -> str:
    """What calibration really used, in words: the source, and samples x tokens got (and asked for, if fewer)."""
    if not settings.get("calib_samples"):
        return "none (round to nearest)"
    source = settings.get("calib_source") or str(settings.get("calib_dataset"))
    if str(settings.get("calib_dataset")) == BUILTIN:
        source = "Built-in offline text (Python's licence, reference docs, stdlib docstrings)"
    got, seqlen = settings["calib_samples"], settings["calib_seqlen"]
    asked = settings.get("calib_samples_requested")
    short = (f" — only {got} of the {asked} samples asked for: the text ran out (give more text for all of them)"
             if asked and got < asked else "")
    return f"{html.escape(source)}: {got} samples × {seqlen} tokens = {got * seqlen:,} tokens{html.escape(short)}"


def quality_text(quality: dict, demo: bool = False) -> str:
    """The before/after perplexity row: what the 4 bits cost on a short held-out text."""
    if quality.get("error"):
        return f'<span class="studio-muted">not measured: {html.escape(quality["error"])}</span>'
    before, after = quality.get("before"), quality.get("after")
    if before is None or after is None:
        return '<span class="studio-muted">not measured (cancelled)</span>'
    change = (after / before - 1) * 100
    note = " Random weights: meaningless here." if demo else ""
    return (f'<span id="quant-ppl">16-bit {before:.2f} → quantized {after:.2f} ({change:+.1f}%)</span> '
            f'<span class="studio-muted">(lower is better; {quality["num_tokens"]} tokens of '
            f"{html.escape(quality['text'])}.{note})</span>")


def divergence_text(quality: dict) -> str:
    """KL divergence against the 16-bit model (pooled over the held-out texts) and a before/after line per text."""
    summary = quality.get("summary")
    if not summary:
        return '<span class="studio-muted">not measured</span>'
    lines = [f'<span id="quant-kld">mean {summary["kld_mean"]:.4f} · p99 {summary["kld_p99"]:.4f} · top-1 '
             f'agreement {100 * summary["top1"]:.1f}%</span> <span class="studio-muted">(nats, lower is better; '
             f"over {summary['kld_positions']} positions, from top-20 logprobs)</span>"]
    for name, pair in (quality.get("texts") or {}).items():
        before, after = pair.get("before") or {}, pair.get("after") or {}
        if "ppl" in before and "kld_mean" in after:
            lines.append(f'<span class="quant-text" data-text="{html.escape(name)}">{html.escape(name)}: '
                         f"ppl {before['ppl']:.2f} → {after['ppl']:.2f} · KLD {after['kld_mean']:.4f} "
                         f"(p99 {after['kld_p99']:.4f}) · top-1 {100 * after['top1']:.1f}%</span>")
    return "<br>".join(lines)


def summary_html(report: dict, seconds: float, quality: dict | None = None, demo: bool = False) -> str:
    sizes, timings, errs = report["sizes"], report["timings_s"], report["error_summary"]
    s = report["settings"]
    ratio = errs.get("mean_awq_over_rtn_layer_mse")
    rows = [
        ("Output folder", html.escape(report["work_dir"])),
        ("Time", f"{fmt_seconds(seconds)} (load {fmt_seconds(timings.get('load'))}, "
                 f"layers {fmt_seconds(timings.get('quantize'))}, export {fmt_seconds(timings.get('export'))})"),
        ("Weights on disk", f"{fmt_bytes(sizes['source_weight_bytes'])} → {fmt_bytes(sizes['output_weight_bytes'])}"
                            + (f" ({sizes['compression']:.2f}x smaller)" if sizes.get("compression") else "")
                            + ' <span class="studio-muted">(weight files; in memory it depends on the compute '
                              "dtype)</span>"),
        ("Calibration", calibration_text(s)),
        ("Settings", f"W{s['w_bits']} group {s['w_group_size']} · search-scale {s['search_scale']} · "
                     f"clip {s['clip']} · {s['device']}"),
        ("Layer error", f"AWQ / round-to-nearest output MSE: {ratio:.3f} on average (lower is better)"
                        if ratio is not None else "n/a"),
    ]
    if quality is not None:
        rows.append(("Perplexity", quality_text(quality, demo)))
        if not quality.get("error"):
            rows.append(("KL divergence vs 16-bit", divergence_text(quality)))
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (f'<div class="studio-callout studio-ok" id="quant-done"><b>Quantization done</b></div>'
            f'<div class="studio-card"><table class="studio-table">{table}</table></div>')


def error_frame(report: dict | None) -> pd.DataFrame:
    rows = []
    for layer in (report or {}).get("layers", []):
        for key, label in (("mse_awq", "AWQ"), ("mse_rtn", "round to nearest")):
            if layer.get(key) is not None:
                rows.append((str(layer["index"]), layer[key], label))  # a category: integer ticks, in order
    return pd.DataFrame(rows, columns=["layer", "output MSE", "method"])


def job_outputs(state: StudioState, snap: JobSnapshot) -> tuple:
    """(status, chart, load button, result path) for a job that has ended."""
    hidden = gr.update(visible=False)
    if snap.state == CANCELLED:
        return (f'<div class="studio-callout studio-warn" id="quant-cancelled"><b>Cancelled</b> after '
                f"{fmt_seconds(snap.elapsed_s)}; nothing was written.</div>"), hidden, hidden, None
    if snap.state == FAILED:
        return error_html("Quantization failed", ui_words(friendly_error(snap.error))), hidden, hidden, None
    outcome: QuantizeOutcome = snap.result
    report = outcome.report
    summary = summary_html(report, snap.elapsed_s, outcome.quality, state.is_demo_path(outcome.model_path))
    chart = gr.update(value=error_frame(report), visible=True, sort=[str(d["index"]) for d in report["layers"]])
    return summary, chart, gr.update(visible=True), report["work_dir"]


@dataclass
class QuantizeTab:
    model_path: gr.Textbox
    load_btn: gr.Button
    result_path: gr.State
    load_status: gr.HTML


def build_quantize_tab(state: StudioState) -> QuantizeTab:
    current = state.manager.current
    first = str(current.path) if current else str(state.settings.default_model_path)
    gpu = has_gpu()
    n_samples0, seqlen0 = GPU_CALIB if gpu else CPU_CALIB
    size_note = ("" if gpu else
                 f"No GPU here: smaller calibration sizes are suggested ({CPU_CALIB[0]} × {CPU_CALIB[1]} instead of "
                 f"{GPU_CALIB[0]} × {GPU_CALIB[1]}); on a CPU, {GPU_CALIB[0]} × {GPU_CALIB[1]} takes minutes even "
                 "for the small demo model.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            model_path = gr.Textbox(label="Model to quantize", value=first, elem_id="quant-model",
                                    info="A Hugging Face folder (fp16 / bf16 / fp32 weights).")
            with gr.Row():
                calib = gr.Dropdown(CALIB_CHOICES, value=BUILTIN, label="Calibration set", elem_id="quant-calib",
                                    info="The built-in text works offline; hub sets need network.")
                samples = gr.Number(value=n_samples0, precision=0, label="Samples", elem_id="quant-samples",
                                    info="text blocks")
                seqlen = gr.Number(value=seqlen0, precision=0, label="Sequence length", elem_id="quant-seqlen",
                                   info="tokens per block")
            if size_note:
                gr.HTML(f'<div class="studio-callout studio-warn" id="quant-cpu-note">{html.escape(size_note)}</div>')
            calib_file = gr.File(label="Calibration file", file_types=[".txt", ".jsonl", ".json", ".csv", ".parquet"],
                                 visible=False, elem_id="quant-calib-file")
            calib_path = gr.Textbox(label="Calibration file or folder", visible=False, elem_id="quant-calib-path",
                                    placeholder="/data/calib.txt (.txt, .jsonl, .json, .csv, .parquet, or a "
                                                "datasets save_to_disk folder)")
            with gr.Row():
                bits = gr.Dropdown([4], value=4, label="Weight bits", info="AutoAWQ GEMM format: 4-bit")
                group = gr.Dropdown([32, 64, 128], value=fitting_group_size(first), label="Group size",
                                    elem_id="quant-group",
                                    allow_custom_value=True, info="input channels per scale / zero point")
                search_scale = gr.Checkbox(value=False, label="Search scale",
                                           info="also try LMDeploy's weight-aware scales (2x time)")
                clip = gr.Checkbox(value=True, label="Clip search", info="AutoAWQ's weight clipping")
                trust = gr.Checkbox(value=state.settings.engine_config.trust_remote_code, label="Trust remote code",
                                    info="run the folder's tokenizer code (InternLM2)")
            with gr.Row():
                first_out = default_output_dir(state, first, fitting_group_size(first))
                output = gr.Textbox(label="Output folder", value=first_out, scale=4, elem_id="quant-output",
                                    info="A fresh name is suggested; it must be new or empty.")
                overwrite = gr.Checkbox(value=False, label="Overwrite", elem_id="quant-overwrite", scale=1,
                                        info="replace a folder that is already there")
            build_estimate(state, resolve_calib, model_path, calib, calib_file, calib_path, samples, seqlen, bits,
                           group, search_scale, clip, trust)
            with gr.Row():
                start_btn = gr.Button("Start quantization", variant="primary", elem_id="quant-start")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="quant-cancel")
        with gr.Column(scale=2):
            gr.Markdown("#### Progress and result")
            status = gr.HTML(IDLE_HTML, elem_id="quant-status-box")
            chart = gr.LinePlot(error_frame(None), x="layer", y="output MSE", color="method", height=220,
                                title="Per-layer output error (lower is better)",
                                visible=False, elem_id="quant-chart", x_title="decoder layer",
                                y_title="output MSE")
            load_btn = gr.Button("Load this model", variant="primary", visible=False, elem_id="quant-load")
            load_status = gr.HTML("", elem_id="quant-load-status")
    result_path = gr.State(None)

    calib.change(lambda c: (gr.update(visible=c == UPLOAD), gr.update(visible=c == LOCAL)), inputs=calib,
                 outputs=[calib_file, calib_path], api_visibility="private", queue=False)
    model_path.change(lambda p, g: fitting_group_size(p, g), inputs=[model_path, group], outputs=group,
                      queue=False, api_visibility="private")
    for src in (model_path, group):
        src.change(lambda p, g: default_output_dir(state, p or "model", g), inputs=[model_path, group],
                   outputs=output, api_visibility="private", queue=False)

    async def start(model, calib_choice, uploaded, local, n_samples, n_seqlen, w_bits, group_size, scale_search,
                    clip_search, out_dir, trust_remote_code=False, replace=False):
        hidden = gr.update(visible=False)
        try:
            model = (model or "").strip()
            if not model:
                raise ValueError("enter the model folder to quantize")
            out_dir = (out_dir or "").strip()
            if not out_dir:
                raise ValueError("enter an output folder")
            state.settings.check_model_path(model)
            state.settings.check_output_path(out_dir)
            if calib_choice == LOCAL and (local or "").strip():
                state.settings.check_model_path(local.strip())
            target = Path(out_dir).expanduser()
            if target.exists() and not target.is_dir():
                raise ValueError(f"the output folder {out_dir} is a file: choose another output folder")
            if is_nonempty_dir(target) and not replace:
                fresh = default_output_dir(state, model, group_size)
                return (error_html("The output folder already holds files",
                                   f"{out_dir} is not empty. Tick Overwrite to replace it, or start again with the "
                                   f"fresh name now in Output folder: {fresh}"),
                        hidden, hidden, None, fresh)
            try:
                group_int = int(group_size)
            except (TypeError, ValueError):
                raise ValueError(f"Group size must be a whole number such as 128, 64 or 32 (or -1 for one group "
                                 f"per row); got {group_size!r}.") from None
            kwargs = dict(
                calib_dataset=resolve_calib(calib_choice, uploaded, local),
                calib_samples=whole_number(n_samples, "Samples", minimum=1),
                calib_seqlen=whole_number(n_seqlen, "Sequence length", minimum=16), w_bits=int(w_bits),
                w_group_size=group_int, search_scale=bool(scale_search), clip=bool(clip_search),
                trust_remote_code=bool(trust_remote_code), overwrite=bool(replace),
            )
            if state.is_demo_path(model):
                build_demo_model(state.settings.demo_model_dir)
            job = start_quantize(state.quant_jobs, model, out_dir, kwargs, on_done=on_done)
        except JobBusyError as e:  # a toast: the box goes on showing the running job (the timer draws it)
            gr.Warning(ui_words(friendly_error(e)))
            return error_html("Could not start", ui_words(friendly_error(e))), gr.skip(), gr.skip(), gr.skip(), \
                gr.skip()
        except Exception as e:  # noqa: BLE001
            return error_html("Could not start", ui_words(friendly_error(e))), hidden, hidden, None, gr.skip()
        status_v, chart_v, load_v, path_v = job_outputs(state, await until_ended(job))
        return status_v, chart_v, load_v, path_v, default_output_dir(state, model, group_size)

    def on_done(outcome: QuantizeOutcome) -> None:
        log.info("quantized %s -> %s (%s)", outcome.model_path, outcome.report["work_dir"],
                 outcome.calibration or "no calib")
        state.add_quantized(outcome.report["work_dir"])

    def cancel():
        if not state.quant_jobs.cancel():
            gr.Info("No quantization is running.")
            return
        gr.Info("Cancelling: the quantizer stops after its current step.")

    def reset():
        hidden = gr.update(visible=False)
        return STARTING_HTML, hidden, hidden, ""

    start_inputs = [model_path, calib, calib_file, calib_path, samples, seqlen, bits, group, search_scale, clip,
                    output, trust, overwrite]
    start_btn.click(reset, outputs=[status, chart, load_btn, load_status], queue=False,
                    api_visibility="private").then(
        start, inputs=start_inputs, outputs=[status, chart, load_btn, result_path, output], api_name="quantize",
        concurrency_limit=4, show_progress="hidden")
    hidden = gr.update(visible=False)
    watch_jobs(state.quant_jobs, [status, chart, load_btn, result_path],
               running=lambda snap: (job_progress_html(snap, "quant-job"), hidden, hidden, None),
               ended=lambda snap: job_outputs(state, snap))
    cancel_btn.click(cancel, api_name="cancel_quantize", queue=False)
    return QuantizeTab(model_path, load_btn, result_path, load_status)
