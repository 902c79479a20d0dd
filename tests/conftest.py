"""Shared test inputs: the real vocabulary, a few rendered scenes, a tiny untrained pipeline and evaluator."""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Rendered and resized data go to a cache of the test session's own, never the user's (read at import below).
os.environ["COND_DDPM_CACHE"] = tempfile.mkdtemp(prefix="cond-ddpm-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from cond_ddpm.data import read_objects_json, synthesize  # noqa: E402
from cond_ddpm.evaluator import build_evaluator, save_evaluator  # noqa: E402
from pipeline_cond_ddpm import CondDDPMPipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def class_names():
    return read_objects_json()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """Six rendered scenes (18 images) in the real i-CLEVR layout."""
    return synthesize(tmp_path_factory.mktemp("data") / "iclevr", num_scenes=6, seed=0, num_workers=1)


@pytest.fixture
def tiny_pipeline(class_names):
    torch.manual_seed(0)
    pipeline = CondDDPMPipeline.from_preset("tiny", class_names, resolution=16)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory, class_names):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipelines") / "tiny"
    CondDDPMPipeline.from_preset("tiny", class_names, resolution=16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def evaluator_checkpoint(tmp_path_factory, class_names):
    """An untrained evaluator in the official {'model': state_dict} format."""
    torch.manual_seed(0)
    return save_evaluator(build_evaluator(len(class_names)), tmp_path_factory.mktemp("evaluator") / "checkpoint.pth")


def run_python(*args, env=None, cwd=ROOT, timeout=600):
    """Run a Python command line in a fresh process (the way users run the scripts)."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def start_training(args, script="train_conditional_ddpm.py", **popen_options):
    """A training script started in a process of its own, its output (stdout and stderr) to read as it runs."""
    return subprocess.Popen(
        [sys.executable, script, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **popen_options,
    )


def wait_for(process, pattern, timeout=300):
    """Read the process's output until a line matches; return everything read."""
    seen, deadline = [], time.time() + timeout
    for line in process.stdout:
        seen.append(line)
        if re.search(pattern, line) or time.time() > deadline:
            break
    return "".join(seen)


def run_args(output_dir, data_dir, *extra):
    """The flags both training scripts take, for a few seconds of work on the rendered test scenes."""
    return [
        "--train_data_dir",
        str(data_dir / "images"),
        "--train_json",
        str(data_dir / "train.json"),
        "--train_batch_size",
        "4",
        "--dataloader_num_workers",
        "0",
        "--learning_rate",
        "1e-3",
        "--lr_warmup_steps",
        "1",
        "--logging_steps",
        "1",
        "--logger",
        "none",
        "--num_validation_images",
        "4",
        "--save_images_epochs",
        "100",
        "--mixed_precision",
        "no",
        "--output_dir",
        str(output_dir),
        *map(str, extra),
    ]


def training_args(output_dir, data_dir, *extra):
    """Flags for a few seconds of training: the tiny preset at 16x16 on the rendered test scenes."""
    return run_args(
        output_dir, data_dir, "--preset", "tiny", "--resolution", "16", "--ddpm_num_inference_steps", "2", *extra
    )


def load_weights(folder):
    """All tensors of a saved pipeline (or checkpoint) folder, keyed by component and name."""
    from safetensors.torch import load_file

    weights = {}
    for component in ("unet", "label_embedding"):
        for name, tensor in load_file(Path(folder) / component / "diffusion_pytorch_model.safetensors").items():
            weights[f"{component}.{name}"] = tensor
    return weights


def assert_same_weights(a, b, atol=1e-6):
    first, second = load_weights(a), load_weights(b)
    assert first.keys() == second.keys()
    worst = max((first[k] - second[k]).abs().max().item() for k in first)
    assert worst <= atol, f"weights differ by up to {worst}"


class FullDisk(OSError):
    def __init__(self):
        super().__init__(28, "No space left on device")


def train_main(argv):
    """The training script's command line, run in this process: a user error exits with its one line."""
    import train_conditional_ddpm
    from cond_ddpm import cli

    cli.run(train_conditional_ddpm.main, train_conditional_ddpm.parse_args(argv))
