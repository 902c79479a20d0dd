"""train_conditional_ddpm.py end to end, in real processes: one process, two-process DDP (gloo), checkpoints, resume."""

import os
import shlex
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_same_weights, load_weights, run_python, train_main, training_args
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_conditional_ddpm
from cond_ddpm.grids import LINE_HEIGHT
from cond_ddpm.recipes import RECIPES
from cond_ddpm.training import flags, samples
from pipeline_cond_ddpm import CondDDPMPipeline


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, synthetic_dir):
    """Eight steps in one go, a checkpoint every two steps, at most two kept; mirrored images, so that resuming must
    also restore the flips' random draws."""
    output_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    args = training_args(
        output_dir,
        synthetic_dir,
        "--max_train_steps",
        8,
        "--checkpointing_steps",
        2,
        "--checkpoints_total_limit",
        2,
        "--random_flip",
    )
    result = run_python("train_conditional_ddpm.py", *args, "--logger", "tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, args, result


def test_a_run_saves_a_pipeline_that_loads_and_samples(uninterrupted_run):
    output_dir, _, result = uninterrupted_run
    assert f"Pipeline saved to {output_dir}" in result.stdout
    pipeline = CondDDPMPipeline.from_pretrained(output_dir)
    images = pipeline([["red cube", "blue sphere"]], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    with Image.open(output_dir / "samples" / "latest.png") as grid:  # 4 images, their label sets written under them
        assert grid.size[0] == 4 * 128 and grid.size[1] - 128 in (LINE_HEIGHT, 2 * LINE_HEIGHT, 3 * LINE_HEIGHT)
        width, height = grid.size
    # The model card and TensorBoard show that captioned grid too.
    assert (output_dir / "sample_grid.png").read_bytes() == (output_dir / "samples" / "latest.png").read_bytes()
    logged = EventAccumulator(str(output_dir / "logs" / "cond_ddpm")).Reload().Images("validation")
    assert {(image.width, image.height) for image in logged} == {(width, height)}


def test_the_run_ends_with_a_command_that_samples_from_the_saved_pipeline(uninterrupted_run, tmp_path):
    output_dir, _, result = uninterrupted_run
    command = result.stdout.split("Draw a scene with it (plain diffusers): ")[1].splitlines()[0]
    python, flag, code = shlex.split(command)
    assert (python, flag) == ("python", "-c")
    sampled = run_python("-c", code, cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    with Image.open(tmp_path / "scene.png") as scene:
        assert scene.size == (16, 16)


@pytest.mark.parametrize("recipe", ["gpu", "cpu"])
def test_training_and_from_preset_agree_on_the_prediction_type(recipe, class_names):
    import train_conditional_ddpm

    trained = train_conditional_ddpm.parse_args(["--recipe", recipe]).prediction_type
    assert CondDDPMPipeline.from_preset("tiny", class_names, 16).scheduler.config.prediction_type == trained


def test_checkpoints_total_limit_prunes_the_oldest(uninterrupted_run):
    output_dir, _, _ = uninterrupted_run
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]


def test_the_saved_pipeline_holds_the_ema_weights(uninterrupted_run):
    output_dir, _, _ = uninterrupted_run
    final, raw = load_weights(output_dir), load_weights(output_dir / "checkpoint-8")
    ema = {f"unet.{k}": v for k, v in load_weights_of(output_dir / "checkpoint-8" / "ema" / "unet").items()}
    for name, tensor in ema.items():
        assert torch.equal(final[name], tensor)
    assert any(not torch.equal(final[name], raw[name]) for name in ema)


def load_weights_of(folder):
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_resume_continues_from_the_saved_step_to_the_same_weights(uninterrupted_run, tmp_path):
    """Resumed as diffusers' scripts are, by a checkpoint's name inside --output_dir (found from any directory)."""
    output_dir, args, _ = uninterrupted_run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(output_dir / "checkpoint-6", resumed_dir / "checkpoint-6")
    resumed_args = [str(resumed_dir) if a == str(output_dir) else a for a in args]
    result = run_python("train_conditional_ddpm.py", *resumed_args, "--resume_from_checkpoint", "checkpoint-6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {resumed_dir / 'checkpoint-6'} at step 6" in result.stderr
    assert_same_weights(resumed_dir / "checkpoint-8", output_dir / "checkpoint-8")  # raw weights
    assert_same_weights(resumed_dir, output_dir)  # the saved EMA weights


def test_checkpointing_steps_zero_turns_checkpoints_off(tmp_path, synthetic_dir):
    args = train_conditional_ddpm.parse_args(training_args(tmp_path / "run", synthetic_dir, "--checkpointing_steps", 0))
    assert args.checkpointing_steps == 0


def test_num_epochs_replaces_the_recipes_step_count_and_max_train_steps_wins(tmp_path, synthetic_dir):
    # Every recipe sets a step count, so a run without --num_epochs always knows its length.
    assert all(isinstance(recipe["max_train_steps"], int) for recipe in RECIPES.values())
    assert train_conditional_ddpm.parse_args(["--recipe", "cpu", "--num_epochs", "2"]).max_train_steps is None
    both = train_conditional_ddpm.parse_args(["--num_epochs", "2", "--max_train_steps", "3"])
    assert (both.num_epochs, both.max_train_steps) == (2, 3)
    # 18 images in whole batches of 4: 4 steps an epoch, so two epochs end at step 8.
    output_dir = tmp_path / "run"
    train_main(
        training_args(
            output_dir,
            synthetic_dir,
            "--num_epochs",
            2,
            "--same_colour_repeats",
            1,
            "--checkpointing_steps",
            1,
            "--checkpoints_total_limit",
            1,
        )
    )
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-8"]
    assert (output_dir / "model_index.json").is_file()


def test_an_output_dir_holding_only_a_nested_logging_dir_counts_as_empty(tmp_path, synthetic_dir, capsys):
    (tmp_path / "run" / "tracking" / "tensorboard").mkdir(parents=True)
    args = train_conditional_ddpm.parse_args(
        training_args(tmp_path / "run", synthetic_dir, "--logging_dir", "tracking/tensorboard")
    )
    assert args.logging_dir == "tracking/tensorboard"
    (tmp_path / "run" / "model_index.json").write_text("{}")  # anything else still makes it a used folder
    with pytest.raises(SystemExit):
        train_conditional_ddpm.parse_args(
            training_args(tmp_path / "run", synthetic_dir, "--logging_dir", "tracking/tensorboard")
        )
    assert "is not empty" in capsys.readouterr().err
    for no_folder in ["", "."]:
        with pytest.raises(SystemExit):
            train_conditional_ddpm.parse_args(
                training_args(tmp_path / "other", synthetic_dir, "--logging_dir", no_folder)
            )
        assert f"--logging_dir {no_folder!r} must name a folder" in capsys.readouterr().err


def test_a_missing_checkpoint_is_named(tmp_path, synthetic_dir, capsys):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit):
        train_conditional_ddpm.parse_args(
            training_args(tmp_path / "run", synthetic_dir, "--resume_from_checkpoint", "checkpoint-9")
        )
    assert (
        "--resume_from_checkpoint checkpoint-9 is neither a folder, nor one in --output_dir" in capsys.readouterr().err
    )


def test_wandb_without_wandb_installed_fails_before_training(tmp_path, synthetic_dir, monkeypatch, capsys):
    monkeypatch.setattr(flags, "is_wandb_available", lambda: False)
    with pytest.raises(SystemExit):
        train_conditional_ddpm.parse_args(training_args(tmp_path / "run", synthetic_dir, "--logger", "wandb"))
    assert "error: --logger wandb needs wandb: pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


class FakeTracker:
    def __init__(self, name):
        self.name, self.images = name, []

    def log_images(self, values, step, **options):
        self.images.append((values, step, options))


def test_validation_samples_go_to_every_active_tracker_as_the_captioned_grid(tmp_path, monkeypatch, class_names):
    trackers = [FakeTracker("wandb"), FakeTracker("tensorboard")]
    accelerator = SimpleNamespace(trackers=trackers)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    monkeypatch.setattr(samples, "sample", lambda sampling, pipeline, label_sets, callback: images)
    stop = SimpleNamespace(check_during_sampling=None)
    label_sets = [["red cube"], ["blue sphere", "green cube"], ["gray cube"], ["cyan cylinder"]]
    pipeline = SimpleNamespace(class_names=class_names)
    samples.Validation(None, label_sets, None, tmp_path).draw(accelerator, pipeline, 0, 7, stop)
    with Image.open(tmp_path / "samples" / "latest.png") as grid:
        captioned = np.asarray(grid)
    for tracker in trackers:
        (values, step, _), *more = tracker.images
        assert step == 7 and not more
        assert len(values["validation"]) == 1 and np.array_equal(values["validation"][0], captioned), tracker.name
    assert trackers[1].images[0][2] == {"dataformats": "NHWC"}


def test_two_process_gloo_run_ends_with_identical_weights(tmp_path, synthetic_dir):
    args = training_args(tmp_path / "ddp", synthetic_dir, "--max_train_steps", 3, "--mixed_precision", "bf16")
    result = run_python(
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--mixed_precision",
        "bf16",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "train_conditional_ddpm.py",
        *args,
        env={"ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the weights are identical on all 2 processes" in result.stderr
    assert (
        "8 images, 3 steps of 4 x 2 processes" in result.stderr or "images, 3 steps of 4 x 2 processes" in result.stderr
    )
    CondDDPMPipeline.from_pretrained(tmp_path / "ddp")


def launch_two_machines(args, timeout=600):
    """Two `accelerate launch` commands of the shipped multi-machine config, one per machine rank, as two machines
    would run them, meeting over 127.0.0.1 with gloo, one process each; returns each rank's (exit code, log)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config_multinode.yaml"]
            + ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
            + ["--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
            + ["train_conditional_ddpm.py", *map(str, args)],
            cwd=ROOT,
            env={**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        return [(launch.wait(timeout), launch.communicate()[0]) for launch in launches]
    finally:
        for launch in launches:
            launch.kill()


def test_two_machines_train_one_pipeline_and_resume_from_its_checkpoint(tmp_path, synthetic_dir):
    """The multi-machine launch of the README, both machines on this one: one saved pipeline, the same weights on both
    ranks, and a second two-machine launch that resumes the first one's checkpoint to the same weights."""
    first = tmp_path / "first"
    args = training_args(first, synthetic_dir, "--max_train_steps", 3, "--checkpointing_steps", 2)
    (code_0, log_0), (code_1, log_1) = launch_two_machines(args)
    assert code_0 == 0 and code_1 == 0, log_0[-3000:] + log_1[-3000:]
    assert "images, 3 steps of 4 x 2 processes" in log_0
    assert "the weights are identical on all 2 processes" in log_0
    assert log_0.count("Pipeline saved to") == 1 and "Pipeline saved to" not in log_1
    CondDDPMPipeline.from_pretrained(first)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-2", resumed / "checkpoint-2")
    resumed_args = [str(resumed) if a == str(first) else a for a in args]
    (code_0, log_0), (code_1, log_1) = launch_two_machines([*resumed_args, "--resume_from_checkpoint", "latest"])
    assert code_0 == 0 and code_1 == 0, log_0[-3000:] + log_1[-3000:]
    assert f"resumed from {resumed / 'checkpoint-2'} at step 2" in log_0
    assert "the weights are identical on all 2 processes" in log_0
    assert_same_weights(resumed, first)


def test_training_steps_make_no_host_sync(tmp_path, synthetic_dir):
    """Beyond the logging steps, a step never waits for the device, so more steps add no host sync (run on a CPU,
    counting the operations that would wait on a GPU). The per-step logging of --logging_steps 1 must show up."""

    def host_syncs(steps, logging_steps):
        output_dir = tmp_path / f"{steps}-{logging_steps}"
        # One loader worker: the data transforms then run in a process of their own, uncounted; on a GPU machine
        # their checks read CPU tensors, which waits for nothing.
        args = training_args(
            output_dir,
            synthetic_dir,
            "--max_train_steps",
            steps,
            "--train_batch_size",
            2,
            "--logging_steps",
            logging_steps,
            "--dataloader_num_workers",
            1,
        )
        result = run_python("tests/count_host_syncs.py", *args)
        assert result.returncode == 0, result.stderr[-3000:]
        return int(result.stdout.split("host syncs: ")[1])

    six_steps = host_syncs(6, 100)
    assert six_steps == host_syncs(2, 100)
    assert host_syncs(6, 1) > six_steps
