"""Tensor parallelism (`--tp N`) on torch.distributed: NCCL on GPUs, gloo on CPU.

comm.py is the leaf the model code imports (collectives that are no-ops at tp = 1, the per-step broadcast, the
process-group setup); shard_loader.py loads one rank's slice of a checkpoint; launcher.py is rank 0's side (starts,
supervises and stops the worker processes) and worker.py the other ranks' loop. This file imports nothing, so
`from engine.parallel import comm` stays a leaf import.
"""
