"""The GPU recipe checked on one GPU in one call of about 6 minutes, everything written to one results folder.

    python benchmarks/gpu_check.py --results_dir gpu-check           # one H100 or H200: about 6 minutes
    python benchmarks/gpu_check.py --results_dir gpu-check --train_minutes 10 --minutes 14   # a longer lease
    python benchmarks/gpu_check.py --results_dir gpu-check --quick   # every step on a CPU, one sampling seed

Steps, each one a benchmark's own code: (1) `quality.py --recipe gpu` renders the built-in data, trains an evaluator
on it, trains the GPU recipe with the training script, stopped by the clock after `--train_minutes` (a checkpoint every
300 steps), scores each checkpoint on the held-out label sets (accuracy against training minutes), then scores the
newest model on test.json, new_test.json, the held-out sets and unseen triples with 3 sampling seeds, while the GPU's
memory in use is polled; (2) the training script's images/s, read from that run's own log, against `throughput.py`'s
bare loop on the same model, batch and precision; (3) with time left, a short fp16 run of the recipe (Accelerate's
loss scaling), to show that precision trains. `summary.json` and `summary.md` hold the numbers with the GPU, the
versions and the date, rewritten after every stage (and `results-*.json` after every label file), so that a check cut
short keeps what it measured. All checkpoints but the newest are deleted at the end, so that the folder stays small.
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
from cond_ddpm.training.checkpoints import find_checkpoints  # noqa: E402
from train_conditional_ddpm import parse_args  # noqa: E402

QUALITY = Path(__file__).resolve().parent / "quality.py"
CHECKPOINT_EVERY = 300  # steps: six points of accuracy against minutes over the recipe's 1800
QUICK_CHECKPOINT_EVERY = 20
QUALITY_FIELDS = ("flags", "scored", "sampler", "seeds", "evaluator_held_out_accuracy", "checkpoints")
QUALITY_FIELDS += ("training_minutes", "stopped_by_clock", "per_seed", "rendered_references")
SETTINGS = ("preset", "resolution", "train_batch_size", "max_train_steps", "learning_rate", "mixed_precision")
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
    """The summary as it stands: the stages not yet run (or that failed) are named, not left out silently."""
    v = summary["versions"]
    lines = [
        f"GPU check of the `gpu` recipe, {v['date']}, {v['device']} (torch {v['torch']}, CUDA {v['cuda']},"
        f" diffusers {v['diffusers']}, accelerate {v['accelerate']}).",
        f"Stages done: {', '.join(summary['done']) or 'none yet'}.",
        "",
    ]
    quality = summary.get("quality")
    if quality and "scores" in quality:
        scores, seeds = quality["scores"], quality["seeds"]
        lines += [
            "| " + " | ".join(scores) + " |",
            "|" + "---|" * len(scores),
            "| " + " | ".join(f"{value:.3f}" for value in scores.values()) + " |",
            "",
            f"Accuracy: {'one sampling seed' if seeds == 1 else f'the mean of {seeds} sampling seeds'}"
            f" ({quality['sampler']}) of {quality['scored']}; evaluator held-out accuracy"
            f" {quality['evaluator_held_out_accuracy']}. Training: {quality['training_minutes']:.1f} minutes"
            f" (start-up included){', stopped by the clock' if quality['stopped_by_clock'] else ''}, batch"
            f" {summary['settings']['train_batch_size']} ({summary['settings']['mixed_precision']}).",
        ]
        for row in quality.get("checkpoints", []):
            held_out = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("held_out"))
            lines.append(f"- checkpoint-{row['step']} after {row['minutes']:.1f} minutes: {held_out}")
    elif quality:
        lines.append(f"Quality run: {json.dumps(quality)}")
    if "overhead" in summary.get("throughput", {}):
        speed = summary["throughput"]
        lines.append(
            f"images/s: training script {speed['script']:.0f}, bare loop {speed['bare']:.0f} (same model, batch and"
            f" precision): overhead {100 * speed['overhead']:.1f}%. Peak memory: bare loop"
            f" {speed['bare_peak_memory_mb']:.0f} MB; GPU memory in use during the check"
            f" {summary['peak_gpu_memory_mib']} MiB (nvidia-smi)."
        )
    elif "throughput" in summary:
        lines.append(f"images/s: {json.dumps(summary['throughput'])}.")
    if "fp16" in summary:
        lines.append(f"fp16: {json.dumps(summary['fp16'])}.")
    lines.append(f"The check so far: {summary['check_minutes']:.1f} minutes.")
    return "\n".join(lines) + "\n"


class Summary:
    """`summary.json` and `summary.md`, rewritten the moment a stage has its result: a check cut short by the
    machine's time limit keeps everything it measured."""

    def __init__(self, results_dir: Path):
        self.results_dir, self.start = results_dir, time.perf_counter()
        self.record = {"versions": versions(), "done": []}
        self.save()

    def stage(self, name: str, **fields):
        self.record.update(fields)
        self.record["done"].append(name)
        self.save()

    def minutes(self) -> float:
        return (time.perf_counter() - self.start) / 60

    def save(self):
        self.record["check_minutes"] = self.minutes()
        atomic_write_text(self.results_dir / "summary.json", json.dumps(self.record, indent=2) + "\n")
        atomic_write_text(self.results_dir / "summary.md", markdown(self.record))


def quality_run(args, results_dir: Path) -> dict:
    """`quality.py --recipe gpu`, its training stopped by the clock and each checkpoint scored on the way."""
    command = [sys.executable, QUALITY, "--recipe", "gpu", "--output_dir", results_dir]
    command += ["--quick", "--num_seeds", "1"] if args.quick else ["--num_seeds", "3"]
    command += ["--max_train_minutes", args.train_minutes, "--score_checkpoints"]
    command += ["--", "--checkpointing_steps", QUICK_CHECKPOINT_EVERY if args.quick else CHECKPOINT_EVERY]
    exit_code = subprocess.run(list(map(str, command))).returncode
    results = sorted(results_dir.glob("results-*.json"))
    if not results:
        return {"exit_code": exit_code, "error": "quality.py wrote no results (its output above says why)"}
    result = json.loads(results[0].read_text())
    record = {key: result.get(key) for key in QUALITY_FIELDS} | {"exit_code": exit_code}
    return record | {"scores": {split: result[split] for split in LABEL_FILES if split in result}}


def main():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--results_dir", required=True, help="a new (or empty) folder for everything the check writes")
    parser.add_argument("--quick", action="store_true", help="quality.py --quick: the tiny preset, on a CPU too")
    parser.add_argument(
        "--train_minutes",
        type=cli.positive_float,
        default=3.0,
        help="training is stopped by the clock after this long (start-up included), so that scoring always runs",
    )
    parser.add_argument(
        "--minutes",
        type=cli.positive_float,
        default=6.5,
        help="the call's limit: the fp16 run is skipped if it would pass it",
    )
    args = parser.parse_args()
    results_dir = Path(args.results_dir)
    if results_dir.exists() and any(results_dir.iterdir()):
        parser.error(f"--results_dir {results_dir} is not empty; choose a new folder (nothing in it is replaced)")
    if not (torch.cuda.is_available() or args.quick):
        parser.error("the GPU check needs a CUDA GPU; on a CPU, --quick runs every step of it at the tiny size")
    results_dir.mkdir(parents=True, exist_ok=True)
    summary = Summary(results_dir)

    with GpuMemoryPoller() as memory:
        quality = quality_run(args, results_dir)
    settings = training_settings(quality.get("flags") or ["--recipe", "gpu"])
    summary.stage(
        "quality",
        quality=quality,
        settings={key: getattr(settings, key) for key in SETTINGS},
        peak_gpu_memory_mib=memory.peak_mib,
    )

    if quality["exit_code"] != 0:
        summary.stage("throughput", throughput={"skipped": "the quality run failed, so there is no training log"})
        sys.exit(
            f"error: quality.py exited with code {quality['exit_code']}; {results_dir / 'summary.md'} has the rest"
        )
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
    try:
        script = logged_images_per_second(results_dir / "pipeline")
    except (KeyError, IndexError, StopIteration):  # a run stopped before two logging intervals logged no speed
        script = None
    throughput = {"bare": bare["images_per_second"], "bare_peak_memory_mb": bare["peak_memory_mb"]}
    if script is None:
        throughput["script"] = "not logged: the run stopped before its third logging interval"
    else:
        throughput |= {"script": script, "overhead": 1 - script / bare["images_per_second"]}
    summary.stage("throughput", throughput=throughput)

    minutes_left = args.minutes - summary.minutes()
    if not torch.cuda.is_available():
        fp16 = {"skipped": "fp16 needs a GPU; the training script refuses it on a CPU"}
    elif minutes_left < FP16_MINUTES:
        fp16 = {"skipped": f"{minutes_left:.1f} minutes were left of {args.minutes:g}"}
    else:
        fp16 = fp16_run(quality["flags"], results_dir / "fp16")
    summary.stage("fp16", fp16=fp16)
    for checkpoint in find_checkpoints(results_dir / "pipeline")[:-1]:  # the newest may be the model
        shutil.rmtree(checkpoint)
    print(markdown(summary.record))


if __name__ == "__main__":
    main()
