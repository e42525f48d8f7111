"""Background jobs: the one type behind the Quantize and Compare runs (progress, ETA, cancel, "already running").

A job runs its work in a thread of the server process, not in a browser tab's event: it outlives the tab on
purpose (users reach the box through SSH tunnels that drop). A JobSlot holds one kind of job: at most one runs at a
time (a second start raises JobBusyError), and the latest one stays readable after it ends, so any tab opened later
(a reload, a new login) shows the running job's progress and ETA, can cancel it, and shows the last finished job's
outcome. Every field is safe to read from any thread; `snapshot()` gives a consistent copy.

    slot = JobSlot("quantization")
    job = slot.start(lambda job: work(job), on_cancel=runner.cancel)   # work calls job.report(...), reads job.cancelled
    slot.latest.snapshot().fraction, ....eta_s, ....state   # running | cancelling | done | failed | cancelled
    slot.latest.cancel()
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import EngineUnavailableError

RUNNING, CANCELLING, DONE, FAILED, CANCELLED = "running", "cancelling", "done", "failed", "cancelled"
_ids = itertools.count(1)


class WorkEta:
    """Time left, estimated from completed work units only (layers for a quantization, settings for a comparison):
    the mean time of the units finished so far times the units left, counting down between completions. Within a
    unit it never grows; it floors at the time the units after the current one need. None until one unit is done."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started: float | None = None
        self.first_done = 0
        self.done = 0
        self.total = 1
        self.last_done_at: float | None = None

    def update(self, done: int, total: int) -> None:
        now = self.clock()
        if self.started is None:
            self.started, self.first_done, self.done = now, done, done
        if done > self.done:
            self.done, self.last_done_at = done, now
        self.total = max(total, 1)

    def per_unit(self) -> float | None:
        units = self.done - self.first_done
        if units <= 0 or self.last_done_at is None:
            return None
        return (self.last_done_at - self.started) / units

    def seconds_left(self) -> float | None:
        per_unit = self.per_unit()
        if per_unit is None:
            return None
        left = self.total - self.done
        if left <= 0:
            return 0.0
        since = self.clock() - self.last_done_at
        return max(per_unit * (left - 1), per_unit * left - since)


class JobBusyError(EngineUnavailableError):
    """A job of this kind is already running (maybe started from another browser tab)."""


@dataclass(frozen=True)
class JobSnapshot:
    id: int
    kind: str
    title: str
    state: str  # RUNNING, CANCELLING, DONE, FAILED or CANCELLED
    fraction: float  # 0..1 of the whole job
    description: str  # what it is doing now, in words
    eta_s: float | None  # seconds left (an estimate), None while unknown
    elapsed_s: float
    detail: Any  # whatever the work reported beside the fraction (per-setting stages, the stage name ...)
    result: Any
    error: BaseException | None

    @property
    def is_running(self) -> bool:
        return self.state in (RUNNING, CANCELLING)


class Job:
    """One background task. `work(job)` runs in a daemon thread; it reports with `job.report(...)` and stops early
    when `job.cancelled` is set (on_cancel, if given, is called by cancel() too, e.g. to kill a child process)."""

    def __init__(self, kind: str, work: Callable[[Job], Any], on_cancel: Callable[[], None] | None = None,
                 title: str = "", clock: Callable[[], float] = time.monotonic):
        self.id, self.kind, self._work, self._on_cancel, self._clock = next(_ids), kind, work, on_cancel, clock
        self.title = title  # what it works on, in words (e.g. "model -> output folder"), for any tab that shows it
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.started = clock()
        self._ended: float | None = None
        self._lock = threading.Lock()
        self._fraction, self._description, self._eta_s, self._detail = 0.0, "starting", None, None
        self._eta_at: float | None = None  # when eta_s was reported: the ETA counts down between reports
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"job-{kind}-{self.id}", daemon=True)

    def start(self) -> Job:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.result = self._work(self)
        except BaseException as e:  # noqa: BLE001 - kept as the job's outcome, shown by whoever looks
            self.error = e
        finally:
            with self._lock:
                self._ended = self._clock()
                if self.error is None and not self.cancelled.is_set():
                    self._fraction, self._eta_s = 1.0, 0.0
            self.finished.set()

    def report(self, fraction: float | None = None, description: str | None = None, eta_s: float | None = None,
               detail: Any = None) -> None:
        """Progress from the work: the fraction done (never goes back), what it is doing, the time left."""
        with self._lock:
            if fraction is not None:
                self._fraction = max(self._fraction, min(1.0, max(0.0, float(fraction))))
            if description is not None:
                self._description = description
            self._eta_s, self._eta_at = eta_s, self._clock()
            if detail is not None:
                self._detail = detail

    def cancel(self) -> bool:
        """Ask the job to stop; False when it had already ended."""
        if self.finished.is_set():
            return False
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    @property
    def state(self) -> str:
        if not self.finished.is_set():
            return CANCELLING if self.cancelled.is_set() else RUNNING
        if self.cancelled.is_set():
            return CANCELLED
        return FAILED if self.error is not None else DONE

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            now = self._clock()
            eta = self._eta_s
            if eta is not None and self._eta_at is not None and self._ended is None:
                eta = max(0.0, eta - (now - self._eta_at))
            return JobSnapshot(self.id, self.kind, self.title, self.state, self._fraction, self._description, eta,
                               (self._ended or now) - self.started, self._detail, self.result, self.error)


class JobSlot:
    """One kind of job: one running at a time, the latest kept after it ends."""

    def __init__(self, kind: str):
        self.kind = kind
        self.latest: Job | None = None
        self._lock = threading.Lock()

    def start(self, work: Callable[[Job], Any], on_cancel: Callable[[], None] | None = None, title: str = "") -> Job:
        with self._lock:
            if self.latest is not None and not self.latest.finished.is_set():
                since = self.latest.snapshot().elapsed_s
                raise JobBusyError(f"a {self.kind} is already running (started {since:.0f} s ago, maybe from another "
                                   "browser tab): watch it here, or cancel it first")
            self.latest = Job(self.kind, work, on_cancel, title).start()
            return self.latest

    @property
    def running(self) -> Job | None:
        job = self.latest
        return job if job is not None and not job.finished.is_set() else None

    def cancel(self) -> bool:
        job = self.running
        return job.cancel() if job is not None else False
