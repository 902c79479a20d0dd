"""The set-up and the step bookkeeping both training scripts share, driven by the flags of `flags.py`: the run's start,
its data, loader, optimizer and learning-rate schedule, and what follows every optimizer step (the count, the logged
loss, checkpoints, a stop request)."""

import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from cond_ddpm import hub
from cond_ddpm.atomic_io import claim_folder
from cond_ddpm.data import default_synthetic_dataset, load_hub_dataset, load_iclevr_dataset, repeat_same_colour_pairs
from cond_ddpm.evaluator import load_evaluator
from cond_ddpm.training.checkpoints import (
    check_finite,
    check_finite_weights,
    clear_earlier_run,
    expected_checkpoint_size,
    save_checkpoint,
)
from cond_ddpm.training.guards import check_cpu_threads, check_launch, check_mixed_precision, check_replicas_agree
from cond_ddpm.training.stopping import StopRequest, leave_stopping_to_the_main_process

logger = logging.getLogger(__name__)


def start_run(args, held: ExitStack) -> tuple[Accelerator, str | None]:
    """The run's processes, checks, logging and seed; on the main process, the Hub repository (`--push_to_hub`:
    checked now, not after hours of training) and the output folder's lock, held by `held` until the run ends.
    Returns the accelerator and the repository id (None without `--push_to_hub`)."""
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    check_launch(accelerator)
    check_mixed_precision(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    # The run's machinery logs through plain loggers; as in diffusers' scripts, only the main process speaks.
    logging.getLogger("cond_ddpm").setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)
    check_cpu_threads(accelerator)
    set_seed(args.seed, device_specific=True)  # one seed per process, so noise differs across processes
    repo_id = None
    if accelerator.is_main_process:
        if args.push_to_hub:
            repo_id = hub.prepare_repo(args.hub_model_id or output_dir.name, args.hub_token, args.hub_private_repo)
        held.enter_context(claim_folder(output_dir))  # before anything is written, so a second run writes nothing
        if args.overwrite_output_dir:
            clear_earlier_run(output_dir)
    return accelerator, repo_id


def load_training_data(args, resolution: int):
    """The training images at `resolution`, with two-object images of one colour repeated `--same_colour_repeats`
    times."""
    if args.dataset_name:
        dataset = load_hub_dataset(
            args.dataset_name,
            resolution,
            args.image_column,
            args.label_column,
            args.objects_json,
            config_name=args.dataset_config_name,
            cache_dir=args.cache_dir,
        )
    elif args.train_data_dir:
        dataset = load_iclevr_dataset(args.train_data_dir, args.train_json, args.objects_json, resolution)
    else:
        folder = default_synthetic_dataset(args.synthetic_scenes, args.seed)
        dataset = load_iclevr_dataset(folder / "images", folder / "train.json", folder / "objects.json", resolution)
    return repeat_same_colour_pairs(dataset, args.same_colour_repeats)


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


def make_dataloader(args, accelerator, dataset) -> torch.utils.data.DataLoader:
    loader = torch.utils.data.DataLoader(
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
    if len(loader) == 0:  # every batch is whole (drop_last), so a batch larger than the data makes none
        raise ValueError(
            f"--train_batch_size {args.train_batch_size} is larger than the dataset ({len(dataset)} images); lower it"
            " or use more data"
        )
    return loader


def make_optimizer(args, accelerator, parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=accelerator.device.type == "cuda",
    )


@dataclass(frozen=True)
class StepSchedule:
    """How long a run is: optimizer steps per epoch (on each process), steps in all, epochs in all."""

    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int


def step_schedule(args, accelerator, train_dataloader) -> StepSchedule:
    """The run's length: `--max_train_steps`, or `--num_epochs` worth of steps."""
    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    return StepSchedule(steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch))


def make_lr_scheduler(args, accelerator, optimizer, max_train_steps: int):
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )


def run_state(args, accelerator) -> dict:
    """What every checkpoint records of the run's shape, beside the settings of its script."""
    return {
        "samples_per_step": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,  # each saves its random states: a resume needs them all
    }


def prepare_run(args, accelerator, model, optimizer, train_dataloader, lr_scheduler, emas, num_classes, project):
    """Hand the model, optimizer, loader and schedule to Accelerate and the EMA copies to the device; on the main
    process, load the evaluator of `--evaluator_checkpoint` (else None) and start the trackers, in `project`. Returns
    the prepared four and the evaluator."""
    prepared = accelerator.prepare(model, optimizer, train_dataloader, lr_scheduler)
    for ema in emas.values():
        ema.to(accelerator.device)
    evaluator = None
    if accelerator.is_main_process:
        if args.evaluator_checkpoint:
            evaluator = load_evaluator(args.evaluator_checkpoint, num_classes, accelerator.device)
        # The plain values of the flags, never the Hub token.
        config = {k: v for k, v in vars(args).items() if k != "hub_token" and isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project, config=config)
    return (*prepared, evaluator)


def backward_and_step(accelerator, model, loss, optimizer, lr_scheduler, max_grad_norm: float):
    """Inside `accelerator.accumulate(model)`: the backward pass, then, once every `--gradient_accumulation_steps`,
    gradient clipping (`max_grad_norm`; 0: none) and the optimizer and schedule steps."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def epoch_batches(accelerator, train_dataloader, epoch: int, skip: int):
    """The batches of `epoch`, less the first `skip` ones that a resumed run already trained on."""
    train_dataloader.set_epoch(epoch)
    if not skip:
        return train_dataloader
    batches = accelerator.skip_first_batches(train_dataloader, skip)
    batches.set_epoch(epoch)  # a fresh loader starts at epoch 0, which would reshuffle differently
    return batches


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


class Steps:
    """A run's steps, from the one it resumed at: the epochs and batches left, and what follows every optimizer step
    (the step count and progress bar, the loss, learning rate and speed logged every `--logging_steps`, a checkpoint
    every `--checkpointing_steps` or when a stop is asked for, SIGTERM or Ctrl-C, and the stop itself). `model` is the
    prepared module the optimizer trains; `emas` its EMA copies."""

    def __init__(self, args, accelerator, model, emas, lr_scheduler, schedule: StepSchedule, training_state, step):
        self.args, self.accelerator, self.model, self.emas = args, accelerator, model, emas
        self.lr_scheduler, self.training_state = lr_scheduler, training_state
        self.steps_per_epoch, self.max_train_steps = schedule.steps_per_epoch, schedule.max_train_steps
        self.num_epochs, self.step, self.resumed_step = schedule.num_epochs, step, step
        self.output_dir = Path(args.output_dir)
        self.stop = StopRequest()
        self.loss_log = LossLog(accelerator, self.output_dir, step)
        self.progress = tqdm(
            range(self.max_train_steps), initial=step, disable=not accelerator.is_local_main_process, desc="steps"
        )

    def announce(self, what: str):
        """Log what the run trains on, and how long: `what`, then its steps and their batch."""
        args = self.args
        logger.info(
            f"{what}, {self.max_train_steps} steps of {args.train_batch_size} x {self.accelerator.num_processes}"
            f" processes x {args.gradient_accumulation_steps} accumulation"
        )

    @property
    def done(self) -> bool:
        return self.step >= self.max_train_steps

    def epochs(self) -> range:
        """The epochs left: from the one the run resumed in (none when its last step is done)."""
        first = self.resumed_step // self.steps_per_epoch
        return range(first, self.num_epochs if not self.done else first)

    def batches(self, train_dataloader, epoch: int):
        """The batches of `epoch`, less those a resumed run already trained on."""
        resumed_in = self.resumed_step // self.steps_per_epoch
        skip = (self.resumed_step % self.steps_per_epoch) * self.args.gradient_accumulation_steps
        return epoch_batches(self.accelerator, train_dataloader, epoch, skip if epoch == resumed_in else 0)

    def validation_due(self, epoch: int) -> bool:
        """Whether the main process draws validation samples after `epoch`: every `--save_images_epochs`, and last."""
        last = epoch == self.num_epochs - 1 or self.done
        return self.accelerator.is_main_process and ((epoch + 1) % self.args.save_images_epochs == 0 or last)

    def finish(self):
        """The end of the loop: the signal handlers go back, and with several processes their weights must agree."""
        self.stop.restore()
        self.progress.close()
        if self.accelerator.num_processes > 1:
            check_replicas_agree(self.accelerator, self.model)

    def after_step(self, epoch: int) -> bool:
        """Count the optimizer step just taken; return whether the run stops here, its checkpoint saved."""
        self.step += 1
        self.progress.update(1)
        sync_point = self.step % self.args.logging_steps == 0 or self.step == self.max_train_steps
        if sync_point:
            self.log(epoch)
        stop_now = self.stop.now(self.accelerator, sync_point)
        if stop_now or (self.args.checkpointing_steps and self.step % self.args.checkpointing_steps == 0):
            self.loss_log.check_finite(self.step)
            check_finite_weights(self.model, self.step, self.output_dir)
            save_checkpoint(
                self.accelerator,
                self.output_dir,
                self.step,
                self.training_state,
                self.args.checkpoints_total_limit,
                expected_checkpoint_size(self.model, self.emas),
            )
        if stop_now:
            logger.info(f"stop requested: checkpoint-{self.step} saved, stopping")
            self.stop.restore()
        return stop_now

    def log(self, epoch: int):
        """Log the loss, learning rate and speed of the interval that ends at this step to the trackers and the
        progress bar."""
        samples_per_batch = self.args.train_batch_size * self.accelerator.num_processes
        mean_loss, images_per_second = self.loss_log.read(self.step, samples_per_batch)
        logs = {
            "loss": mean_loss,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "epoch": epoch,
            "images_per_second": images_per_second,
        }
        if self.emas:
            logs["ema_decay"] = self.emas["unet"].cur_decay_value
        self.progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_second:.1f}")
        self.accelerator.log(logs, step=self.step)
