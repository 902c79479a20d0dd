"""Launches and settings that would train silently wrong, refused or warned about before the first step; and the
check at the end that every process holds the same weights."""

import logging
import os

import torch

logger = logging.getLogger(__name__)


def check_launch(accelerator):
    """Refuse a launch whose processes do not know each other: they would train identical copies."""
    launched = [int(os.environ.get(v, "1")) for v in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")]
    if max(launched) > accelerator.num_processes:
        raise ValueError(
            f"{max(launched)} processes were launched but each runs alone"
            f" (Accelerate sees {accelerator.num_processes});"
            " launch with `accelerate launch --multi_gpu --num_processes N` (on CPU: ACCELERATE_USE_CPU=1) or"
            " `accelerate launch --config_file accelerate_config.yaml`"
        )


def check_mixed_precision(accelerator):
    """Refuse fp16 where Accelerate has no loss scaler for it (a CPU): it would quietly train in fp32 instead."""
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        raise ValueError(
            f"--mixed_precision fp16 needs a GPU (its loss scaling runs there) and this run is on the"
            f" {accelerator.device.type}; use --mixed_precision bf16 or no"
        )


def check_cpu_threads(accelerator):
    """Warn when torch uses fewer CPU cores than this process could: `accelerate launch` sets OMP_NUM_THREADS=1
    unless told otherwise, which halves a single-process run on a 2-core machine."""
    if accelerator.device.type != "cpu":
        return
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    cores = max(1, len(os.sched_getaffinity(0)) // local_processes)
    if torch.get_num_threads() < cores:
        logger.warning(
            f"torch uses {torch.get_num_threads()} CPU thread(s) per process and {cores} cores are free for each;"
            f" launch with `accelerate launch --num_cpu_threads_per_process {cores}` (or set OMP_NUM_THREADS={cores})",
        )


def check_replicas_agree(accelerator, model):
    """DDP keeps every process's weights identical; check it once at the end, since diverged replicas fail silently."""
    fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = accelerator.gather(fingerprint[None])
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise ValueError("the processes finished with different weights: the distributed launch is broken")
    logger.info(f"the weights are identical on all {accelerator.num_processes} processes")
