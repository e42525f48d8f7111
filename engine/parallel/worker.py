"""A tensor-parallel worker: rank RANK of WORLD_SIZE (env rendezvous, as torchrun sets it), started by
engine.parallel.launcher.TPGroup. Loads its shard, builds its ModelRunner (KV cache, CUDA graphs) in step with rank 0,
then runs every step rank 0 broadcasts until told to stop. Exits when its parent disappears or a collective
fails, so it never outlives the engine."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch

from engine import envs, loader
from engine.config import EngineConfig
from engine.model_runner import ModelRunner
from engine.parallel import comm
from engine.parallel.shard_loader import load_sharded_model


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


@torch.inference_mode()
def main() -> int:
    place = envs.tp_worker_args()
    args, rank, world, local_rank = place["args"], place["rank"], place["world_size"], place["local_rank"]
    threading.Thread(target=_watch_parent, args=(args["parent_pid"],), daemon=True).start()
    device = torch.device(f"cuda:{local_rank}") if args["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = EngineConfig(**args["config"])
    dtype = loader.DTYPES[args["dtype"]]
    path = Path(args["model_path"])
    spec = loader.read_model_spec(path)
    comm.init_rank(rank, world, device)
    model, local_spec = load_sharded_model(path, spec, dtype, device, args["model_format"], world, rank,
                                           config.load_format)
    runner = ModelRunner(model, local_spec, config, device, dtype)
    comm.gather_ints([runner.weights_bytes, runner.kv_cache_bytes, runner.num_blocks])
    comm.set_step_timeout(envs.tp_timeout_s())  # startup is over: a step's collectives are bounded now
    while True:
        step = comm.receive_step(device)
        if step is None:
            break
        input_ids, positions, meta, sample_rows = step
        if not meta.is_prefill and runner.graphs is not None and runner.graphs.can_run(
                meta.block_tables.shape[0], meta.block_tables.shape[1]):
            runner.graphs.run(input_ids, positions, meta)
            continue
        hidden = model(input_ids, positions, meta)
        if sample_rows.numel():
            model.compute_logits(hidden[sample_rows] if meta.is_prefill else hidden)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - the exit code and this line are what rank 0 reports
        print(f"tensor parallel worker rank {os.environ.get('RANK')}: {type(e).__name__}: {e}", file=sys.stderr)
        os._exit(1)
