"""studio/jobs.py: the background job behind Quantize and Compare, with real threads and no sleeps (every wait is
on an event): progress and outcome readable while it runs, one job per slot ("already running"), cancel reaches the
work and its hook, and the latest job stays readable after it ends."""

from __future__ import annotations

import threading

import pytest

from engine.errors import EngineUnavailableError
from studio.jobs import CANCELLED, DONE, FAILED, JobBusyError, JobSlot


def test_progress_outcome_and_one_job_at_a_time():
    slot, reported, release = JobSlot("quantization"), threading.Event(), threading.Event()

    def work(job):
        job.report(0.4, "layer 2 of 5", 30.0, detail={"stage": "quantize"})
        reported.set()
        assert release.wait(60)
        job.report(0.2, "going back is ignored")
        return "the report"

    job = slot.start(work, title="model -> out")
    assert reported.wait(60)
    snap = job.snapshot()
    assert (snap.state, snap.fraction, snap.description, snap.detail, snap.title) == \
        ("running", 0.4, "layer 2 of 5", {"stage": "quantize"}, "model -> out")
    assert 0 <= snap.eta_s <= 30.0 and snap.is_running and slot.running is job
    with pytest.raises(JobBusyError, match="already running") as busy:
        slot.start(work)
    assert isinstance(busy.value, EngineUnavailableError)  # mapped by class like every user-facing error
    release.set()
    assert job.wait(60)
    snap = job.snapshot()
    assert (snap.state, snap.fraction, snap.result, snap.eta_s) == (DONE, 1.0, "the report", 0.0)
    assert slot.latest is job and slot.running is None and not slot.cancel()
    again = slot.start(lambda job: 7)  # a finished job frees the slot
    assert again.wait(60) and again.result == 7 and slot.latest is again and again.id > job.id


def test_cancel_reaches_the_work_and_its_hook_and_failures_are_kept():
    slot, started, hooked = JobSlot("comparison"), threading.Event(), threading.Event()

    def work(job):
        started.set()
        assert job.cancelled.wait(60)
        raise RuntimeError("stopped between steps")

    job = slot.start(work, on_cancel=hooked.set)
    assert started.wait(60) and slot.cancel() and hooked.is_set()
    assert job.wait(60) and job.state == CANCELLED and "stopped" in str(job.snapshot().error)
    failing = slot.start(lambda job: 1 / 0)
    assert failing.wait(60) and failing.state == FAILED and isinstance(failing.error, ZeroDivisionError)
    assert not failing.cancel()  # an ended job cannot be cancelled
