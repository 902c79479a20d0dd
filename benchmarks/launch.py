"""The training script run the way users run it: `accelerate launch`, one process, fp32, eager."""

import os
import sys
from pathlib import Path

TRAINING_SCRIPT = Path(__file__).resolve().parents[1] / "train_conditional_ddpm.py"


def one_process_training_command(*flags) -> list[str]:
    # `accelerate launch` gives a single CPU process one thread unless told otherwise.
    cores = len(os.sched_getaffinity(0))
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--num_cpu_threads_per_process",
        str(cores),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(TRAINING_SCRIPT),
        *map(str, flags),
    ]
