"""studio.jobs.WorkEta: the quantization ETA comes from completed work units and never grows within a unit."""

from __future__ import annotations

from studio.jobs import WorkEta


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_from_completed_units_counts_down_and_never_grows_within_a_unit():
    clock = Clock()
    eta = WorkEta(clock)
    eta.update(0, 4)  # the stage starts
    clock.now += 5
    assert eta.seconds_left() is None  # nothing finished yet: no estimate
    eta.update(0, 4)  # a sub-step of layer 1: still no unit done
    clock.now += 5
    eta.update(1, 4)  # layer 1 took 10 s -> 3 layers left, 30 s
    assert eta.seconds_left() == 30
    readings = []
    for _ in range(30):  # layer 2 runs slow (30 s): the estimate counts down to the floor, never up
        clock.now += 1
        eta.update(1, 4)
        readings.append(eta.seconds_left())
    assert readings == sorted(readings, reverse=True)
    assert readings[0] == 29 and readings[-1] == 20  # floor: the two layers after the current one
    eta.update(2, 4)  # two layers in 40 s: 20 s each, two left
    assert eta.seconds_left() == 40
    clock.now += 3
    eta.update(4, 4)
    assert eta.seconds_left() == 0
