"""Train a label-conditioned DDPM (`CondDDPMPipeline`) on i-CLEVR with Accelerate, on any number of processes.

    accelerate launch train_conditional_ddpm.py --output_dir runs/gpu               # gpu recipe, built-in synthetic set
    accelerate launch train_conditional_ddpm.py --recipe cpu --output_dir runs/cpu  # cpu recipe, built-in synthetic set
    accelerate launch --config_file accelerate_config.yaml train_conditional_ddpm.py \\
        --train_data_dir iclevr/images --train_json train.json --objects_json objects.json --output_dir runs/iclevr

The run ends with the pipeline (EMA weights with `--use_ema`) saved by `save_pretrained` in `--output_dir`, beside
`checkpoint-N/` folders that `--resume_from_checkpoint latest` continues from, sample grids in `samples/` and
tracker logs in `logs/` (`--logging_dir`).
"""

import argparse
import errno
import json
import logging
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, is_wandb_available, load, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from cond_ddpm import cli, hub
from cond_ddpm.atomic_io import (
    INCOMPLETE_PREFIX,
    LOCK_NAME,
    atomic_write,
    atomic_write_text,
    claim_folder,
    staged_contents,
    staged_directory,
)
from cond_ddpm.data import (
    MAX_SCENES,
    NEW_TEST_JSON,
    OBJECTS_JSON,
    TEST_JSON,
    dataset_class_names,
    default_synthetic_dataset,
    load_hub_dataset,
    load_iclevr_dataset,
    read_label_sets,
    repeat_same_colour_pairs,
)
from cond_ddpm.grids import save_captioned_grid
from cond_ddpm.recipes import DEFAULT_RECIPE, RECIPES
from evaluate_iclevr import evaluate, generate, load_evaluator, set_scheduler
from pipeline_cond_ddpm import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_SCHEDULER,
    PRESETS,
    SCHEDULERS,
    CondDDPMPipeline,
    multi_hot,
    usage_snippet,
)

logger = get_logger(__name__)
# Settings a checkpoint must share with the run that resumes it: anything else changes the model or its meaning.
RESUME_MUST_MATCH = ("preset", "resolution", "class_names", "prediction_type", "ddpm_num_steps", "ddpm_beta_schedule")


class Denoiser(nn.Module):
    """The trained modules as one: Accelerate (DDP, autocast) needs a single forward that uses every parameter."""

    def __init__(self, unet, label_embedding):
        super().__init__()
        self.unet, self.label_embedding = unet, label_embedding

    def forward(self, noisy_images, timesteps, labels):
        return self.unet(noisy_images, timesteps, **self.label_embedding(labels)).sample


# --- Helpers -------------------------------------------------------------------------------------------------------


def load_training_data(args):
    if args.dataset_name:
        return load_hub_dataset(
            args.dataset_name,
            args.resolution,
            args.image_column,
            args.label_column,
            args.objects_json,
            config_name=args.dataset_config_name,
            cache_dir=args.cache_dir,
        )
    if args.train_data_dir:
        return load_iclevr_dataset(args.train_data_dir, args.train_json, args.objects_json, args.resolution)
    folder = default_synthetic_dataset(args.synthetic_scenes, args.seed)
    return load_iclevr_dataset(folder / "images", folder / "train.json", folder / "objects.json", args.resolution)


def held_out_label_sets(dataset, count: int, seed: int) -> list[list[str]]:
    """Label sets drawn from the training labels, never one of test.json / new_test.json: best-checkpoint
    selection must not see the label sets the model is finally scored on."""
    class_names = dataset_class_names(dataset)
    reserved = {frozenset(s) for path in (TEST_JSON, NEW_TEST_JSON) for s in json.loads(path.read_text())}
    candidates = sorted({tuple(sorted(objects)) for objects in dataset.with_format(None)["objects"]})
    candidates = [c for c in candidates if frozenset(class_names[i] for i in c) not in reserved]
    chosen = np.random.default_rng(seed).permutation(len(candidates))[:count]
    return [[class_names[i] for i in candidates[j]] for j in sorted(chosen)]


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def find_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first. Folders an interrupted save left behind are skipped with a warning."""
    for leftover in sorted(output_dir.glob(f"{INCOMPLETE_PREFIX}checkpoint-*")):
        logger.warning(f"skipping {leftover}: an interrupted save left it incomplete", main_process_only=True)
    found = []
    for folder in output_dir.glob("checkpoint-*"):
        if not folder.name.split("-")[1].isdigit():
            continue
        if not (folder / "training_state.json").is_file():
            logger.warning(
                f"skipping {folder}: it has no training_state.json, so it is incomplete", main_process_only=True
            )
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
        logger.warning(f"skipping {checkpoint}: {damage}; trying the one before it", main_process_only=True)
    if found:
        raise ValueError(f"every checkpoint in {output_dir} is damaged (see the warnings); resume from none of them")
    return None


def shown_setting(key: str, value) -> str:
    if key == "class_names":  # 24 names are too many to read in one line
        return f"{len(value or [])} objects"
    return repr(value)


def check_resumable(checkpoint: Path, training_state: dict):
    saved = json.loads((checkpoint / "training_state.json").read_text())
    for key in RESUME_MUST_MATCH:
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
            main_process_only=True,
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


def build_pipeline(accelerator, denoiser, noise_scheduler) -> CondDDPMPipeline:
    model = accelerator.unwrap_model(denoiser)
    return CondDDPMPipeline(unet=model.unet, label_embedding=model.label_embedding, scheduler=noise_scheduler)


class StopRequested(Exception):
    """Raised inside validation sampling when a stop was requested, to abandon the samples."""


class StopRequest:
    """Turns SIGTERM / SIGINT (a pre-empted job, Ctrl-C) into a flag the loop checks at each step boundary, and that
    ends validation sampling at its next step. A second signal is not caught: it stops the run at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        self.restore()

    def check_during_sampling(self, pipeline, step, timestep, tensors):
        """A pipeline's `callback_on_step_end`: sampling a validation grid takes minutes with 1000 DDPM steps."""
        if self.received is not None:
            raise StopRequested(self.received)

    def now(self, accelerator, sync_point: bool) -> bool:
        """Whether to stop at this step. All processes must stop at the same step, so with several they agree
        through a collective, at the sync points (logging steps) only; one process decides alone, at every step."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if self.received is not None:
            accelerator.set_trigger()
        return sync_point and accelerator.check_trigger()

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_replicas_agree(accelerator, model):
    """DDP keeps every process's weights identical; check it once at the end, since diverged replicas fail silently."""
    fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = accelerator.gather(fingerprint[None])
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise ValueError("the processes finished with different weights: the distributed launch is broken")
    logger.info(f"the weights are identical on all {accelerator.num_processes} processes", main_process_only=True)


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
            main_process_only=True,
        )


def make_accelerator(args, output_dir: Path) -> Accelerator:
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        # The same shuffle on every process (each takes its own shard of it), reproducible per epoch on resume.
        # non_blocking: with pinned batches (below), copying one to the GPU does not wait for the GPU to finish.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
        dynamo_backend="inductor" if args.compile else "no",
    )


def leave_stopping_to_the_main_process(worker_id: int):
    """A DataLoader worker's `worker_init_fn`. Ctrl-C, `timeout`, `kill -- -PGID` and Slurm signal every process of a
    job, and a worker killed by that makes the main process crash instead of stopping with a checkpoint
    (`StopRequest`). So workers ignore SIGINT, and take SIGTERM from the main process only: it sends one to end them
    as it exits. (torch's own worker handler draws the same line, but dies of anyone else's SIGTERM.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Linux; macOS and Windows keep torch's handler
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the block
        threading.Thread(target=exit_on_sigterm_from_the_main_process, name="sigterm-filter", daemon=True).start()


def exit_on_sigterm_from_the_main_process():
    main_process = multiprocessing.parent_process().pid  # not os.getppid(): under forkserver that is the server
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_process:
        pass
    os._exit(0)


def make_dataloader(args, accelerator, dataset) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
        worker_init_fn=leave_stopping_to_the_main_process,
        # A copy from pageable memory makes the CPU wait until the GPU has run every queued kernel, once per step.
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: creating a loader must not draw from the global RNG that noise and flips use,
        # or a resumed run would draw different noise than an uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
    )


def make_emas(args, denoiser) -> dict[str, EMAModel]:
    """One EMA copy per trained module (none without `--use_ema`), keyed by its attribute name on `Denoiser`."""
    if not args.use_ema:
        return {}
    return {
        name: EMAModel(
            module.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=type(module),
            model_config=module.config,
            foreach=True,  # all tensors at once: tensor by tensor, the EMA cost a GPU run 9% of its images/s
        )
        for name, module in (("unet", denoiser.unet), ("label_embedding", denoiser.label_embedding))
    }


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


def make_optimizer(args, accelerator, denoiser) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        denoiser.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=accelerator.device.type == "cuda",
    )


def resume(args, accelerator, output_dir: Path, training_state: dict, max_train_steps: int) -> int:
    """Load weights, EMA, optimizer, LR schedule and RNG states from the checkpoint asked for; return its step
    (0 when there is none to resume)."""
    if not args.resume_from_checkpoint:
        return 0
    checkpoint = checkpoint_to_resume(args.resume_from_checkpoint, output_dir)
    if checkpoint is None:
        logger.warning(f"no finished checkpoint in {output_dir}; starting a new run", main_process_only=True)
        return 0
    step = check_resumable(checkpoint, training_state)
    if step > max_train_steps:
        raise ValueError(
            f"{checkpoint} is at step {step}, past the {max_train_steps} steps this run is asked for; raise"
            " --max_train_steps to continue it"
        )
    if args.use_ema and not (checkpoint / "ema").is_dir():
        raise ValueError(
            f"{checkpoint} holds no EMA weights (its run was trained with --no-use_ema); resume it with --no-use_ema"
        )
    accelerator.load_state(str(checkpoint))
    logger.info(f"resumed from {checkpoint} at step {step}", main_process_only=True)
    return step


def epoch_batches(accelerator, train_dataloader, epoch: int, skip: int):
    """The batches of `epoch`, less the first `skip` ones that a resumed run already trained on."""
    train_dataloader.set_epoch(epoch)
    if not skip:
        return train_dataloader
    batches = accelerator.skip_first_batches(train_dataloader, skip)
    batches.set_epoch(epoch)  # a fresh loader starts at epoch 0, which would reshuffle differently
    return batches


def diffusion_loss(args, denoiser, noise_scheduler, batch) -> torch.Tensor:
    """The denoising loss of one batch: noise at random timesteps, the null label at random for classifier-free
    guidance, the target of `--prediction_type`, min-SNR weighting with `--snr_gamma`."""
    images = batch["pixel_values"].to(memory_format=torch.channels_last)
    labels = batch["labels"]
    if args.random_flip:  # here, not in the data workers, so the global RNG (saved in checkpoints) decides
        flip = torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5
        images = torch.where(flip, images.flip(-1), images)
    noise = torch.randn_like(images)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (len(images),), device=images.device)
    noisy_images = noise_scheduler.add_noise(images, noise, timesteps)
    keep = torch.rand(len(labels), 1, device=labels.device) >= args.condition_dropout
    target = noise if args.prediction_type == "epsilon" else noise_scheduler.get_velocity(images, noise, timesteps)
    prediction = denoiser(noisy_images, timesteps, labels * keep)
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma is not None:  # min-SNR weighting (Hang et al. 2023)
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=args.snr_gamma) / (snr if args.prediction_type == "epsilon" else snr + 1)
        loss = loss * weight
    return loss.mean()


def training_step(args, accelerator, denoiser, noise_scheduler, optimizer, lr_scheduler, batch) -> torch.Tensor:
    """One forward and backward pass; the optimizer steps once every `--gradient_accumulation_steps` of them."""
    with accelerator.accumulate(denoiser):
        loss = diffusion_loss(args, denoiser, noise_scheduler, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            accelerator.clip_grad_norm_(denoiser.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def update_ema(accelerator, denoiser, emas):
    model = accelerator.unwrap_model(denoiser)
    for name, ema in emas.items():
        ema.step(getattr(model, name).parameters())


class LossLog:
    """The training loss, summed on the device between logging steps: reading it makes the CPU wait for the GPU,
    so that happens once per logging interval (and before each checkpoint), never once per step."""

    def __init__(self, accelerator, output_dir: Path, step: int):
        self.accelerator, self.output_dir = accelerator, output_dir
        self.total = torch.zeros((), device=accelerator.device)
        self.count = 0
        self.interval_start = time.perf_counter()
        self.verified_step = step  # the last step whose loss was checked to be finite

    def add(self, loss: torch.Tensor):
        self.total += loss
        self.count += 1

    def check_finite(self, step: int):
        """Stop on a loss that is not finite since the last check (called before saving: never save diverged
        weights, they would become the "last good" checkpoint)."""
        check_finite(self.accelerator.gather(self.total).sum().item(), step, self.output_dir, self.verified_step)
        self.verified_step = step

    def read(self, step: int, samples_per_batch: int) -> tuple[float, float]:
        """The mean loss over the interval's steps and all processes, and the images per second; starts the next
        interval."""
        mean_loss = self.accelerator.gather(self.total / self.count).mean().item()
        check_finite(mean_loss, step, self.output_dir, self.verified_step)
        self.verified_step = step
        seconds, self.interval_start = time.perf_counter() - self.interval_start, time.perf_counter()
        images_per_second = self.count * samples_per_batch / seconds
        self.total.zero_()
        self.count = 0
        return mean_loss, images_per_second


def log_step(args, accelerator, loss_log, progress, lr_scheduler, emas, epoch: int, step: int):
    """Log the loss, learning rate and speed of the interval that ends at `step` to the trackers and the progress
    bar."""
    mean_loss, images_per_second = loss_log.read(step, args.train_batch_size * accelerator.num_processes)
    logs = {
        "loss": mean_loss,
        "lr": lr_scheduler.get_last_lr()[0],
        "epoch": epoch,
        "images_per_second": images_per_second,
    }
    if emas:
        logs["ema_decay"] = emas["unet"].cur_decay_value
    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_second:.1f}")
    accelerator.log(logs, step=step)


@contextmanager
def ema_weights(accelerator, denoiser, emas):
    """Swap the EMA weights into the model for the duration of a `with` block (no-op without EMA)."""
    model = accelerator.unwrap_model(denoiser)
    for name, ema in emas.items():
        ema.store(getattr(model, name).parameters())
        ema.copy_to(getattr(model, name).parameters())
    try:
        yield
    finally:
        for name, ema in emas.items():
            ema.restore(getattr(model, name).parameters())


def sample(args, pipeline, label_sets, callback_on_step_end=None) -> torch.Tensor:
    """8-bit images of `label_sets` with the sampler, steps and guidance of the validation flags."""
    sampler = CondDDPMPipeline(pipeline.unet, pipeline.label_embedding, pipeline.scheduler)
    set_scheduler(sampler, args.validation_scheduler)
    sampler.set_progress_bar_config(disable=True)
    return generate(
        sampler,
        label_sets,
        args.ddpm_num_inference_steps,
        args.guidance_scale,
        args.seed,
        args.eval_batch_size,
        callback_on_step_end,
    )


def validate(args, accelerator, pipeline, label_sets, evaluator, epoch, step, best_accuracy, stop) -> float:
    """Sample the held-out validation label sets into a captioned grid, and score them if an evaluator is given:
    a new best accuracy saves the pipeline to `best/`. Returns the best accuracy so far. A stop request ends the
    sampling (`StopRequested`)."""
    images = sample(args, pipeline, label_sets, stop.check_during_sampling)
    grid_dir = Path(args.output_dir) / "samples"
    grid = save_captioned_grid(grid_dir / f"epoch_{epoch:04d}.png", images, label_sets)
    atomic_write(grid_dir / "latest.png", lambda temporary: shutil.copyfile(grid, temporary))
    with Image.open(grid) as picture:  # the captioned grid, as one 8-bit (1, H, W, 3) image, to every tracker
        captioned = np.asarray(picture)[None]
    for tracker in accelerator.trackers:
        options = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
        tracker.log_images({"validation": captioned}, step, **options)
    if evaluator is None:
        return best_accuracy
    accuracy = evaluate(evaluator, images, multi_hot(label_sets, pipeline.class_names))
    accelerator.log({"validation_accuracy": accuracy}, step=step)
    logger.info(f"epoch {epoch}: accuracy on {len(label_sets)} held-out label sets {accuracy:.4f}")
    if accuracy <= best_accuracy:
        return best_accuracy
    best = Path(args.output_dir) / "best"
    with staged_directory(best, overwrite=True) as folder:
        pipeline.save_pretrained(folder)
    logger.info(f"new best validation accuracy {accuracy:.4f}: pipeline saved to {best}")
    return accuracy


def final_scores(args, pipeline, evaluator) -> dict:
    """Accuracy on test.json and new_test.json, for the record only: no choice made by training depends on it."""
    scores = {}
    for split, path in (("test", TEST_JSON), ("new_test", NEW_TEST_JSON)):
        label_sets = read_label_sets(path, pipeline.class_names)
        scores[split] = evaluate(
            evaluator, sample(args, pipeline, label_sets), multi_hot(label_sets, pipeline.class_names)
        )
    scores.update(
        scheduler=args.validation_scheduler,
        num_inference_steps=args.ddpm_num_inference_steps,
        guidance_scale=args.guidance_scale,
    )
    logger.info(f"test accuracy {scores['test']:.4f}, new_test accuracy {scores['new_test']:.4f}")
    return scores


def sampling_command(folder: Path) -> str:
    """The model card's usage snippet as one shell line: it draws scene.png from the saved pipeline with plain
    diffusers and the default sampler."""
    statements = "; ".join(line for line in usage_snippet(str(folder)).splitlines() if line)
    return f"python -c {shlex.quote(statements)}"


def save_final(args, accelerator, pipeline, evaluator, global_step: int, repo_id: str | None):
    """Save the pipeline with its model card into `--output_dir` (and push it to `repo_id`, if given)."""
    output_dir = Path(args.output_dir)
    metrics = final_scores(args, pipeline, evaluator) if evaluator is not None else {}
    with staged_contents(output_dir, marker="model_index.json") as folder:
        pipeline.save_pretrained(folder)
        location = repo_id or str(output_dir.resolve())
        settings = {**vars(args), "mixed_precision": accelerator.mixed_precision}
        grid = output_dir / "samples" / "latest.png"
        hub.write_model_card(folder, pipeline, settings, metrics, grid, global_step, location, repo_id, args.hub_token)
    print(f"Pipeline saved to {output_dir}; its latest sample grid is {grid}")
    print(f"Draw a scene with it (plain diffusers): {sampling_command(output_dir)}")
    if repo_id:
        url = hub.push(output_dir, repo_id, args.hub_token, args.logging_dir)
        print(f"Pushed to {url}")


# --- Training ------------------------------------------------------------------------------------------------------


def main(args):
    with ExitStack() as held:  # what the run holds until it ends, however it ends: its output folder's lock
        return train(args, held)


def train(args, held: ExitStack):
    # Set-up: processes, seed, logging.
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    check_launch(accelerator)
    check_mixed_precision(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    check_cpu_threads(accelerator)
    set_seed(args.seed, device_specific=True)  # one seed per process, so noise differs across processes
    repo_id = None
    if accelerator.is_main_process:
        if args.push_to_hub:  # fail now, not after hours of training
            repo_id = hub.prepare_repo(args.hub_model_id or output_dir.name, args.hub_token, args.hub_private_repo)
        held.enter_context(claim_folder(output_dir))  # before anything is written, so a second run writes nothing
        if args.overwrite_output_dir:
            clear_earlier_run(output_dir)

    # Data. The main process renders or checks it first; the others then read the finished result.
    with accelerator.main_process_first():
        dataset = repeat_same_colour_pairs(load_training_data(args), args.same_colour_repeats)
    class_names = dataset_class_names(dataset)
    validation_labels = held_out_label_sets(dataset, args.num_validation_images, args.seed)
    train_dataloader = make_dataloader(args, accelerator, dataset)
    if len(train_dataloader) == 0:  # every batch is whole (drop_last), so a batch larger than the data makes none
        raise ValueError(
            f"--train_batch_size {args.train_batch_size} is larger than the dataset ({len(dataset)} images); lower it"
            " or use more data"
        )

    # Model, EMA copy, noise schedule.
    pipeline = CondDDPMPipeline.from_preset(
        args.preset, class_names, args.resolution, args.ddpm_num_steps, args.ddpm_beta_schedule, args.prediction_type
    )
    noise_scheduler = pipeline.scheduler
    denoiser = Denoiser(pipeline.unet, pipeline.label_embedding).to(memory_format=torch.channels_last)
    emas = make_emas(args, denoiser)
    training_state = {
        "preset": args.preset,
        "resolution": args.resolution,
        "class_names": class_names,
        "prediction_type": args.prediction_type,
        "ddpm_num_steps": args.ddpm_num_steps,
        "ddpm_beta_schedule": args.ddpm_beta_schedule,
        "samples_per_step": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,  # each saves its random states: a resume needs them all
    }
    register_checkpoint_hooks(accelerator, noise_scheduler, emas)

    # Optimizer and learning-rate schedule.
    optimizer = make_optimizer(args, accelerator, denoiser)
    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    denoiser, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        denoiser, optimizer, train_dataloader, lr_scheduler
    )
    for ema in emas.values():
        ema.to(accelerator.device)
    evaluator = None
    if args.evaluator_checkpoint and accelerator.is_main_process:
        evaluator = load_evaluator(args.evaluator_checkpoint, len(class_names), accelerator.device)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "cond_ddpm",
            config={k: v for k, v in vars(args).items() if k != "hub_token" and isinstance(v, (int, float, str, bool))},
        )

    # Resume: the training state, then the data order up to the saved step.
    global_step = resume(args, accelerator, output_dir, training_state, max_train_steps)
    if global_step == max_train_steps:  # e.g. a run stopped while saving its pipeline: only the finish is left
        logger.info(f"step {global_step} is the last one: saving the pipeline without training", main_process_only=True)
    first_epoch = global_step // steps_per_epoch
    resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    # The loop.
    logger.info(
        f"{len(dataset)} images, {max_train_steps} steps of {args.train_batch_size} x {accelerator.num_processes}"
        f" processes x {args.gradient_accumulation_steps} accumulation",
        main_process_only=True,
    )
    stop = StopRequest()
    held.callback(stop.restore)  # a run that fails must not leave its handlers behind (in-process callers)
    progress = tqdm(
        range(max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process, desc="steps"
    )
    loss_log = LossLog(accelerator, output_dir, global_step)
    best_accuracy = -1.0
    for epoch in range(first_epoch, num_epochs if global_step < max_train_steps else first_epoch):
        denoiser.train()
        skip = resume_batches if epoch == first_epoch else 0
        for batch in epoch_batches(accelerator, train_dataloader, epoch, skip):
            loss_log.add(training_step(args, accelerator, denoiser, noise_scheduler, optimizer, lr_scheduler, batch))
            if not accelerator.sync_gradients:
                continue

            # The end of an optimizer step: EMA, logging, checkpoint, stop request.
            update_ema(accelerator, denoiser, emas)
            global_step += 1
            progress.update(1)
            sync_point = global_step % args.logging_steps == 0 or global_step == max_train_steps
            if sync_point:
                log_step(args, accelerator, loss_log, progress, lr_scheduler, emas, epoch, global_step)
            stop_now = stop.now(accelerator, sync_point)
            if stop_now or (args.checkpointing_steps and global_step % args.checkpointing_steps == 0):
                loss_log.check_finite(global_step)
                check_finite_weights(denoiser, global_step, output_dir)
                save_checkpoint(
                    accelerator,
                    output_dir,
                    global_step,
                    training_state,
                    args.checkpoints_total_limit,
                    expected_checkpoint_size(denoiser, emas),
                )
            if stop_now:
                logger.info(f"stop requested: checkpoint-{global_step} saved, stopping", main_process_only=True)
                stop.restore()
                accelerator.end_training()
                return None
            if global_step >= max_train_steps:
                break

        last_epoch = epoch == num_epochs - 1 or global_step >= max_train_steps
        if accelerator.is_main_process and ((epoch + 1) % args.save_images_epochs == 0 or last_epoch):
            try:
                with ema_weights(accelerator, denoiser, emas):
                    pipeline = build_pipeline(accelerator, denoiser, noise_scheduler)
                    best_accuracy = validate(
                        args,
                        accelerator,
                        pipeline,
                        validation_labels,
                        evaluator,
                        epoch,
                        global_step,
                        best_accuracy,
                        stop,
                    )
            except StopRequested:  # the next step boundary saves a checkpoint and stops
                logger.info("stop requested: validation samples abandoned")
        accelerator.wait_for_everyone()
        if global_step >= max_train_steps:
            break

    # Finish: the EMA weights are the ones saved.
    stop.restore()
    if accelerator.num_processes > 1:
        check_replicas_agree(accelerator, denoiser)
    if accelerator.is_main_process:
        with ema_weights(accelerator, denoiser, emas):
            scorer = evaluator if stop.received is None else None  # a stop request skips the final scores
            check_finite_weights(denoiser, global_step, output_dir)
            pipeline = build_pipeline(accelerator, denoiser, noise_scheduler)
            save_final(args, accelerator, pipeline, scorer, global_step, repo_id)
    progress.close()
    accelerator.end_training()
    return output_dir


# --- Command line: the defaults train the GPU model on real i-CLEVR-sized data ---------------------------------------


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=DEFAULT_RECIPE,
        help="a shipped recipe (cond_ddpm/recipes.py) whose values are the defaults of the flags it names",
    )
    data = parser.add_argument_group("data (none given: the built-in synthetic i-CLEVR set)")
    data.add_argument("--train_data_dir", help="folder of i-CLEVR images (real layout: also give --train_json)")
    data.add_argument("--train_json", help="file name -> list of object names")
    data.add_argument("--objects_json", default=str(OBJECTS_JSON), help="object name -> index")
    data.add_argument("--dataset_name", help="a Hub dataset, or a local save_to_disk / imagefolder path")
    data.add_argument("--dataset_config_name", help="the configuration of --dataset_name, if it has several")
    data.add_argument("--cache_dir", help="where Hub datasets are downloaded (default: datasets' own cache)")
    data.add_argument("--image_column", default="image", help="the image column of --dataset_name")
    data.add_argument("--label_column", default="objects", help="per image: a list of object names or ClassLabels")
    data.add_argument(
        "--synthetic_scenes", type=cli.integer(1, MAX_SCENES), help="size of the built-in set (3 images each)"
    )
    data.add_argument("--resolution", type=cli.resolution, help="images are resized to this square size")
    data.add_argument(
        "--random_flip",
        action=argparse.BooleanOptionalAction,
        help="mirror half the images; off in the recipes: the built-in scenes are lit from one side, so a mirrored"
        " scene shows a lighting that none of them has (docs/experiments.md)",
    )
    data.add_argument(
        "--same_colour_repeats",
        type=cli.positive_int,
        help="show each image with two objects of one colour this many times per epoch (1: once, as every other"
        " image); new_test.json is mostly such pairs, train.json 11%%",
    )
    data.add_argument("--dataloader_num_workers", type=cli.integer(0, 256), help="data loading processes (0: inline)")

    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), help="the model size (PRESETS in pipeline_cond_ddpm.py)")
    model.add_argument("--ddpm_num_steps", type=cli.positive_int, default=1000, help="diffusion steps in training")
    model.add_argument(
        "--ddpm_beta_schedule",
        default="squaredcos_cap_v2",
        choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
        help="the noise schedule",
    )
    model.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], help="what the UNet predicts")
    model.add_argument(
        "--condition_dropout", type=cli.probability, default=0.1, help="how often to train on the null label"
    )
    model.add_argument("--snr_gamma", type=cli.non_negative_float, help="min-SNR loss weighting; 0 turns it off")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=cli.positive_int, help="images per step, per process")
    optim.add_argument("--num_epochs", type=cli.positive_int, default=300, help="passes over the data")
    optim.add_argument("--max_train_steps", type=cli.positive_int, help="optimisation steps; overrides --num_epochs")
    optim.add_argument(
        "--gradient_accumulation_steps", type=cli.positive_int, default=1, help="batches summed per optimiser step"
    )
    optim.add_argument(  # at most 1: beyond it each step throws the weights far past anything trained
        "--learning_rate",
        type=cli.number(0, 1, low_open=True, what="a learning rate"),
        help="AdamW's peak learning rate",
    )
    optim.add_argument(
        "--lr_scheduler",
        default="cosine",
        choices=["linear", "cosine", "constant", "constant_with_warmup"],
        help="the learning-rate schedule after warm-up",
    )
    optim.add_argument("--lr_warmup_steps", type=cli.non_negative_int, help="steps of linear learning-rate warm-up")
    optim.add_argument("--adam_beta1", type=cli.probability, default=0.9, help="AdamW's first-moment decay")
    optim.add_argument("--adam_beta2", type=cli.probability, default=0.999, help="AdamW's second-moment decay")
    optim.add_argument(
        "--adam_weight_decay", type=cli.non_negative_float, default=0.0, help="AdamW's decoupled weight decay"
    )
    optim.add_argument("--adam_epsilon", type=cli.positive_float, default=1e-8, help="AdamW's denominator epsilon")
    optim.add_argument(
        "--max_grad_norm", type=cli.non_negative_float, default=1.0, help="gradient clipping norm; 0 turns it off"
    )
    optim.add_argument(
        "--use_ema", action=argparse.BooleanOptionalAction, default=True, help="keep and save EMA weights"
    )
    optim.add_argument(
        "--ema_inv_gamma", type=cli.positive_float, default=1.0, help="EMA warm-up: inverse multiplicative factor"
    )
    optim.add_argument("--ema_power", type=cli.positive_float, default=3 / 4, help="EMA warm-up: exponential factor")
    optim.add_argument("--ema_max_decay", type=cli.number(0, 1), default=0.9999, help="the EMA decay it warms up to")
    optim.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        help="bf16, or fp16 with Accelerate's loss scaling, on a GPU; bf16 or no on a CPU",
    )
    optim.add_argument("--compile", action="store_true", help="torch.compile the model")
    optim.add_argument(
        "--seed",
        type=cli.seed,
        default=0,
        help="seeds the weights, noise and data order; without a dataset, also which built-in synthetic set is"
        " rendered",
    )

    run = parser.add_argument_group("checkpoints, logging, samples")
    run.add_argument("--output_dir", default="cond-ddpm-iclevr", help="the pipeline, checkpoints, samples and logs")
    run.add_argument("--overwrite_output_dir", action="store_true", help="train into a non-empty --output_dir")
    run.add_argument(
        "--checkpointing_steps", type=cli.non_negative_int, help="save the training state every N steps; 0: never"
    )
    run.add_argument(
        "--checkpoints_total_limit", type=cli.positive_int, default=None, help="keep only the newest N checkpoints"
    )
    run.add_argument(
        "--resume_from_checkpoint",
        help='"latest", a checkpoint folder, or the name of one inside --output_dir (e.g. checkpoint-2000)',
    )
    run.add_argument(
        "--logger", default="tensorboard", choices=["tensorboard", "wandb", "none"], help="the experiment tracker"
    )
    run.add_argument("--logging_dir", default="logs", help="the tracker's folder, inside --output_dir")
    run.add_argument("--logging_steps", type=cli.positive_int, default=50, help="log the mean loss every N steps")
    run.add_argument("--save_images_epochs", type=cli.positive_int, help="draw validation samples every N epochs")
    run.add_argument(
        "--num_validation_images", type=cli.positive_int, default=32, help="held-out label sets drawn each time"
    )
    run.add_argument("--eval_batch_size", type=cli.positive_int, default=64, help="images per sampling batch")
    run.add_argument(
        "--validation_scheduler", default=DEFAULT_SCHEDULER, choices=sorted(SCHEDULERS), help="sampler for samples"
    )
    run.add_argument(
        "--ddpm_num_inference_steps",
        type=cli.positive_int,
        default=DEFAULT_NUM_INFERENCE_STEPS,
        help="sampling steps for samples",
    )
    run.add_argument(
        "--guidance_scale",
        type=cli.guidance_scale,
        default=DEFAULT_GUIDANCE_SCALE,
        help="classifier-free guidance for samples",
    )
    run.add_argument("--evaluator_checkpoint", help="ResNet18 evaluator ({'model': state_dict}) for accuracy")

    hub_args = parser.add_argument_group("Hugging Face Hub")
    hub_args.add_argument("--push_to_hub", action="store_true", help="upload the trained pipeline and its card")
    hub_args.add_argument("--hub_model_id", help="the repository (default: the --output_dir folder name)")
    hub_args.add_argument("--hub_private_repo", action="store_true", help="create the repository private")
    hub_args.add_argument("--hub_token", help="default: the token of `hf auth login` or HF_TOKEN")
    parser.set_defaults(**RECIPES[DEFAULT_RECIPE])
    return parser


def parse_args(argv=None):
    parser = build_parser()
    # The recipe first (without --help, so that `--recipe cpu --help` shows the cpu recipe's defaults).
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE)
    parser.set_defaults(**RECIPES[recipe.parse_known_args(argv)[0].recipe])
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Errors a user can make, caught before any work starts."""
    if args.dataset_name and args.train_data_dir:
        parser.error("give either --dataset_name or --train_data_dir, not both")
    if bool(args.train_data_dir) != bool(args.train_json):
        parser.error("--train_data_dir and --train_json go together (the real i-CLEVR layout)")
    if args.objects_json != str(OBJECTS_JSON) and not (args.train_data_dir or args.dataset_name):
        parser.error(
            f"--objects_json {args.objects_json} goes with --train_data_dir or --dataset_name; the built-in synthetic"
            " set brings its own"
        )
    levels = len(PRESETS[args.preset]["block_out_channels"]) - 1
    if args.resolution % 2**levels:
        parser.error(f"--resolution {args.resolution} must be a multiple of {2**levels} for the {args.preset!r} preset")
    if args.snr_gamma == 0:
        args.snr_gamma = None
    if args.ddpm_num_inference_steps > args.ddpm_num_steps:
        parser.error(
            f"--ddpm_num_inference_steps {args.ddpm_num_inference_steps} exceeds the {args.ddpm_num_steps} steps of the"
            " noise schedule (--ddpm_num_steps)"
        )
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir removes the checkpoints that --resume_from_checkpoint would continue")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output_dir {output_dir} exists and is not a folder")
    logging_dir = Path(args.logging_dir)
    if not logging_dir.parts or logging_dir.is_absolute() or ".." in logging_dir.parts:
        parser.error(f"--logging_dir {args.logging_dir!r} must name a folder inside --output_dir, such as logs")
    logs = Path(args.logging_dir).parts[0]  # a nested --logging_dir (a/b) lives in the folder `a`
    occupied = output_dir.is_dir() and any(p.name not in (logs, LOCK_NAME) for p in output_dir.iterdir())
    if occupied and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        parser.error(
            f"--output_dir {output_dir} is not empty; pass --resume_from_checkpoint latest to continue its run,"
            " --overwrite_output_dir to replace it, or choose another folder"
        )
    if args.resume_from_checkpoint not in (None, "latest"):
        args.resume_from_checkpoint = str(checkpoint_folder(parser, args.resume_from_checkpoint, output_dir))
    if args.logger == "wandb" and not is_wandb_available():
        parser.error("--logger wandb needs wandb: pip install wandb (or choose --logger tensorboard)")
    if args.evaluator_checkpoint and not Path(args.evaluator_checkpoint).is_file():
        parser.error(f"--evaluator_checkpoint {args.evaluator_checkpoint} does not exist")


def checkpoint_folder(parser, name: str, output_dir: Path) -> Path:
    """A checkpoint given as a folder, or as a name inside --output_dir (`checkpoint-2000`), as diffusers takes it."""
    for folder in (Path(name), output_dir / name):
        if folder.is_dir():
            return folder
    parser.error(
        f"--resume_from_checkpoint {name} is neither a folder, nor one in --output_dir {output_dir}, nor 'latest'"
    )


def entry_point():
    """The `cond-ddpm-train` console script: `python train_conditional_ddpm.py` installed on the PATH."""
    cli.run(main, parse_args())


if __name__ == "__main__":
    entry_point()
