"""cond_ddpm.training.checkpoints: checkpoints saved whole or not at all (full disks included), never of diverged
weights, and resumed only when their settings and files are whole."""

import errno
import importlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FullDisk, assert_same_weights, run_python, train_main, training_args

import train_conditional_ddpm
from cond_ddpm.data import OBJECTS_JSON
from cond_ddpm.training.checkpoints import (
    check_finite,
    check_finite_weights,
    checkpoint_damage,
    find_checkpoints,
    load_checkpoint_weights,
    save_checkpoint,
)
from cond_ddpm.training.objective import Denoiser

# --- Saved whole or not at all ----------------------------------------------------------------------------------------


class TinyAccelerator:
    """Stands in for Accelerate's saving: writes part of a checkpoint, or all of it."""

    is_main_process = True

    def __init__(self, fail):
        self.fail = fail

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


def test_checkpoints_come_oldest_first_by_step_not_by_name(tmp_path):
    for step in (300, 1200, 900):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "training_state.json").write_text("{}")
    (tmp_path / "checkpoint-1500").mkdir()  # a save still under way: no training_state.json yet
    assert [c.name for c in find_checkpoints(tmp_path)] == ["checkpoint-300", "checkpoint-900", "checkpoint-1200"]


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
    assert checkpoint_damage(output_dir / "checkpoint-2") is None


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


def test_overwriting_an_output_dir_removes_the_earlier_runs_checkpoints(tiny_checkpoint, synthetic_dir, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, output_dir)
    (output_dir / ".incomplete-checkpoint-9").mkdir()
    train_main(training_args(output_dir, synthetic_dir, "--max_train_steps", 1, "--overwrite_output_dir"))
    assert sorted(p.name for p in output_dir.glob("*checkpoint-*")) == []
    assert (output_dir / "model_index.json").is_file()


# --- Never of diverged weights ----------------------------------------------------------------------------------------


def test_a_diverging_loss_stops_the_run_with_a_clear_message(tmp_path, synthetic_dir, monkeypatch):
    real_loss = train_conditional_ddpm.diffusion_loss

    def diverging_loss(objective, denoiser, noise_scheduler, batch):  # finite for 3 steps, as a run that blows up later
        loss = real_loss(objective, denoiser, noise_scheduler, batch)
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


def test_weights_that_are_not_finite_are_never_saved(tmp_path, tiny_pipeline):
    model = Denoiser(tiny_pipeline.unet, tiny_pipeline.label_embedding)
    check_finite_weights(model, 5, tmp_path)  # finite: nothing to say
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(FloatingPointError, match="the weights became infinite or NaN by step 5; nothing was saved"):
        check_finite_weights(model, 5, tmp_path)


# --- Resuming: refused when the settings or the files do not match ----------------------------------------------------


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
        objects = json.loads(OBJECTS_JSON.read_text())
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


def test_resuming_puts_the_ema_on_the_device_of_the_weights_it_shadows(tmp_path, tiny_pipeline):
    """A GPU run loads checkpoints from CPU files: the EMA must end up on the training device, not stay on the CPU.
    `meta` stands in for the GPU, a device the loaded files are not on."""
    from diffusers.training_utils import EMAModel

    model = Denoiser(tiny_pipeline.unet, tiny_pipeline.label_embedding)
    emas = {
        name: EMAModel(module.parameters(), model_cls=type(module), model_config=module.config, foreach=True)
        for name, module in (("unet", model.unet), ("label_embedding", model.label_embedding))
    }
    tiny_pipeline.save_pretrained(tmp_path)
    for name, ema in emas.items():
        ema.save_pretrained(tmp_path / "ema" / name)
    model.to("meta")
    load_checkpoint_weights(model, emas, tmp_path, torch.device("meta"))
    for name, ema in emas.items():
        shadowed = list(getattr(model, name).parameters())
        assert [p.device for p in ema.shadow_params] == [p.device for p in shadowed], name
