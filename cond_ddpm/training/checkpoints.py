"""Checkpoints that resume a run exactly: saved whole or not at all, checked before a resume, never of diverged
weights. Each holds the pipeline in `save_pretrained` form, its EMA copies, and Accelerate's optimizer, schedule and
random states."""

import errno
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate.utils import load
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from torch import nn

from cond_ddpm.atomic_io import INCOMPLETE_PREFIX, atomic_write_text
from cond_ddpm.training.objective import build_pipeline
from pipeline_cond_ddpm import CondDDPMPipeline

logger = logging.getLogger(__name__)
# Settings a checkpoint must share with the run that resumes it: anything else changes the model or its meaning.
RESUME_MUST_MATCH = ("preset", "resolution", "class_names", "prediction_type", "ddpm_num_steps", "ddpm_beta_schedule")


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def find_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first. Folders an interrupted save left behind are skipped with a warning."""
    for leftover in sorted(output_dir.glob(f"{INCOMPLETE_PREFIX}checkpoint-*")):
        logger.warning(f"skipping {leftover}: an interrupted save left it incomplete")
    found = []
    for folder in output_dir.glob("checkpoint-*"):
        if not folder.name.split("-")[1].isdigit():
            continue
        if not (folder / "training_state.json").is_file():
            logger.warning(f"skipping {folder}: it has no training_state.json, so it is incomplete")
            continue
        found.append(folder)
    return sorted(found, key=checkpoint_step)


def save_checkpoint(accelerator, output_dir: Path, step: int, training_state: dict, total_limit, expected_size=0):
    """Save the full training state as `checkpoint-{step}`, whole or not at all, then prune the oldest.
    `expected_size` (bytes) is what a full disk is told the checkpoint needs before any was written."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f"{INCOMPLETE_PREFIX}{final.name}"  # one name for all processes, which all write into it
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # Written last: its presence is what marks a checkpoint finished (see `find_checkpoints`).
            atomic_write_text(
                staging / "training_state.json", json.dumps({**training_state, "global_step": step}, indent=2)
            )
    except Exception as error:
        if accelerator.is_main_process:
            raise failed_save(error, staging, final, expected_size) from error
        raise
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        staging.replace(final)
        if total_limit is not None:
            for old in find_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info(f"saved checkpoint {final}")
    accelerator.wait_for_everyone()


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def expected_checkpoint_size(model: nn.Module, emas: dict) -> int:
    """About the bytes of one checkpoint: the weights, AdamW's two moments and the EMA copy."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights * (3 + bool(emas))


def failed_save(error: Exception, staging: Path, final: Path, expected_size: int = 0) -> Exception:
    """Remove the partial checkpoint of a failed save, and say what a full disk needs in one line.

    Libraries report a full disk in many ways (OSError ENOSPC, safetensors' SafetensorError, torch's
    `basic_ios::clear`), so the free space decides too: less than the rest of the checkpoint means a full disk.
    """
    written, free = folder_size(staging), shutil.disk_usage(final.parent).free
    shutil.rmtree(staging, ignore_errors=True)
    whole = find_checkpoints(final.parent)
    needed = max(written, folder_size(whole[-1]) if whole else 0, expected_size)
    codes = {getattr(e, "errno", None) for e in (error, error.__cause__, error.__context__)}
    if not (codes & {errno.ENOSPC, errno.EDQUOT} or "No space left" in str(error) or free < needed - written):
        return error
    return OSError(
        f"the disk of {final.parent} is full: {final.name} needs about {needed:,} bytes and {free:,} are free."
        f" Its partial copy is removed; the last whole checkpoint is {whole[-1] if whole else 'none'}. Free some"
        " space, then continue with --resume_from_checkpoint latest"
    )


def check_finite(loss: float, step: int, output_dir: Path, verified_step: int):
    """Stop on a non-finite loss, pointing at the newest checkpoint whose weights a finite loss has used: the
    weights saved at step c are first used by the loss of step c + 1, so only c < `verified_step` are vouched for."""
    if not math.isfinite(loss):
        last = [c for c in find_checkpoints(output_dir) if checkpoint_step(c) < verified_step]
        raise FloatingPointError(
            f"the training loss became {loss} by step {step}; the last good checkpoint is"
            f" {last[-1] if last else 'none (none was saved yet)'}. Resume from it with a lower --learning_rate,"
            " or with --mixed_precision no"
        )


def check_finite_weights(model: nn.Module, step: int, output_dir: Path):
    """Refuse to save weights that are not finite: a diverged model must never become a checkpoint or a pipeline."""
    if not torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all():
        last = find_checkpoints(output_dir)
        raise FloatingPointError(
            f"the weights became infinite or NaN by step {step}; nothing was saved. The last checkpoint is"
            f" {last[-1] if last else 'none'}. Resume from it with a lower --learning_rate or with --mixed_precision no"
        )


def clear_earlier_run(output_dir: Path):
    """For --overwrite_output_dir: remove the earlier run's checkpoints (whole or not) and best pipeline before this
    run writes, or `--resume_from_checkpoint latest` would later continue the earlier run."""
    for old in [*output_dir.glob("checkpoint-*"), *output_dir.glob(f"{INCOMPLETE_PREFIX}*"), output_dir / "best"]:
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What makes `checkpoint` unfit to resume exactly (a missing or unreadable file, named), or None if it is whole.

    Accelerate itself resumes without random states after an INFO line, and fails with a traceback on others."""
    state_file = checkpoint / "training_state.json"
    if not state_file.is_file():
        return f"it has no {state_file.name}, so it is incomplete"
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"{state_file} is not valid JSON ({error})"
    if not isinstance(state, dict) or type(state.get("global_step")) is not int:
        return f"{state_file} has no global_step"
    if state["global_step"] < 1:
        return f"{state_file} says global_step {state['global_step']}, and a checkpoint is saved after a step"
    named = checkpoint.name.split("-")
    if named[0] == "checkpoint" and named[-1].isdigit() and int(named[-1]) != state["global_step"]:
        return f"{state_file} says global_step {state['global_step']}, but the folder is named {checkpoint.name}"
    required = ["model_index.json", "optimizer.bin", "scheduler.bin"]
    required += [f"random_states_{i}.pkl" for i in range(state.get("num_processes", 1))]
    missing = [name for name in required if not (checkpoint / name).is_file()]
    if missing:
        return f"{checkpoint / missing[0]} is missing"
    readers = {
        ".safetensors": load_file,
        ".bin": load,
        ".pkl": load,
        ".json": lambda path: json.loads(path.read_text()),
    }
    for path in sorted(checkpoint.rglob("*")):
        if path.suffix in readers and path.is_file():
            try:
                readers[path.suffix](path)
            except Exception as error:  # each format fails in its own way on a truncated or overwritten file
                return f"{path} is damaged ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    return None


def checkpoint_to_resume(choice: str, output_dir: Path) -> Path | None:
    """The checkpoint --resume_from_checkpoint names, refused if damaged; for `latest`, the newest whole one in
    `output_dir` (damaged ones passed over with a warning), or None when there is none yet."""
    if choice != "latest":
        damage = checkpoint_damage(Path(choice))
        if damage:
            raise ValueError(f"cannot resume from {choice}: {damage}")
        return Path(choice)
    found = find_checkpoints(output_dir)
    for checkpoint in reversed(found):
        damage = checkpoint_damage(checkpoint)
        if damage is None:
            return checkpoint
        logger.warning(f"skipping {checkpoint}: {damage}; trying the one before it")
    if found:
        raise ValueError(f"every checkpoint in {output_dir} is damaged (see the warnings); resume from none of them")
    return None


def shown_setting(key: str, value) -> str:
    if key == "class_names":  # 24 names are too many to read in one line
        return f"{len(value or [])} objects"
    return repr(value)


def check_resumable(checkpoint: Path, training_state: dict, must_match=RESUME_MUST_MATCH):
    saved = json.loads((checkpoint / "training_state.json").read_text())
    for key in must_match:
        if saved.get(key) != training_state[key]:
            raise ValueError(
                f"cannot resume from {checkpoint}: it was trained with {key} = {shown_setting(key, saved.get(key))},"
                f" and this run asks for {shown_setting(key, training_state[key])}; use the same setting or start a"
                " new --output_dir"
            )
    # Allowed (more GPUs, a smaller batch to fit memory), but the step count no longer maps to the same data.
    if saved.get("samples_per_step", training_state["samples_per_step"]) != training_state["samples_per_step"]:
        logger.warning(
            f"{checkpoint} was trained with {saved['samples_per_step']} samples per step (batch x processes x"
            f" accumulation) and this run takes {training_state['samples_per_step']}: it goes on from step"
            f" {saved['global_step']}, but its epochs and data order will not match those of an uninterrupted run",
        )
    return saved["global_step"]


def load_checkpoint_weights(model, emas, folder, device):
    """Load a checkpoint's weights into `model` and its EMA copies. The EMA comes back as CPU tensors of
    `EMAModel.from_pretrained`, so it is moved to `device` here (as diffusers' examples do): the `ema.to(device)` of
    start-up ran before `load_state`, and the next `ema.step` would mix devices."""
    saved = CondDDPMPipeline.from_pretrained(folder)
    model.unet.load_state_dict(saved.unet.state_dict())
    model.label_embedding.load_state_dict(saved.label_embedding.state_dict())
    for name, ema in emas.items():
        loaded = EMAModel.from_pretrained(os.path.join(folder, "ema", name), model_cls=type(getattr(model, name)))
        ema.load_state_dict(loaded.state_dict())
        ema.to(device)


def register_checkpoint_hooks(accelerator, noise_scheduler, emas):
    """Checkpoints hold the pipeline in save_pretrained form (plus the EMA weights), not a bare state dict."""

    def save_model_hook(models, weights, folder):
        # Under fork_rng: EMAModel.save_pretrained builds a freshly initialised model, and a checkpoint must not move
        # the training RNG, or a run would depend on when it was checkpointed and resuming could not be exact.
        cuda_devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            if accelerator.is_main_process:
                build_pipeline(accelerator, models[0], noise_scheduler).save_pretrained(folder)
                for name, ema in emas.items():
                    ema.save_pretrained(os.path.join(folder, "ema", name))
        weights.pop()

    def load_model_hook(models, folder):
        load_checkpoint_weights(accelerator.unwrap_model(models.pop()), emas, folder, accelerator.device)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def resume(
    accelerator,
    choice,
    output_dir: Path,
    training_state: dict,
    max_train_steps: int,
    use_ema: bool,
    must_match=RESUME_MUST_MATCH,
) -> int:
    """Load weights, EMA, optimizer, LR schedule and RNG states from the checkpoint `choice` names (as
    --resume_from_checkpoint takes it; None: none); return its step (0 when there is none to resume). The keys of
    `training_state` named in `must_match` must be those the checkpoint was saved with."""
    if not choice:
        return 0
    checkpoint = checkpoint_to_resume(choice, output_dir)
    if checkpoint is None:
        logger.warning(f"no finished checkpoint in {output_dir}; starting a new run")
        return 0
    step = check_resumable(checkpoint, training_state, must_match)
    if step > max_train_steps:
        raise ValueError(
            f"{checkpoint} is at step {step}, past the {max_train_steps} steps this run is asked for; raise"
            " --max_train_steps to continue it"
        )
    if use_ema and not (checkpoint / "ema").is_dir():
        raise ValueError(
            f"{checkpoint} holds no EMA weights (its run was trained with --no-use_ema); resume it with --no-use_ema"
        )
    accelerator.load_state(str(checkpoint))
    logger.info(f"resumed from {checkpoint} at step {step}")
    return step
