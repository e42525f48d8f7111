"""Where a step's time goes, at a real shape with random weights: GPU kernels of a batch-1 decode step
(torch.profiler), the graph replay alone vs the whole step, and the engine thread's Python time under
high concurrency (cProfile). Writes text reports to --out.

    python benchmarks/profile_step.py --shape llama2-7b --out prof/
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RequestTimer, make_shape_folder  # noqa: E402
from engine import EngineConfig, pipeline  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--awq", action="store_true")
    parser.add_argument("--quant-policy", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("prof"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = make_shape_folder(args.shape, Path(tempfile.mkdtemp()), 128 if args.awq else None)
    pipe = pipeline(folder, EngineConfig(load_format="dummy", quant_policy=args.quant_policy, max_batch_size=256,
                                         enable_prefix_caching=False))
    eng = pipe.engine
    timer = RequestTimer(eng)
    rng = random.Random(0)
    timer.run([([rng.randrange(3, 30000)], 64)], 1)

    # 1. kernels of decode steps at batch 1 (graph replays show up as their kernels)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timer.run([([rng.randrange(3, 30000)], 32)], 1)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    (args.out / "kernels_bs1.txt").write_text(table)
    print(table[:6000])

    # 2. graph replay alone vs the engine's step
    graphs = eng.runner.graphs
    if graphs is not None:
        g = graphs.graphs[1]
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / 50
        r = timer.run([([rng.randrange(3, 30000)], 129)], 1)
        step_ms = (r["elapsed_s"] * 1e3 - r["ttft_p50_ms"]) / 128
        line = f"batch 1: graph replay {replay_ms:.3f} ms, engine step {step_ms:.3f} ms"
        for bs in (64, 256):
            if bs in graphs.graphs:
                t0 = time.perf_counter()
                for _ in range(20):
                    graphs.graphs[bs].replay()
                torch.cuda.synchronize()
                line += f" | bs {bs} replay {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms"
        print(line)
        (args.out / "replay.txt").write_text(line + "\n")

    # 3. engine thread Python profile under concurrency
    prof_py = cProfile.Profile()
    eng.run_on_engine_thread(prof_py.enable)
    reqs = [([rng.randrange(3, 30000) for _ in range(128)], 128) for _ in range(args.concurrency)]
    r = timer.run(reqs, args.concurrency)
    eng.run_on_engine_thread(prof_py.disable)
    s = io.StringIO()
    pstats.Stats(prof_py, stream=s).sort_stats("cumulative").print_stats(45)
    s2 = io.StringIO()
    pstats.Stats(prof_py, stream=s2).sort_stats("tottime").print_stats(30)
    (args.out / "engine_thread.txt").write_text(s.getvalue() + "\n\n" + s2.getvalue())
    print(f"concurrency {args.concurrency}: {r['output_tokens_per_s']:.0f} tok/s, tpot p50 {r['tpot_p50_ms']:.2f} ms")
    print(s2.getvalue()[:5000])
    pipe.close()


if __name__ == "__main__":
    main()
