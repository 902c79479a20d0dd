"""Training survives faults, inputs are checked at the boundary, and nothing already written is lost."""

import errno
import fcntl
import importlib
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from accelerate import PartialState
from conftest import ROOT, assert_same_weights, run_python, training_args

import evaluate_iclevr
import train_conditional_ddpm
from cond_ddpm import cli
from cond_ddpm import data as iclevr_data
from cond_ddpm.atomic_io import staged_contents, staged_directory
from train_conditional_ddpm import check_finite, find_checkpoints, parse_args, save_checkpoint

# --- Pre-emption and exact resume ------------------------------------------------------------------------------------


def start_training(args, **popen_options):
    return subprocess.Popen(
        [sys.executable, "train_conditional_ddpm.py", *args],
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


# --- Atomic writes ---------------------------------------------------------------------------------------------------


class FullDisk(OSError):
    def __init__(self):
        super().__init__(28, "No space left on device")


class TinyAccelerator:
    """Stands in for Accelerate's saving: writes part of a checkpoint, or all of it."""

    is_main_process = True

    def __init__(self, fail):
        self.fail = fail
        PartialState()  # Accelerate's logger, which the saving code uses, needs a process state

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        if self.fail:
            raise FullDisk()


def test_a_failed_checkpoint_save_leaves_the_previous_one_whole(tmp_path):
    state = {"preset": "tiny"}
    save_checkpoint(TinyAccelerator(fail=False), tmp_path, 5, state, total_limit=None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-5").iterdir()}
    with pytest.raises(OSError, match=f"the disk of {tmp_path} is full: checkpoint-10 needs about"):
        save_checkpoint(TinyAccelerator(fail=True), tmp_path, 10, state, total_limit=1)
    assert not (tmp_path / "checkpoint-10").exists()
    assert not (tmp_path / ".incomplete-checkpoint-10").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-5").iterdir()} == before
    assert [p.name for p in find_checkpoints(tmp_path)] == ["checkpoint-5"]


def test_latest_skips_incomplete_checkpoints_with_a_warning(tmp_path, caplog):
    save_checkpoint(TinyAccelerator(fail=False), tmp_path, 5, {}, total_limit=None)
    (tmp_path / ".incomplete-checkpoint-9").mkdir()  # a save killed midway
    (tmp_path / "checkpoint-12").mkdir()  # copied by hand, without its training_state.json
    with caplog.at_level("WARNING"):
        assert [p.name for p in find_checkpoints(tmp_path)] == ["checkpoint-5"]
    assert "incomplete-checkpoint-9: an interrupted save left it incomplete" in caplog.text
    assert "checkpoint-12: it has no training_state.json" in caplog.text


def test_a_failed_pipeline_save_keeps_the_old_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text("old index")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "weights").write_text("old weights")
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(FullDisk):
        with staged_contents(tmp_path, marker="model_index.json") as staging:
            (staging / "unet").mkdir()
            (staging / "unet" / "weights").write_text("new weights")
            raise FullDisk()
    assert (tmp_path / "model_index.json").read_text() == "old index"
    assert (tmp_path / "unet" / "weights").read_text() == "old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "model_index.json", "unet"]
    with staged_contents(tmp_path, marker="model_index.json") as staging:
        (staging / "unet").mkdir()
        (staging / "unet" / "weights").write_text("new weights")
        (staging / "model_index.json").write_text("new index")
    assert (tmp_path / "unet" / "weights").read_text() == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "model_index.json", "unet"]


def test_a_failed_directory_write_keeps_the_old_directory(tmp_path):
    final = tmp_path / "best"
    final.mkdir()
    (final / "a").write_text("old")
    with pytest.raises(FullDisk):
        with staged_directory(final, overwrite=True) as staging:
            (staging / "a").write_text("new")
            raise FullDisk()
    assert (final / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["best"]


# --- Guards ----------------------------------------------------------------------------------------------------------


def test_a_diverging_loss_stops_the_run_with_a_clear_message(tmp_path, synthetic_dir, monkeypatch):
    real_loss = train_conditional_ddpm.diffusion_loss

    def diverging_loss(args, denoiser, noise_scheduler, batch):  # finite for 3 steps, as a run that blows up later
        loss = real_loss(args, denoiser, noise_scheduler, batch)
        diverging_loss.steps += 1
        return loss if diverging_loss.steps <= 3 else loss * float("nan")

    diverging_loss.steps = 0
    monkeypatch.setattr(train_conditional_ddpm, "diffusion_loss", diverging_loss)
    args = training_args(tmp_path / "nan", synthetic_dir, "--max_train_steps", 20, "--checkpointing_steps", 2)
    with pytest.raises(SystemExit) as stopped:
        train_main(args)
    assert re.fullmatch(
        rf"error: the training loss became nan by step \d+; the last good checkpoint is"
        rf" {tmp_path / 'nan' / 'checkpoint-2'}\. .*",
        str(stopped.value.code),
    ), stopped.value.code
    assert not (tmp_path / "nan" / "model_index.json").exists()


def test_the_last_good_checkpoint_is_one_a_finite_loss_has_vouched_for(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(TinyAccelerator(fail=False), tmp_path, step, {}, total_limit=None)
    # The loss was last seen finite at step 6; the weights of checkpoint-6 were never used by a finite loss.
    with pytest.raises(FloatingPointError, match=r"the last good checkpoint is .*checkpoint-4\."):
        check_finite(float("nan"), step=8, output_dir=tmp_path, verified_step=6)
    with pytest.raises(FloatingPointError, match="none was saved yet"):
        check_finite(float("inf"), step=2, output_dir=tmp_path, verified_step=1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, synthetic_dir):
    output_dir = tmp_path_factory.mktemp("runs") / "guard"
    result = run_python(
        "train_conditional_ddpm.py",
        *training_args(output_dir, synthetic_dir, "--max_train_steps", 2, "--checkpointing_steps", 2),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.mark.parametrize(
    "change, message",
    [
        (["--resolution", "32"], "trained with resolution = 16, and this run asks for 32"),
        (["--preset", "cpu"], "trained with preset = 'tiny', and this run asks for 'cpu'"),
        (
            ["--prediction_type", "epsilon"],
            "trained with prediction_type = 'v_prediction', and this run asks for 'epsilon'",
        ),
        (
            ["--objects_json", "SHORT_VOCABULARY"],
            "trained with class_names = 24 objects, and this run asks for 23 objects",
        ),
    ],
    ids=["resolution", "preset", "prediction-type", "vocabulary"],
)
def test_resuming_with_other_model_settings_is_refused(tiny_checkpoint, synthetic_dir, tmp_path, change, message):
    if "SHORT_VOCABULARY" in change:
        objects = json.loads(iclevr_data.OBJECTS_JSON.read_text())
        objects.pop("yellow cylinder")
        (tmp_path / "objects.json").write_text(json.dumps(objects))
        (tmp_path / "train.json").write_text(
            json.dumps(
                {
                    k: v
                    for k, v in json.loads((synthetic_dir / "train.json").read_text()).items()
                    if "yellow cylinder" not in v
                }
            )
        )
        change = ["--objects_json", str(tmp_path / "objects.json"), "--train_json", str(tmp_path / "train.json")]
    args = training_args(
        tiny_checkpoint, synthetic_dir, "--max_train_steps", 4, "--resume_from_checkpoint", "latest", *change
    )
    with pytest.raises(SystemExit, match=f"cannot resume from .*checkpoint-2: it was {message}"):
        train_main(args)


def test_resuming_with_another_batch_size_warns_and_goes_on(tiny_checkpoint, synthetic_dir, tmp_path, caplog):
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_checkpoint, resumed)
    args = training_args(
        resumed, synthetic_dir, "--max_train_steps", 3, "--resume_from_checkpoint", "latest", "--train_batch_size", 2
    )
    with caplog.at_level(logging.INFO):
        train_main(args)
    assert "trained with 4 samples per step (batch x processes x accumulation) and this run takes 2" in caplog.text
    assert f"resumed from {resumed / 'checkpoint-2'} at step 2" in caplog.text
    assert (resumed / "model_index.json").is_file()


def test_resuming_a_checkpoint_past_max_train_steps_is_refused(tiny_checkpoint, synthetic_dir, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_checkpoint, resumed)
    final_pipeline = (resumed / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    args = training_args(resumed, synthetic_dir, "--max_train_steps", 1, "--resume_from_checkpoint", "latest")
    with pytest.raises(SystemExit, match=r"checkpoint-2 is at step 2, past the 1 steps this run is asked for"):
        train_main(args)
    assert not (resumed / "checkpoint-3").exists()
    assert (resumed / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == final_pipeline


def test_resuming_the_last_step_saves_the_pipeline_without_training(tiny_checkpoint, synthetic_dir, tmp_path, caplog):
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_checkpoint / "checkpoint-2", resumed / "checkpoint-2")  # a run stopped before its final save
    args = training_args(resumed, synthetic_dir, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    with caplog.at_level(logging.INFO):
        train_main(args)
    assert "step 2 is the last one: saving the pipeline without training" in caplog.text
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-2"]
    assert_same_weights(resumed, tiny_checkpoint)  # the same EMA weights as the run's own final save


def test_resuming_a_checkpoint_without_ema_weights_with_use_ema_is_refused(tiny_checkpoint, synthetic_dir, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(tiny_checkpoint / "checkpoint-2", checkpoint)
    shutil.rmtree(checkpoint / "ema")
    args = training_args(
        tmp_path / "run", synthetic_dir, "--max_train_steps", 3, "--resume_from_checkpoint", checkpoint
    )
    with pytest.raises(SystemExit, match=f"{checkpoint} holds no EMA weights .*; resume it with --no-use_ema"):
        train_main(args)


def test_weights_that_are_not_finite_are_never_saved(tmp_path, tiny_pipeline):
    model = train_conditional_ddpm.Denoiser(tiny_pipeline.unet, tiny_pipeline.label_embedding)
    train_conditional_ddpm.check_finite_weights(model, 5, tmp_path)  # finite: nothing to say
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(FloatingPointError, match="the weights became infinite or NaN by step 5; nothing was saved"):
        train_conditional_ddpm.check_finite_weights(model, 5, tmp_path)


def test_images_that_are_not_finite_are_never_scored(tiny_pipeline):
    with torch.no_grad():  # a diverged model: every image NaN, which 8-bit pixels would turn black
        tiny_pipeline.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="the pipeline drew NaN or infinite pixels"):
        evaluate_iclevr.generate(tiny_pipeline, [["red cube"]], num_inference_steps=2, guidance_scale=1.0)


# --- Security --------------------------------------------------------------------------------------------------------


def test_every_torch_load_is_weights_only():
    calls = []
    for path in ROOT.glob("*.py"):
        calls += [(path.name, line) for line in path.read_text().splitlines() if "torch.load(" in line]
    assert calls, "the evaluator loads its checkpoint with torch.load"
    assert all("weights_only=True" in line for _, line in calls), calls


def test_plain_diffusers_runs_the_pipeline_code_only_when_trusted(tiny_pipeline_dir):
    from diffusers import DiffusionPipeline

    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tiny_pipeline_dir)


# --- Bad-input sweep: every CLI mistake ends in one clear line and a non-zero exit -----------------------------------


def cli_error(main, argv, capsys):
    """Run a CLI's main in-process; return (exit code, message) of the SystemExit it must end in."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    return (1 if isinstance(code, str) else code), (code if isinstance(code, str) else capsys.readouterr().err)


def decompression_bomb() -> bytes:
    """A 57-byte PNG whose header claims 100000 x 100000 pixels."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunks = [(b"IHDR", header), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)) for kind, data in chunks
    )


def bad_folder(tmp_path, kind):
    from PIL import Image

    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (320, 240)).save(tmp_path / "images" / "a.png")
    entries = {"a.png": ["red cube"]}
    if kind == "missing-image":
        entries["b.png"] = ["blue cube"]
    if kind == "unknown-name":
        entries["a.png"] = ["red cone"]
    if kind == "unreadable":
        (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG broken")
    if kind == "bomb":
        (tmp_path / "images" / "a.png").write_bytes(decompression_bomb())
    if kind == "outside":  # a file beside the image folder, named through it
        Image.new("RGBA", (320, 240)).save(tmp_path / "secret.png")
        entries = {"../secret.png": ["red cube"]}
    if kind == "absolute":
        entries = {str(tmp_path / "images" / "a.png"): ["red cube"]}
    if kind == "file-as-folder":
        (tmp_path / "train.json").write_text(json.dumps(entries))
        return ["--train_data_dir", str(tmp_path / "train.json"), "--train_json", str(tmp_path / "train.json")]
    text = "{}" if kind == "empty" else "{not json" if kind == "malformed" else json.dumps(entries)
    (tmp_path / "train.json").write_text(text)
    return ["--train_data_dir", str(tmp_path / "images"), "--train_json", str(tmp_path / "train.json")]


def train_main(argv):
    cli.run(train_conditional_ddpm.main, parse_args(argv))


TRAIN_BASE = [
    "--preset",
    "tiny",
    "--resolution",
    "16",
    "--logger",
    "none",
    "--max_train_steps",
    "1",
    "--mixed_precision",
    "no",
]
SWEEP = [
    # (command, arguments (TMP = a fresh folder, DATA:kind = a broken data folder), expected message)
    ("train", ["--preset", "gpu", "--resolution", "60"], "--resolution 60 must be a multiple of 8"),
    ("train", ["--resolution", "-32"], "argument --resolution: must be an integer from 1 to 1024, got '-32'"),
    ("train", ["--learning_rate", "0"], r"argument --learning_rate: must be a learning rate in \(0, 1\], got '0'"),
    ("train", ["--train_batch_size", "two"], "argument --train_batch_size: must be a positive integer, got 'two'"),
    (
        "train",
        ["--condition_dropout", "1.5"],
        r"argument --condition_dropout: must be a probability in \[0, 1\), got '1.5'",
    ),
    ("train", ["--guidance_scale", "-1"], r"argument --guidance_scale: must be a number in \[0, 100\], got '-1'"),
    ("train", ["--same_colour_repeats", "0"], "argument --same_colour_repeats: must be a positive integer, got '0'"),
    ("train", ["--preset", "giant"], "argument --preset: invalid choice: 'giant'"),
    ("train", ["--max_grad_norm", "-1"], "argument --max_grad_norm: must be a number >= 0, got '-1'"),
    ("train", ["--ema_inv_gamma", "0"], "argument --ema_inv_gamma: must be a positive number, got '0'"),
    ("train", ["--guidance_scale", "inf"], r"argument --guidance_scale: must be a number in \[0, 100\], got 'inf'"),
    ("train", ["--resolution", "100000"], "argument --resolution: must be an integer from 1 to 1024, got '100000'"),
    ("train", ["--learning_rate", "inf"], r"argument --learning_rate: must be a learning rate in \(0, 1\], got 'inf'"),
    ("train", ["--adam_beta2", "1"], r"argument --adam_beta2: must be a probability in \[0, 1\), got '1'"),
    ("train", ["--ema_max_decay", "1.5"], r"argument --ema_max_decay: must be a number in \[0, 1\], got '1.5'"),
    ("train", ["--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got '-1'"),
    ("train", ["--ddpm_num_inference_steps", "2000"], "exceeds the 1000 steps of the noise schedule"),
    (
        "train",
        ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"],
        "--overwrite_output_dir removes the checkpoints that --resume_from_checkpoint would continue",
    ),
    ("train", ["--train_data_dir", "somewhere"], "--train_data_dir and --train_json go together"),
    ("train", ["--output_dir", "NONEMPTY"], "is not empty; pass --resume_from_checkpoint latest"),
    ("train", ["--resume_from_checkpoint", "no/such/checkpoint"], "is neither a folder, nor one in --output_dir"),
    ("train", ["--evaluator_checkpoint", "no/such.pth"], "--evaluator_checkpoint no/such.pth does not exist"),
    ("train", ["DATA:missing-image"], "lists 'b.png', but .*b.png does not exist"),
    ("train", ["DATA:unknown-name"], "unknown object name 'red cone'; did you mean 'red cube'"),
    ("train", ["DATA:unreadable"], "cannot read image .*a.png"),
    ("train", ["DATA:empty"], "lists no images: the dataset would be empty"),
    ("train", ["DATA:malformed"], "train.json is not valid JSON"),
    ("train", ["DATA:bomb"], "cannot read image .*a.png: Image size .* exceeds limit"),
    ("train", ["DATA:outside"], "lists '../secret.png', which is outside the image folder"),
    ("train", ["DATA:absolute"], "lists '/.*a.png', which is outside the image folder"),
    ("train", ["DATA:file-as-folder"], "train.json is a file; the images are read from a folder"),
    ("train", ["DATA:ok", "--train_batch_size", "2"], r"--train_batch_size 2 is larger than the dataset \(1 images\)"),
    ("train", ["DATA:ok", "--objects_json", "TMP"], "is a folder; a JSON file is expected here"),
    ("train", ["--objects_json", "TMP/objects.json"], "goes with --train_data_dir or --dataset_name"),
    ("train", ["--logging_dir", "../elsewhere"], "--logging_dir '../elsewhere' must name a folder inside --output_dir"),
    ("train", ["--logging_dir", "/tmp/elsewhere"], "--logging_dir '/tmp/elsewhere' must name a folder inside"),
    (
        "train",
        ["--learning_rate", "1e30"],
        r"argument --learning_rate: must be a learning rate in \(0, 1\], got '1e30'",
    ),
    ("train", ["--synthetic_scenes", "100000000"], "argument --synthetic_scenes: must be an integer from 1 to 100000"),
    ("data", ["synthesize", "--output_dir", "TMP/x", "--num_scenes", "100000000"], "must be an integer from 1 to"),
    ("data", ["preview", "--dataset_dir", "BOMB", "--output", "TMP/p.png"], "cannot read image .*a.png: Image size"),
    ("data", ["preview", "--dataset_dir", "OUTSIDE", "--output", "TMP/p.png"], "which is outside the image folder"),
    ("data", ["preview", "--dataset_dir", "OK", "--output", "TMP"], "is a folder; a file is to be written there"),
    ("data", ["preview", "--dataset_dir", "OK", "--output", "/dev/null"], "/dev/null is not a regular file"),
    (
        "data",
        ["synthesize", "--output_dir", "TMP", "--num_scenes", "0"],
        "argument --num_scenes: must be an integer from 1 to 100000, got '0'",
    ),
    ("data", ["synthesize", "--output_dir", "NONEMPTY", "--num_scenes", "1"], "already exists and is not empty"),
    ("data", ["synthesize", "--output_dir", "TMP", "--seed", "-1"], "argument --seed: must be an integer from 0"),
    ("data", ["preview", "--dataset_dir", "LISTED", "--output", "TMP/p.png"], "must map image file names to lists"),
    (
        "data",
        ["push", "--dataset_dir", "no/such/folder", "--repo_id", "me/x"],
        r"no/such/folder/\w+\.json does not exist",
    ),
    (
        "evaluate",
        ["score", "--pipeline", "PIPELINE", "--evaluator_checkpoint", "BAD_CHECKPOINT", "--output_dir", "TMP"],
        r"must hold \{'model': state_dict\}",
    ),
    (
        "evaluate",
        ["score", "--pipeline", "TMP", "--evaluator_checkpoint", "CHECKPOINT", "--output_dir", "TMP/out"],
        "is not a saved pipeline",
    ),
    (
        "evaluate",
        [
            "score",
            "--pipeline",
            "PIPELINE",
            "--evaluator_checkpoint",
            "CHECKPOINT",
            "--output_dir",
            "TMP/out",
            "--test_json",
            "UNKNOWN_LABELS",
        ],
        "entry 0: unknown object name 'red cone'",
    ),
    (
        "evaluate",
        [
            "score",
            "--pipeline",
            "PIPELINE",
            "--evaluator_checkpoint",
            "CHECKPOINT",
            "--output_dir",
            "TMP/out",
            "--objects_json",
            "SWAPPED_VOCABULARY",
        ],
        r"they differ \(0: 'gray cube' vs 'red cube'; 1: 'red cube' vs 'gray cube'\)",
    ),
    (
        "evaluate",
        [
            "score",
            "--pipeline",
            "PIPELINE",
            "--evaluator_checkpoint",
            "CHECKPOINT",
            "--output_dir",
            "TMP",
            "--scheduler",
            "euler",
        ],
        "argument --scheduler: invalid choice: 'euler'",
    ),
    (
        "evaluate",
        ["denoise", "--pipeline", "PIPELINE", "--labels", "red cubes", "--output", "TMP/d.png"],
        "unknown object name 'red cubes'; did you mean 'red cube'",
    ),
    (
        "evaluate",
        [
            "denoise",
            "--pipeline",
            "PIPELINE",
            "--labels",
            "red cube",
            "--output",
            "TMP/d.png",
            "--guidance_scale",
            "inf",
        ],
        r"argument --guidance_scale: must be a number in \[0, 100\], got 'inf'",
    ),
    (
        "evaluate",
        ["rescore", "--output_dir", "TMP", "--evaluator_checkpoint", "CHECKPOINT", "--device", "bogus"],
        "argument --device: must be a torch device such as cpu, cuda or cuda:0, got 'bogus'",
    ),
    (
        "evaluate",
        ["rescore", "--output_dir", "TMP", "--evaluator_checkpoint", "CHECKPOINT", "--device", "cuda:7"],
        r"argument --device: 'cuda:7'( asks for a GPU|: this machine has \d+ GPU)",
    ),
    (
        "evaluate",
        ["rescore", "--output_dir", "TMP", "--evaluator_checkpoint", "CHECKPOINT"],
        r"32 image\(s\) missing in .*test",
    ),
    (
        "evaluate",
        ["train", "--train_data_dir", "TMP", "--train_json", "TMP/none.json", "--output", "TMP/e.pth"],
        "none.json does not exist",
    ),
]


@pytest.mark.parametrize("command, argv, message", SWEEP, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(SWEEP)])
def test_bad_input_sweep(
    tmp_path, capsys, tiny_pipeline_dir, evaluator_checkpoint, class_names, command, argv, message
):
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "keep.txt").write_text("mine")
    objects = json.loads(iclevr_data.OBJECTS_JSON.read_text())
    objects["gray cube"], objects["red cube"] = 1, 0
    (tmp_path / "swapped.json").write_text(json.dumps(objects))
    (tmp_path / "unknown.json").write_text(json.dumps([["red cone"]]))
    torch.save({"weights": {}}, tmp_path / "bad.pth")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "train.json").write_text(json.dumps([["red cube"]]))
    for kind in ("bomb", "outside", "ok"):  # i-CLEVR-style folders, for the commands that take one
        bad_folder(tmp_path / kind, kind)
    places = {
        "BOMB": str(tmp_path / "bomb"),
        "OUTSIDE": str(tmp_path / "outside"),
        "OK": str(tmp_path / "ok"),
        "TMP": str(tmp_path),
        "LISTED": str(tmp_path / "listed"),
        "NONEMPTY": str(tmp_path / "nonempty"),
        "PIPELINE": str(tiny_pipeline_dir),
        "CHECKPOINT": str(evaluator_checkpoint),
        "BAD_CHECKPOINT": str(tmp_path / "bad.pth"),
        "SWAPPED_VOCABULARY": str(tmp_path / "swapped.json"),
        "UNKNOWN_LABELS": str(tmp_path / "unknown.json"),
    }
    resolved = []
    for arg in argv:
        if arg.startswith("DATA:"):
            resolved += bad_folder(tmp_path, arg[5:])
        else:
            resolved.append(
                re.sub(
                    r"^(BOMB|OUTSIDE|OK|TMP|LISTED|NONEMPTY|PIPELINE|CHECKPOINT|BAD_CHECKPOINT|SWAPPED_VOCABULARY"
                    r"|UNKNOWN_LABELS)",
                    lambda m: places[m.group(1)],
                    arg,
                )
            )
    if command == "train":
        main = train_main
        resolved = TRAIN_BASE + ["--output_dir", str(tmp_path / "run")] + resolved
    else:
        main = {"data": iclevr_data.main, "evaluate": evaluate_iclevr.main}[command]
    code, text = cli_error(main, resolved, capsys)
    assert code != 0
    assert re.search(message, text), text
    assert (tmp_path / "nonempty" / "keep.txt").read_text() == "mine"


def test_the_real_entry_points_print_one_line_not_a_traceback(tmp_path, evaluator_checkpoint):
    for command in (
        ["train_conditional_ddpm.py", "--preset", "gpu", "--resolution", "30"],
        [
            "evaluate_iclevr.py",
            "rescore",
            "--output_dir",
            str(tmp_path),
            "--evaluator_checkpoint",
            str(evaluator_checkpoint),
        ],
        ["-m", "cond_ddpm.data", "push", "--dataset_dir", str(tmp_path), "--repo_id", "me/x"],
    ):
        result = run_python(*command)
        assert result.returncode != 0 and "error: " in result.stderr and "Traceback" not in result.stderr, result.stderr


# --- One run per output folder, full disks, stops during sampling, damaged checkpoints ------------------------------


def test_a_second_run_into_a_folder_in_use_is_refused_and_writes_nothing(tmp_path, synthetic_dir):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    with open(output_dir / ".lock", "a") as held:  # as the run that owns the folder holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match=f"--output_dir {output_dir} is in use by another run"):
            train_main(training_args(output_dir, synthetic_dir, "--max_train_steps", 2, "--checkpointing_steps", 1))
        assert [p.name for p in output_dir.iterdir()] == [".lock"]
    # The lock went with its holder: the folder is free again.
    train_main(training_args(output_dir, synthetic_dir, "--max_train_steps", 1))
    assert (output_dir / "model_index.json").is_file()


def test_overwriting_an_output_dir_removes_the_earlier_runs_checkpoints(tiny_checkpoint, synthetic_dir, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, output_dir)
    (output_dir / ".incomplete-checkpoint-9").mkdir()
    train_main(training_args(output_dir, synthetic_dir, "--max_train_steps", 1, "--overwrite_output_dir"))
    assert sorted(p.name for p in output_dir.glob("*checkpoint-*")) == []
    assert (output_dir / "model_index.json").is_file()


def storage_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def safetensors_storage_full(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


@pytest.mark.parametrize(
    "writer, fault", [("torch.save", storage_full), ("safetensors.torch.save_file", safetensors_storage_full)]
)
def test_a_full_disk_removes_the_partial_checkpoint_and_says_what_it_needs(
    tmp_path, synthetic_dir, monkeypatch, writer, fault
):
    output_dir = tmp_path / "run"
    module, name = writer.rsplit(".", 1)
    real_write = getattr(importlib.import_module(module), name)

    def write(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            Path(path).write_bytes(b"half")  # what a full disk leaves: the start of the file
            fault()
        return real_write(obj, path, *args, **kwargs)

    monkeypatch.setattr(f"{module}.{name}", write)
    with pytest.raises(SystemExit) as stopped:
        train_main(training_args(output_dir, synthetic_dir, "--max_train_steps", 6, "--checkpointing_steps", 2))
    message = str(stopped.value.code)
    assert re.fullmatch(
        rf"error: the disk of {output_dir} is full: checkpoint-4 needs about [\d,]+ bytes and [\d,]+ are free\."
        rf" Its partial copy is removed; the last whole checkpoint is {output_dir / 'checkpoint-2'}\. .*",
        message,
    ), message
    assert sorted(p.name for p in output_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert train_conditional_ddpm.checkpoint_damage(output_dir / "checkpoint-2") is None


def test_a_full_disk_at_the_first_checkpoint_is_told_the_checkpoints_real_size(
    tmp_path, synthetic_dir, monkeypatch, tiny_pipeline
):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            storage_full()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("torch.save", save)
    with pytest.raises(SystemExit) as stopped:
        train_main(training_args(tmp_path / "run", synthetic_dir, "--max_train_steps", 4, "--checkpointing_steps", 2))
    needed = int(
        re.search(r"checkpoint-2 needs about ([\d,]+) bytes", str(stopped.value.code)).group(1).replace(",", "")
    )
    weights = sum(
        p.numel() * p.element_size()
        for module in (tiny_pipeline.unet, tiny_pipeline.label_embedding)
        for p in module.parameters()
    )
    assert needed >= 3 * weights  # the weights, AdamW's two moments (and the EMA copy), not a few hundred bytes


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


def damage(checkpoint, how):
    state_file = checkpoint / "training_state.json"
    if how == "random-states-missing":
        (checkpoint / "random_states_0.pkl").unlink()
        return "random_states_0.pkl is missing"
    if how == "random-states-corrupt":
        (checkpoint / "random_states_0.pkl").write_bytes(b"\x80\x04 not a pickle")
        return "random_states_0.pkl is damaged"
    if how == "optimizer-corrupt":
        (checkpoint / "optimizer.bin").write_bytes((checkpoint / "optimizer.bin").read_bytes()[:100])
        return "optimizer.bin is damaged"
    if how == "weights-corrupt":
        weights = checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        return "diffusion_pytorch_model.safetensors is damaged"
    if how == "no-global-step":
        state = json.loads(state_file.read_text())
        del state["global_step"]
        state_file.write_text(json.dumps(state))
        return "training_state.json has no global_step"
    if how in ("negative-global-step", "global-step-past-its-name"):
        step = -5 if how == "negative-global-step" else 10**12
        state_file.write_text(json.dumps(json.loads(state_file.read_text()) | {"global_step": step}))
        return f"training_state.json says global_step {step}"
    state_file.write_text("{not json")
    return "training_state.json is not valid JSON"


DAMAGES = [
    "random-states-missing",
    "random-states-corrupt",
    "optimizer-corrupt",
    "weights-corrupt",
    "no-global-step",
    "negative-global-step",
    "global-step-past-its-name",
    "state-not-json",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_is_refused_naming_the_file(tiny_checkpoint, synthetic_dir, tmp_path, how):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(tiny_checkpoint / "checkpoint-2", checkpoint)
    damaged_file = damage(checkpoint, how)
    args = training_args(
        tmp_path / "run", synthetic_dir, "--max_train_steps", 3, "--resume_from_checkpoint", checkpoint
    )
    with pytest.raises(SystemExit, match=f"error: cannot resume from {checkpoint}: {checkpoint}/.*{damaged_file}"):
        train_main(args)


def test_latest_passes_over_a_damaged_checkpoint_with_a_warning(tiny_checkpoint, synthetic_dir, tmp_path, caplog):
    output_dir = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, output_dir)
    newer = output_dir / "checkpoint-4"
    shutil.copytree(output_dir / "checkpoint-2", newer)
    state = json.loads((newer / "training_state.json").read_text())
    (newer / "training_state.json").write_text(json.dumps({**state, "global_step": 4}))
    damage(newer, "optimizer-corrupt")
    args = training_args(output_dir, synthetic_dir, "--max_train_steps", 3, "--resume_from_checkpoint", "latest")
    with caplog.at_level(logging.INFO):
        train_main(args)
    assert f"skipping {newer}: {newer / 'optimizer.bin'} is damaged" in caplog.text
    assert f"resumed from {output_dir / 'checkpoint-2'} at step 2" in caplog.text


def test_an_unwritable_output_dir_is_refused_before_training(tmp_path, synthetic_dir):
    output_dir = tmp_path / "read-only"
    output_dir.mkdir()
    output_dir.chmod(0o555)
    immutable = os.access(output_dir, os.W_OK)  # root writes anywhere; an immutable folder stops it too
    if immutable and subprocess.run(["chattr", "+i", str(output_dir)], capture_output=True).returncode != 0:
        pytest.skip("this user can write into any folder")
    try:
        with pytest.raises(SystemExit, match=f"error: --output_dir {output_dir} is not writable"):
            train_main(training_args(output_dir, synthetic_dir, "--max_train_steps", 1))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(output_dir)], check=True)
        output_dir.chmod(0o755)


# --- Data and evaluator faults ----------------------------------------------------------------------------------------


def test_16_bit_png_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert np.asarray(iclevr_data.open_rgb(tmp_path / "grey16.png")).tolist() == [[[128] * 3] * 4] * 4


@pytest.mark.parametrize("output", ["ev.json", "folder"])
def test_evaluator_outputs_that_would_be_lost_are_refused_before_training(tmp_path, synthetic_dir, capsys, output):
    (tmp_path / "folder").mkdir()
    argv = [
        "train",
        "--train_data_dir",
        str(synthetic_dir / "images"),
        "--train_json",
        str(synthetic_dir / "train.json"),
    ]
    argv += ["--output", str(tmp_path / output), "--num_epochs", "1", "--device", "cpu"]
    code, text = cli_error(evaluate_iclevr.main, argv, capsys)
    assert code == 1
    expected = "is where the training metadata goes" if output == "ev.json" else "is a folder; give a file name"
    assert expected in text and "training on" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_pushing_a_dataset_without_a_network_is_one_line(synthetic_dir, monkeypatch, capsys):
    class ConnectError(Exception):  # what the Hub client raises offline: no OSError
        pass

    def offline(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr("datasets.Dataset.push_to_hub", offline)
    code, text = cli_error(iclevr_data.main, ["push", "--dataset_dir", str(synthetic_dir), "--repo_id", "me/x"], capsys)
    assert code == 1
    assert "could not push" in text and "Name or service not known" in text


def test_argparse_errors_are_one_line_and_a_pointer_to_help(capsys):
    for main, argv in (
        (parse_args, ["--resolution", "-32"]),
        (evaluate_iclevr.main, ["score", "--num_inference_steps", "0"]),
        (iclevr_data.main, ["render"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 2 and ": error: " in lines[0] and "--help" in lines[1], lines
