"""The background jobs' view (studio/jobs.py), shared by the Quantize and Compare tabs: the progress card, the timer
that redraws a slot's latest job in every browser tab (so a tab opened after a reload or a new login shows the
running job and, once it ends, its outcome), and the start event's wait for the end (cancelled when its tab
closes; the job is not)."""

from __future__ import annotations

import asyncio
import html
from collections.abc import Callable

import gradio as gr

from studio.jobs import CANCELLING, Job, JobSlot, JobSnapshot
from ui.common import fmt_seconds

POLL_S = 0.5  # how often every tab redraws a running job; the start event's wait between looks


def job_progress_html(snap: JobSnapshot, elem_id: str, steps: list[str] | None = None) -> str:
    """A running background job (studio/jobs.py) as the same card in every browser tab: a bar, what it is doing,
    the time left (an estimate), how long it has run; `steps` (one line each) under it."""
    pct = 100 * snap.fraction
    words = "Cancelling..." if snap.state == CANCELLING else snap.description
    eta = f" · about {fmt_seconds(snap.eta_s)} left (estimate)" if snap.eta_s is not None else " · ETA: estimating"
    items = "".join(f"<li>{html.escape(s)}</li>" for s in steps or [])
    return (f'<div class="studio-card" id="{elem_id}" data-job="{snap.id}" data-state="{snap.state}">'
            f'<div class="studio-job-bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
            f'aria-valuenow="{pct:.1f}" aria-label="{html.escape(words + eta)}">'
            f'<div class="studio-job-fill" style="width: {pct:.1f}%"></div></div>'
            + (f'<div class="studio-muted">{html.escape(snap.title)}</div>' if snap.title else "")
            + f'<b id="{elem_id}-text">{html.escape(words)}</b><span id="{elem_id}-eta">{html.escape(eta)}</span>'
            f' <span class="studio-muted">({pct:.0f}% · running for {fmt_seconds(snap.elapsed_s)}; it goes on if '
            f"this tab closes, and any tab shows it)</span>" + (f"<ul>{items}</ul>" if items else "") + "</div>")


def watch_jobs(slot: JobSlot, outputs: list, running: Callable[[JobSnapshot], tuple],
               ended: Callable[[JobSnapshot], tuple]) -> None:
    """Every tab redraws `slot`'s latest job on a timer: running(snap) while it runs, ended(snap) once it has ended
    (each gives one value per output). A tab redraws only what changed since it last drew (the outcome once)."""
    skip = tuple(gr.skip() for _ in outputs)

    def refresh(seen):
        job = slot.latest
        if job is None:
            return (*skip, seen)
        snap = job.snapshot()
        key = ((snap.id, snap.state, round(snap.fraction, 3), snap.description, round(snap.eta_s or -1),
                round(snap.elapsed_s)) if snap.is_running else (snap.id, snap.state))
        if key == seen:
            return (*skip, seen)
        return (*(running(snap) if snap.is_running else ended(snap)), key)

    seen = gr.State(None)  # what this tab last drew of the latest job
    gr.Timer(POLL_S).tick(refresh, inputs=seen, outputs=[*outputs, seen], api_visibility="private",
                          show_progress="hidden", queue=False)


async def until_ended(job: Job) -> JobSnapshot:
    """The start event's wait: a tab that closes cancels this wait, never the job."""
    while not job.finished.is_set():
        await asyncio.sleep(POLL_S)
    return job.snapshot()
