"""cond_ddpm.training.stopping: SIGTERM / SIGINT stop a run at a step boundary with a checkpoint, on one process or
several, and during validation sampling; a resume from it matches an uninterrupted run."""

import os
import re
import signal
import subprocess
import sys

import psutil
import pytest
import torch
from conftest import ROOT, assert_same_weights, run_python, start_training, training_args, wait_for

import train_conditional_ddpm
from cond_ddpm.training.checkpoints import find_checkpoints
from train_conditional_ddpm import parse_args

# --- A stop at a step boundary, and a resume that matches an uninterrupted run ----------------------------------------


def test_sigterm_saves_a_checkpoint_and_resuming_matches_an_uninterrupted_run(tmp_path, synthetic_dir):
    steps = ["--max_train_steps", 40, "--checkpointing_steps", 10]
    straight = run_python("train_conditional_ddpm.py", *training_args(tmp_path / "straight", synthetic_dir, *steps))
    assert straight.returncode == 0, straight.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    process = start_training(training_args(interrupted, synthetic_dir, *steps))
    wait_for(process, r"saved checkpoint .*checkpoint-10")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    stopped_at = int(re.search(r"stop requested: checkpoint-(\d+) saved", output).group(1))
    assert 10 < stopped_at < 40
    assert not (interrupted / "model_index.json").exists()

    resumed = run_python(
        "train_conditional_ddpm.py",
        *training_args(interrupted, synthetic_dir, *steps),
        "--resume_from_checkpoint",
        "latest",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stderr
    assert_same_weights(interrupted / "checkpoint-40", tmp_path / "straight" / "checkpoint-40")
    assert_same_weights(interrupted, tmp_path / "straight")


@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_stops_with_a_checkpoint(tmp_path, synthetic_dir, stop_signal):
    """Ctrl-C, `timeout` and `kill -- -PGID` reach the data loading workers too, not only the training process."""
    args = training_args(tmp_path, synthetic_dir, "--max_train_steps", 4000, "--dataloader_num_workers", 1)
    process = start_training(args, start_new_session=True)
    wait_for(process, r"steps:\s+\d+%.*\| [1-9]\d*/4000")
    os.killpg(process.pid, getattr(signal, stop_signal))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    step = int(re.search(r"stop requested: checkpoint-(\d+) saved", output).group(1))
    assert (tmp_path / f"checkpoint-{step}" / "training_state.json").is_file()


def test_sigterm_stops_a_two_process_run_cleanly(tmp_path, synthetic_dir):
    args = training_args(tmp_path / "ddp", synthetic_dir, "--max_train_steps", 400, "--checkpointing_steps", 1000)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "train_conditional_ddpm.py",
        *args,
    ]
    process = subprocess.Popen(
        launch,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"},
    )
    wait_for(process, r"steps:\s+\d+%.*\| [1-9]\d*/400")
    # Both training processes get the signal (the launcher itself would report its own SIGTERM as a failure).
    workers = [
        p
        for p in psutil.Process(process.pid).children(recursive=True)
        if "train_conditional_ddpm.py" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    step = int(re.search(r"stop requested: checkpoint-(\d+) saved", output).group(1))
    assert (tmp_path / "ddp" / f"checkpoint-{step}" / "training_state.json").is_file()
    assert sorted(p.name for p in (tmp_path / "ddp" / f"checkpoint-{step}").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]


# --- A stop during validation sampling --------------------------------------------------------------------------------


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler, as in a terminal: a shell starts background jobs with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def stop_during_validation(monkeypatch, signals):
    """Send `signals` to this process at the third UNet call of validation sampling; return the count of calls."""
    from diffusers import UNet2DModel

    real_forward, calls = UNet2DModel.forward, []

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # sampling, not training
            calls.append(1)
            if len(calls) == 3:
                for sig in signals:
                    os.kill(os.getpid(), sig)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", forward)
    return calls


# Four steps per epoch (18 images, batches of 4); sampling the first epoch's grid takes 1000 UNet calls.
LONG_VALIDATION = ["--max_train_steps", 8, "--same_colour_repeats", 1, "--save_images_epochs", 1]
LONG_VALIDATION += ["--validation_scheduler", "ddpm"]
LONG_VALIDATION += ["--ddpm_num_inference_steps", 1000, "--checkpointing_steps", 1000]


@pytest.mark.usefixtures("python_sigint")
def test_a_stop_during_validation_sampling_ends_it_and_saves_a_checkpoint(tmp_path, synthetic_dir, monkeypatch):
    calls = stop_during_validation(monkeypatch, [signal.SIGINT])
    assert (
        train_conditional_ddpm.main(parse_args(training_args(tmp_path / "run", synthetic_dir, *LONG_VALIDATION)))
        is None
    )
    assert len(calls) == 3, "sampling went on after the stop request"
    assert [p.name for p in find_checkpoints(tmp_path / "run")] == ["checkpoint-5"]
    assert not (tmp_path / "run" / "model_index.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("python_sigint")
def test_a_second_signal_stops_at_once(tmp_path, synthetic_dir, monkeypatch):
    calls = stop_during_validation(monkeypatch, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        train_conditional_ddpm.main(parse_args(training_args(tmp_path / "run", synthetic_dir, *LONG_VALIDATION)))
    assert len(calls) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
