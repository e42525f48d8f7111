"""The server-side memory recorder (studio/memory_history.py): readings keep coming with no page open."""

from __future__ import annotations

import time

import pytest

from studio.memory_history import MemoryRecorder


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_records_without_a_page_and_stops():
    from ui.memory_panel import take_reading
    from ui.state import StudioState

    state = StudioState()
    recorder = MemoryRecorder(lambda: take_reading(state), every_s=0.05).start()
    try:
        wait_for(lambda: len(state.memory_history) >= 2)  # readings 0.9 s apart at least (take_reading's cache)
        times = [r["time"] for r in state.memory_history]
        assert times == sorted(times) and "cpu" in state.memory_history[-1]
    finally:
        recorder.stop()
    assert not recorder.running
    count = recorder.samples_taken
    assert count >= 2
    time.sleep(0.2)  # nothing runs after stop (a bounded look, not a wait for a state)
    assert recorder.samples_taken == count


def test_a_failing_reading_does_not_stop_it():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) % 2:
            raise OSError("NVML went away")

    recorder = MemoryRecorder(flaky, every_s=0.01).start()
    try:
        wait_for(lambda: recorder.samples_taken >= 3)
    finally:
        recorder.stop()
    assert recorder.last_error == "OSError: NVML went away"


def test_bad_interval():
    with pytest.raises(ValueError, match="positive"):
        MemoryRecorder(lambda: None, every_s=0)
