"""Launch guards for training on several processes: refuse processes that would train unsynchronised, and say when a
multi-process launch came up as something else than asked.

`accelerate launch` falls back silently in a few cases (documented in docs/distributed.md): `--cpu` (or `use_cpu: true`)
starts one process whatever `--num_processes` says; an FSDP config on a machine without GPUs starts processes that
join one process group but each train alone (with the script's `use_cpu=False`) or run plain DDP (with `use_cpu=True`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

CPU_PROCESSES_FIX = (
    "For several CPU processes launch the DDP config with the script on the CPU: `accelerate launch --config_file "
    "examples/accelerate/ddp.yaml train.py --use_cpu true` (see docs/distributed.md)."
)


def process_group_size() -> int:
    """The size of the initialized default `torch.distributed` process group, or 1 when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def check_launch(num_processes: int, distributed_type: str, environ: Mapping[str, str] | None = None) -> None:
    """Checks how the training processes came up against how they were launched.

    Args:
        num_processes: the number of processes the trainer's accelerator trains with.
        distributed_type: the accelerator's distributed type (`"NO"`, `"MULTI_CPU"`, `"FSDP"`, `"DEEPSPEED"`, ...).
        environ: the environment `accelerate launch` set (default: `os.environ`).

    Raises:
        RuntimeError: when a process group of several processes exists but the trainer is not distributed, so every
            process would train its own copy on its own batches and the copies would drift apart.
    """
    environ = os.environ if environ is None else environ
    group = process_group_size()
    if group > 1 and num_processes == 1:
        raise RuntimeError(
            f"{group} processes share a torch.distributed process group, but the trainer is not distributed (its "
            "accelerator trains with 1 process): every process would train alone on its own batches and the copies "
            "would drift apart. This happens when an FSDP config is launched on a machine without GPUs (accelerate "
            f"runs FSDP on GPUs only). {CPU_PROCESSES_FIX}"
        )
    if num_processes == 1 and launched_several_as_one(environ):
        logger.warning(
            "`accelerate launch` may have been asked for several processes but started one: with `--cpu` or "
            "`use_cpu: true` in the config it runs a single CPU process whatever `--num_processes` says. "
            f"{CPU_PROCESSES_FIX} (This is read from MASTER_ADDR, which a cluster scheduler such as SLURM or "
            "Kubernetes may export itself: if you asked for one process, ignore this warning.)"
        )
    if num_processes > 1 and _is_true(environ.get("ACCELERATE_USE_FSDP")) and distributed_type != "FSDP":
        logger.warning(
            f"The launch config asks for FSDP, but accelerate trains with {distributed_type} (FSDP runs on GPUs "
            "only): every process holds the whole model and optimizer state."
        )


def launched_several_as_one(environ: Mapping[str, str]) -> bool:
    """Whether `accelerate launch` started one CPU process for a multi-process launch: its single-process launcher
    sets `ACCELERATE_USE_CPU` and, only for `--num_processes` above 1, a rendezvous address, but no `WORLD_SIZE`.

    A guess: a `MASTER_ADDR` the environment already had (SLURM and Kubernetes jobs often export one) looks the same,
    so the warning says "may have"."""
    return _is_true(environ.get("ACCELERATE_USE_CPU")) and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ


def _is_true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")
