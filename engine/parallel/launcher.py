"""Tensor parallelism on torch.distributed: NCCL on GPUs, gloo on CPU.

Design: the main process (API, UI, scheduler, sampling) is rank 0 with its own ModelRunner; ranks 1..N-1 are
worker processes (`python -m engine.parallel.worker`) that this module starts and supervises. They meet
through torch.distributed's env rendezvous (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, as torchrun sets
them), so nothing here assumes one host beyond picking local GPU `cuda:RANK`. Each step, rank 0 broadcasts the
step's inputs once as two int64 tensors (a fixed header, then ids / positions / slots / kv lengths / block
tables / cu_seqlens / sampled rows; comm.py); every rank runs its shard; the logits are all-gathered and rank 0
samples. Workers own their KV cache (sized from their own free memory; the block count is the minimum over
ranks) and their CUDA graphs, captured in the same order on every rank with the collectives inside.

Failure: a supervisor thread polls the workers and tells the engine (`on_failure`) as soon as one dies, so the
engine stops even while idle. A step is run under `run_step`: anything that raises between the broadcast and the
logits (a collective that fails or times out after ENGINE_TP_TIMEOUT_S, rank 0's header send included) leaves the
ranks out of step, so it becomes a TPWorkerError naming the dead or possibly hung ranks, which stops the engine
(the step's and every queued request end with finish_reason "error" and that message, new ones are refused).
Startup (rendezvous, loading, KV sizing) runs under ENGINE_TP_STARTUP_TIMEOUT_S instead. Workers exit when rank 0
sends stop, when their collective fails, or when their parent process disappears; shutdown waits for them (the
stop itself bounded by the step timeout), then kills what is left, so no process outlives the engine.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from engine import envs
from engine.model_runner import ModelRunner
from engine.parallel import comm
from engine.parallel.shard_loader import load_sharded_model, make_plan

log = logging.getLogger(__name__)

# NVLink multicast / symmetric memory stay off in every rank (see the lent machines' notes)
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class TPWorkerError(RuntimeError):
    is_fatal = True  # the engine stops: a rank is gone, no step can run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensor_parallel(path, spec, config, device: torch.device, dtype: torch.dtype, model_format: str):
    """Rank 0: check the split, start the workers, load this rank's shard, build its runner (KV cache sized
    in step with the others) and collect every rank's memory facts (runner.tp_ranks, for pipe.memory())."""
    make_plan(spec, config.tp, 0, model_format)  # a shape that cannot split fails before anything starts
    group = TPGroup(path, config, device, dtype, model_format)
    try:
        with torch.inference_mode():
            model, local_spec = load_sharded_model(path, spec, dtype, device, model_format, config.tp, 0,
                                                   config.load_format)
            runner = ModelRunner(model, local_spec, config, device, dtype, group)
            facts = comm.gather_ints([runner.weights_bytes, runner.kv_cache_bytes, runner.num_blocks])
        comm.set_step_timeout(envs.tp_timeout_s())
    except Exception as e:
        deadline = time.monotonic() + 5.0
        while not group._dead_ranks() and time.monotonic() < deadline:
            time.sleep(0.05)
        failure = group._dead_ranks()
        group.failure = group.failure or failure or str(e)
        group.shutdown()
        if failure:
            raise TPWorkerError(f"tensor parallel startup failed: {failure}") from e
        raise
    runner.tp_ranks = [{"rank": r, "weights_bytes": w, "kv_cache_bytes": k, "num_kv_blocks": n}
                       for r, (w, k, n) in enumerate(facts)]
    return runner


class TPGroup:
    """Rank 0's side: starts ranks 1..N-1, supervises them, broadcasts steps, stops them."""

    def __init__(self, model_path, config, device: torch.device, dtype: torch.dtype, model_format: str):
        self.tp, self.device = config.tp, device
        os.environ.update(CHILD_ENV)
        env = dict(os.environ)  # the user's MASTER_ADDR / MASTER_PORT if set (torchrun style), else local ones
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
        args = {"model_path": str(model_path), "config": asdict(config), "device": device.type,
                "dtype": str(dtype).replace("torch.", ""), "model_format": model_format, "parent_pid": os.getpid()}
        self.procs: list[subprocess.Popen] = []
        for r in range(1, self.tp):
            child = dict(env, RANK=str(r), WORLD_SIZE=str(self.tp), LOCAL_RANK=str(r),
                         **{envs.TP_ARGS: json.dumps(args)})
            self.procs.append(subprocess.Popen([sys.executable, "-m", "engine.parallel.worker"], env=child))
        self.failure: str | None = None
        self.on_failure = None  # the engine's hook: called once, from the supervisor, when a worker dies
        self._closed = False
        try:
            comm.init_rank(0, self.tp, device, f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}")
        except Exception as e:
            self.shutdown()
            raise TPWorkerError(f"tensor parallel startup failed: {self._dead_ranks() or e}") from e
        self._watch = threading.Thread(target=self._supervise, name="tp-supervisor", daemon=True)
        self._watch.start()

    def _dead_ranks(self) -> str:
        dead = [f"rank {i + 1} (pid {p.pid}) exited with code {p.returncode}"
                for i, p in enumerate(self.procs) if p.poll() is not None]
        return "; ".join(dead)

    def _supervise(self) -> None:
        while not self._closed:
            dead = self._dead_ranks()
            if dead and self.failure is None:
                self.failure = f"tensor parallel worker died: {dead}"
                log.error(self.failure)
                if self.on_failure is not None:
                    self.on_failure(TPWorkerError(self.failure))
            time.sleep(0.2)

    def run_step(self, fn):
        """Run one step's broadcast and forward (fn) on rank 0. Whatever raises there leaves the ranks out of step
        (a worker waits in a collective rank 0 never joins, or the reverse), so it becomes a TPWorkerError naming
        the dead ranks, or else the live ones, one of which hung (a collective timed out)."""
        try:
            return fn()
        except TPWorkerError:
            raise
        except Exception as e:
            deadline = time.monotonic() + 5.0  # a peer's death is seen by the socket before its exit code
            while not self._dead_ranks() and time.monotonic() < deadline:
                time.sleep(0.05)
            alive = ", ".join(f"rank {i + 1} (pid {p.pid})" for i, p in enumerate(self.procs) if p.poll() is None)
            reason = self._dead_ranks() or f"{e} (no rank exited: one of {alive} hung or is unreachable)"
            self.failure = self.failure or f"tensor parallel collective failed: {reason}"
            raise TPWorkerError(self.failure) from e

    def broadcast_step(self, input_ids, positions, meta, sample_rows) -> None:
        if self.failure is None and self._dead_ranks():
            self.failure = f"tensor parallel worker died: {self._dead_ranks()}"
        if self.failure is not None:
            raise TPWorkerError(self.failure)
        comm.broadcast_step(input_ids, positions, meta, sample_rows)

    def check(self) -> None:
        if self.failure is not None:
            raise TPWorkerError(self.failure)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if dist.is_initialized():
            if self.failure is None and not self._dead_ranks():
                try:
                    comm.broadcast_stop()  # bounded: a hung rank that never takes it is killed below
                except Exception as e:  # noqa: BLE001 - tearing down anyway
                    self.failure = f"tensor parallel stop not taken: {e}"
        for p in self.procs:
            try:
                p.wait(timeout=0.1 if self.failure else 10)  # a failed group's survivors may be hung: no grace
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        comm.clear_group()
