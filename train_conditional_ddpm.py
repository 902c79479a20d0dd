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
import logging
import math
import shlex
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, is_wandb_available, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from cond_ddpm import cli, hub
from cond_ddpm.atomic_io import LOCK_NAME, atomic_write, claim_folder, staged_contents, staged_directory
from cond_ddpm.data import (
    MAX_SCENES,
    NEW_TEST_JSON,
    OBJECTS_JSON,
    TEST_JSON,
    dataset_class_names,
    default_synthetic_dataset,
    held_out_label_sets,
    load_hub_dataset,
    load_iclevr_dataset,
    read_label_sets,
    repeat_same_colour_pairs,
)
from cond_ddpm.evaluator import evaluate, load_evaluator
from cond_ddpm.grids import save_captioned_grid
from cond_ddpm.recipes import DEFAULT_RECIPE, RECIPES
from cond_ddpm.sampling import generate, set_scheduler
from cond_ddpm.training.checkpoints import (
    check_finite,
    check_finite_weights,
    clear_earlier_run,
    expected_checkpoint_size,
    register_checkpoint_hooks,
    resume,
    save_checkpoint,
)
from cond_ddpm.training.ema import ema_weights, make_emas, update_ema
from cond_ddpm.training.guards import check_cpu_threads, check_launch, check_mixed_precision, check_replicas_agree
from cond_ddpm.training.objective import Denoiser, Objective, build_pipeline, diffusion_loss
from cond_ddpm.training.stopping import StopRequest, StopRequested, leave_stopping_to_the_main_process
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


# --- Set-up: data, processes, loader, optimizer -----------------------------------------------------------------------


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


def make_optimizer(args, accelerator, denoiser) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        denoiser.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=accelerator.device.type == "cuda",
    )


# --- One step: its batch, its loss and update, its log ----------------------------------------------------------------


def epoch_batches(accelerator, train_dataloader, epoch: int, skip: int):
    """The batches of `epoch`, less the first `skip` ones that a resumed run already trained on."""
    train_dataloader.set_epoch(epoch)
    if not skip:
        return train_dataloader
    batches = accelerator.skip_first_batches(train_dataloader, skip)
    batches.set_epoch(epoch)  # a fresh loader starts at epoch 0, which would reshuffle differently
    return batches


def training_step(
    accelerator, objective, denoiser, noise_scheduler, optimizer, lr_scheduler, batch, max_grad_norm: float
) -> torch.Tensor:
    """One forward and backward pass; the optimizer steps once every `--gradient_accumulation_steps` of them."""
    with accelerator.accumulate(denoiser):
        loss = diffusion_loss(objective, denoiser, noise_scheduler, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm:
            accelerator.clip_grad_norm_(denoiser.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


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


# --- Samples and the end: validation grids, best pipeline, final save -------------------------------------------------


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
    # The run's machinery logs through plain loggers; as in diffusers' scripts, only the main process speaks.
    logging.getLogger("cond_ddpm").setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)
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

    # Model, EMA copy, noise schedule, loss.
    pipeline = CondDDPMPipeline.from_preset(
        args.preset, class_names, args.resolution, args.ddpm_num_steps, args.ddpm_beta_schedule, args.prediction_type
    )
    noise_scheduler = pipeline.scheduler
    denoiser = Denoiser(pipeline.unet, pipeline.label_embedding).to(memory_format=torch.channels_last)
    emas = make_emas(denoiser, args.ema_max_decay, args.ema_inv_gamma, args.ema_power) if args.use_ema else {}
    objective = Objective(args.prediction_type, args.condition_dropout, args.snr_gamma, args.random_flip)
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
    global_step = resume(
        accelerator, args.resume_from_checkpoint, output_dir, training_state, max_train_steps, args.use_ema
    )
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
            loss = training_step(
                accelerator, objective, denoiser, noise_scheduler, optimizer, lr_scheduler, batch, args.max_grad_norm
            )
            loss_log.add(loss)
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


def build_parser(recipe: str | None = DEFAULT_RECIPE, add_help: bool = True) -> cli.ArgumentParser:
    """The training flags, with the values of `recipe` (none: no recipe) as the defaults of those it names."""
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter, add_help=add_help)
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
    optim.add_argument(
        "--num_epochs", type=cli.positive_int, help="passes over the data, in place of the recipe's --max_train_steps"
    )
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
    if recipe is not None:
        parser.set_defaults(**RECIPES[recipe])
    return parser


def parse_args(argv=None):
    # A first pass, without any recipe, reads what the command line itself gives: the recipe, whose values then
    # become the defaults (it has no --help, so that `--recipe cpu --help` shows the cpu recipe's defaults).
    given, _ = build_parser(recipe=None, add_help=False).parse_known_args(argv)
    parser = build_parser(given.recipe)
    args = parser.parse_args(argv)
    if given.num_epochs and not given.max_train_steps:  # the epochs asked for replace the recipe's step count
        args.max_train_steps = None
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
