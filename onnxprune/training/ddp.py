"""Data-parallel retraining with PyTorch DDP.

Under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --nproc_per_node 2 -m onnxprune.training.ddp MODEL -o OUT --data SPEC [finetune flags]

(the same flags as ``onnxprune finetune``; ``torchrun ... -m onnxprune finetune ...`` works too).
Every process builds the same module from the same file and seed, takes its shard of every epoch
through ``DistributedSampler`` (``batch_size`` stays the global batch: each of ``W`` processes
takes ``batch_size / W``), DDP averages the gradients, so all ranks hold identical weights after
every step. Validation runs on every rank over the whole split (so all take the same
best-checkpoint decision); only rank 0 writes files and prints. Backend: ``gloo`` on CPU,
``nccl`` when training on CUDA (``--device cuda``; each rank uses GPU ``LOCAL_RANK``).

:func:`launch_local` runs the same thing without torchrun (``torch.multiprocessing.spawn``), as the
tests do on CPU with gloo.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Mapping

from .loop import DistContext
import numpy as np
from onnx import numpy_helper
from .config import TrainConfig
from .retrain import finetune
from ..core.model_io import save_model
import json
from ..cli import main as cli_main


def init_from_env(device: str = "cpu") -> DistContext:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    import torch  # lazy: torch ([train] extra)
    import torch.distributed as dist  # lazy: torch ([train] extra)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        cuda = device in ("cuda", "auto") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext.current()


def shutdown() -> None:
    import torch.distributed as dist  # lazy: torch ([train] extra)

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_path: str, data: Any, config: Mapping[str, Any],
            out_dir: str, teacher_path: str | None, threads: int) -> None:
    import torch  # lazy: torch ([train] extra)
    import torch.distributed as dist  # lazy: torch ([train] extra)


    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    try:
        model, history = finetune(model_path, data, TrainConfig.from_dict(config), teacher=teacher_path,
                                  progress=False)
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        np.savez(Path(out_dir) / f"rank{rank}.npz", **{f"w{i}": w for i, w in enumerate(weights.values())})
        if rank == 0:
            save_model(model, Path(out_dir) / "model.onnx")
            (Path(out_dir) / "history.json").write_text(json.dumps(history, default=str))
    finally:
        shutdown()


def launch_local(model_path: "str | os.PathLike", data: Any, config: Mapping[str, Any], out_dir: "str | os.PathLike",
                 *, nprocs: int = 2, teacher_path: "str | os.PathLike | None" = None, threads: int = 1) -> Path:
    """Run ``finetune`` data-parallel in ``nprocs`` local CPU processes (gloo).

    Writes ``model.onnx`` and ``history.json`` (rank 0) and ``rank{r}.npz`` (every rank's final
    initializers, in graph order) into ``out_dir``; returns ``out_dir``.
    """
    import torch.multiprocessing as mp  # lazy: torch ([train] extra)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(nprocs, _free_port(), str(model_path), data, dict(config), str(out),
                            None if teacher_path is None else str(teacher_path), threads),
             nprocs=nprocs, join=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """``torchrun -m onnxprune.training.ddp ARGS``: the ``finetune`` command, data-parallel."""

    cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    main()
