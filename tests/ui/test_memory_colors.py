"""The memory panel's colours: every line of the plot (and every bar segment) is told apart at a glance."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from ui.memory_panel import SERIES_COLORS

CSS = (Path(__file__).resolve().parents[2] / "ui" / "style.css").read_text()
MIN_DISTANCE = 80  # Euclidean distance in RGB (0..441): indigo #6366f1 vs #4f46e5 was 38, too close to tell apart


def rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def distance(a: str, b: str) -> float:
    return sum((x - y) ** 2 for x, y in zip(rgb(a), rgb(b))) ** 0.5


def assert_distinct(colors: dict[str, str]) -> None:
    for (na, ca), (nb, cb) in itertools.combinations(colors.items(), 2):
        assert distance(ca, cb) >= MIN_DISTANCE, f"{na} {ca} and {nb} {cb} look alike"


def test_plot_series_are_distinguishable():
    assert_distinct({k: SERIES_COLORS[k] for k in ("process RSS", "KV in use", "weights")})  # CPU box
    two_gpus = [f"GPU {i} {what}" for i in (0, 1) for what in ("used", "this process")]
    assert_distinct({k: SERIES_COLORS[k] for k in (*two_gpus, "KV in use", "weights")})


def test_bar_segments_are_distinguishable_and_match_the_plot():
    seg = dict(re.findall(r"\.(seg-[a-z-]+) \{ background: (#[0-9a-f]{6});", CSS))
    assert_distinct({k: v for k, v in seg.items() if k != "seg-kv-free"})  # KV free: KV used, faded
    assert seg["seg-weights"] == SERIES_COLORS["weights"] and seg["seg-proc"] == SERIES_COLORS["process RSS"]
    assert seg["seg-kv-used"] == SERIES_COLORS["KV in use"]
