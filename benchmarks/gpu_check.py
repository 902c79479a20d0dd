"""The GPU recipe checked on one GPU in one call of at most 9 minutes, everything written to one results folder.

    python benchmarks/gpu_check.py --results_dir gpu-check           # one H100 or H200: about 8 minutes
    python benchmarks/gpu_check.py --results_dir gpu-check --quick   # every step on a CPU, one sampling seed

Steps, each one a benchmark's own code: (1) `quality.py --recipe gpu` renders the built-in data, trains an evaluator
on it, trains the GPU recipe with the training script (timed) and scores test.json, new_test.json, the held-out sets
and unseen triples with 3 sampling seeds, while the GPU's memory in use is polled; (2) the training script's images/s,
read from that run's own log, against `throughput.py`'s bare loop on the same model, batch and precision; (3) with
time left, a short fp16 run of the recipe (Accelerate's loss scaling), to show that precision trains. `summary.json`
and `summary.md` hold the numbers with the GPU, the versions and the date. The run's checkpoints are deleted at the
end (the final pipeline stays), so that the folder is small enough to copy back.
"""

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import accelerate
import diffusers
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import one_process_training_command  # noqa: E402
from quality import LABEL_FILES  # noqa: E402
from throughput import bare_loop, in_own_process, logged_images_per_second  # noqa: E402

from cond_ddpm import cli  # noqa: E402
from cond_ddpm.atomic_io import atomic_write_text  # noqa: E402
from train_conditional_ddpm import parse_args  # noqa: E402

QUALITY = Path(__file__).resolve().parent / "quality.py"
FP16_STEPS = 100
FP16_MINUTES = 1.5  # what the fp16 run needs: start-up, data, its steps


class GpuMemoryPoller:
    """The most GPU memory in use (MiB, every process) that `nvidia-smi` reported while the `with` block ran."""

    def __init__(self):
        self.peak_mib, self.stop = None, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self):
        while not self.stop.wait(0.5):
            query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            used = subprocess.run(query, capture_output=True, text=True).stdout.split()
            if used:
                self.peak_mib = max(self.peak_mib or 0, max(map(int, used)))

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


def training_settings(flags) -> argparse.Namespace:
    """The training script's settings for the flags the quality run trained with."""
    with tempfile.TemporaryDirectory() as unused:
        return parse_args([*flags, "--output_dir", unused, "--overwrite_output_dir"])


def fp16_run(flags, output_dir) -> dict:
    """A few steps of the recipe in fp16: do they run, with a finite loss, and how fast."""
    start = time.perf_counter()
    result = subprocess.run(
        one_process_training_command(
            *flags,
            *("--mixed_precision", "fp16", "--max_train_steps", FP16_STEPS, "--logging_steps", 10),
            *("--checkpointing_steps", 10 * FP16_STEPS, "--save_images_epochs", 100000),
            *("--num_validation_images", 1, "--output_dir", output_dir, "--overwrite_output_dir"),
        ),
        capture_output=True,
        text=True,
    )
    record = {"steps": FP16_STEPS, "exit_code": result.returncode, "minutes": (time.perf_counter() - start) / 60}
    if result.returncode == 0:
        record["images_per_second"] = logged_images_per_second(output_dir)
    else:
        record["error"] = result.stderr.strip().splitlines()[-1:]
    shutil.rmtree(output_dir, ignore_errors=True)  # only its speed and success are kept
    return record


def versions() -> dict:
    on_gpu = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda if on_gpu else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def markdown(summary: dict) -> str:
    scores, speed = summary["scores"], summary["throughput"]
    seeds = "one sampling seed" if summary["seeds"] == 1 else f"the mean of {summary['seeds']} sampling seeds"
    lines = [
        f"GPU check of the `gpu` recipe, {summary['versions']['date']}, {summary['versions']['device']}"
        f" (torch {summary['versions']['torch']}, CUDA {summary['versions']['cuda']},"
        f" diffusers {summary['versions']['diffusers']}, accelerate {summary['versions']['accelerate']})",
        "",
        "| " + " | ".join(LABEL_FILES) + " |",
        "|" + "---|" * len(LABEL_FILES),
        "| " + " | ".join(f"{scores[split]:.3f}" for split in LABEL_FILES) + " |",
        "",
        f"Accuracy: {seeds} ({summary['sampler']}); evaluator held-out accuracy"
        f" {summary['evaluator_held_out_accuracy']}. Training: {summary['training_minutes']:.1f} minutes"
        f" (start-up included) for {summary['settings']['max_train_steps']} steps of"
        f" {summary['settings']['train_batch_size']} ({summary['settings']['mixed_precision']}).",
        f"images/s: training script {speed['script']:.0f}, bare loop {speed['bare']:.0f} (same model, batch and"
        f" precision): overhead {100 * speed['overhead']:.1f}%. Peak memory: bare loop"
        f" {speed['bare_peak_memory_mb']:.0f} MB; GPU memory in use during the check"
        f" {summary['peak_gpu_memory_mib']} MiB (nvidia-smi).",
        f"fp16: {json.dumps(summary['fp16'])}. The whole check: {summary['check_minutes']:.1f} minutes.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--results_dir", required=True, help="a new (or empty) folder for everything the check writes")
    parser.add_argument("--quick", action="store_true", help="quality.py --quick: the tiny preset, on a CPU too")
    parser.add_argument(
        "--minutes",
        type=cli.positive_float,
        default=9.0,
        help="the call's limit: the fp16 run is skipped if it would pass it",
    )
    args = parser.parse_args()
    results_dir = Path(args.results_dir)
    if results_dir.exists() and any(results_dir.iterdir()):
        parser.error(f"--results_dir {results_dir} is not empty; choose a new folder (nothing in it is replaced)")
    if not (torch.cuda.is_available() or args.quick):
        parser.error("the GPU check needs a CUDA GPU; on a CPU, --quick runs every step of it at the tiny size")
    start = time.perf_counter()

    with GpuMemoryPoller() as memory:
        quality = [sys.executable, QUALITY, "--recipe", "gpu", "--output_dir", results_dir]
        quick = ["--quick", "--num_seeds", "1"]  # every step once: on a CPU, 3 seeds of 5 label files take long
        subprocess.run([*map(str, quality), *(quick if args.quick else ["--num_seeds", "3"])], check=True)
    result = json.loads(next(results_dir.glob("results-*.json")).read_text())
    settings = training_settings(result["flags"])

    bare = in_own_process(
        bare_loop,
        settings.preset,
        settings.resolution,
        settings.train_batch_size,
        *((30, 5) if torch.cuda.is_available() else (5, 2)),  # timed steps, warm-up steps
        settings.mixed_precision == "bf16",
        True,  # channels_last, as the training script
        False,  # eager, as the training script without --compile
    )
    script = logged_images_per_second(results_dir / "pipeline")

    minutes_left = args.minutes - (time.perf_counter() - start) / 60
    if not torch.cuda.is_available():
        fp16 = {"skipped": "fp16 needs a GPU; the training script refuses it on a CPU"}
    elif minutes_left < FP16_MINUTES:
        fp16 = {"skipped": f"{minutes_left:.1f} minutes were left of {args.minutes:g}"}
    else:
        fp16 = fp16_run(result["flags"], results_dir / "fp16")
    for checkpoint in (results_dir / "pipeline").glob("checkpoint-*"):
        shutil.rmtree(checkpoint)

    summary = {
        "versions": versions(),
        "settings": {
            key: getattr(settings, key)
            for key in ("preset", "resolution", "train_batch_size", "max_train_steps", "learning_rate")
        }
        | {"mixed_precision": settings.mixed_precision},
        "scores": {split: result[split] for split in LABEL_FILES},
        "per_seed": result["per_seed"],
        "rendered_references": result["rendered_references"],
        "seeds": result["seeds"],
        "sampler": result["sampler"],
        "evaluator_held_out_accuracy": result["evaluator_held_out_accuracy"],
        "training_minutes": result["training_minutes"],
        "throughput": {
            "script": script,
            "bare": bare["images_per_second"],
            "overhead": 1 - script / bare["images_per_second"],
            "bare_peak_memory_mb": bare["peak_memory_mb"],
        },
        "peak_gpu_memory_mib": memory.peak_mib,
        "fp16": fp16,
        "check_minutes": (time.perf_counter() - start) / 60,
    }
    atomic_write_text(results_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(results_dir / "summary.md", markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
