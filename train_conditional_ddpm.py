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
from contextlib import ExitStack
from pathlib import Path

import torch
from accelerate.logging import get_logger

from cond_ddpm import cli, hub
from cond_ddpm.data import dataset_class_names, held_out_label_sets
from cond_ddpm.recipes import DEFAULT_RECIPE, RECIPES
from cond_ddpm.training.checkpoints import check_finite_weights, register_checkpoint_hooks, resume
from cond_ddpm.training.ema import ema_weights, make_emas, update_ema
from cond_ddpm.training.flags import (
    add_data_flags,
    add_optimisation_flags,
    add_run_flags,
    parse_with_recipe,
)
from cond_ddpm.training.loop import (
    Steps,
    backward_and_step,
    load_training_data,
    make_dataloader,
    make_lr_scheduler,
    make_optimizer,
    prepare_run,
    run_state,
    start_run,
    step_schedule,
)
from cond_ddpm.training.objective import Denoiser, Objective, build_pipeline, diffusion_loss
from cond_ddpm.training.samples import Sampling, Validation, save_final
from pipeline_cond_ddpm import DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SCHEDULER, PRESETS, SCHEDULERS, CondDDPMPipeline

logger = get_logger(__name__)


# --- One step: its loss and update ----------------------------------------------------------------------------------


def training_step(
    accelerator, objective, denoiser, noise_scheduler, optimizer, lr_scheduler, batch, max_grad_norm: float
) -> torch.Tensor:
    """One forward and backward pass; the optimizer steps once every `--gradient_accumulation_steps` of them."""
    with accelerator.accumulate(denoiser):
        loss = diffusion_loss(objective, denoiser, noise_scheduler, batch)
        backward_and_step(accelerator, denoiser, loss, optimizer, lr_scheduler, max_grad_norm)
    return loss.detach()


# --- Training ------------------------------------------------------------------------------------------------------


def main(args):
    with ExitStack() as held:  # what the run holds until it ends, however it ends: its output folder's lock
        return train(args, held)


def train(args, held: ExitStack):
    # Set-up: processes, seed, logging, the output folder.
    output_dir = Path(args.output_dir)
    accelerator, repo_id = start_run(args, held)

    # Data. The main process renders or checks it first; the others then read the finished result.
    with accelerator.main_process_first():
        dataset = load_training_data(args, args.resolution)
    class_names = dataset_class_names(dataset)
    validation_labels = held_out_label_sets(dataset, args.num_validation_images, args.seed)
    train_dataloader = make_dataloader(args, accelerator, dataset)

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
        **run_state(args, accelerator),
    }
    register_checkpoint_hooks(accelerator, noise_scheduler, emas)

    # Optimizer and learning-rate schedule.
    optimizer = make_optimizer(args, accelerator, denoiser.parameters())
    schedule = step_schedule(args, accelerator, train_dataloader)
    lr_scheduler = make_lr_scheduler(args, accelerator, optimizer, schedule.max_train_steps)
    denoiser, optimizer, train_dataloader, lr_scheduler, evaluator = prepare_run(
        args, accelerator, denoiser, optimizer, train_dataloader, lr_scheduler, emas, len(class_names), "cond_ddpm"
    )

    # Resume: the training state, then the data order up to the saved step.
    global_step = resume(
        accelerator, args.resume_from_checkpoint, output_dir, training_state, schedule.max_train_steps, args.use_ema
    )
    if global_step == schedule.max_train_steps:  # e.g. a run stopped while saving its pipeline: only the finish is left
        logger.info(f"step {global_step} is the last one: saving the pipeline without training", main_process_only=True)

    # The loop.
    steps = Steps(args, accelerator, denoiser, emas, lr_scheduler, schedule, training_state, global_step)
    steps.announce(f"{len(dataset)} images")
    held.callback(steps.stop.restore)  # a run that fails must not leave its handlers behind (in-process callers)
    sampling = Sampling(
        args.validation_scheduler, args.ddpm_num_inference_steps, args.guidance_scale, args.seed, args.eval_batch_size
    )
    validation = Validation(sampling, validation_labels, evaluator, output_dir)
    for epoch in steps.epochs():
        denoiser.train()
        for batch in steps.batches(train_dataloader, epoch):
            loss = training_step(
                accelerator, objective, denoiser, noise_scheduler, optimizer, lr_scheduler, batch, args.max_grad_norm
            )
            steps.loss_log.add(loss)
            if not accelerator.sync_gradients:
                continue
            update_ema(accelerator, denoiser, emas)
            if steps.after_step(epoch):  # a stop was asked for: its checkpoint is saved
                accelerator.end_training()
                return None
            if steps.done:
                break

        if steps.validation_due(epoch):
            with ema_weights(accelerator, denoiser, emas):
                validation.draw(
                    accelerator, build_pipeline(accelerator, denoiser, noise_scheduler), epoch, steps.step, steps.stop
                )
        accelerator.wait_for_everyone()
        if steps.done:
            break

    # Finish: the EMA weights are the ones saved.
    steps.finish()
    if accelerator.is_main_process:
        with ema_weights(accelerator, denoiser, emas):
            scorer = evaluator if steps.stop.received is None else None  # a stop request skips the final scores
            check_finite_weights(denoiser, steps.step, output_dir)
            pipeline = build_pipeline(accelerator, denoiser, noise_scheduler)
            card_text = hub.trained_card(args.preset)
            save_final(args, accelerator, pipeline, sampling, scorer, steps.step, repo_id, card_text)
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
    data = add_data_flags(parser)
    data.add_argument("--resolution", type=cli.resolution, help="images are resized to this square size")
    data.add_argument(
        "--random_flip",
        action=argparse.BooleanOptionalAction,
        help="mirror half the images; off in the recipes: the built-in scenes are lit from one side, so a mirrored"
        " scene shows a lighting that none of them has (docs/experiments.md)",
    )

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

    optim = add_optimisation_flags(parser)
    optim.add_argument(
        "--use_ema", action=argparse.BooleanOptionalAction, default=True, help="keep and save EMA weights"
    )
    optim.add_argument(
        "--ema_inv_gamma", type=cli.positive_float, default=1.0, help="EMA warm-up: inverse multiplicative factor"
    )
    optim.add_argument("--ema_power", type=cli.positive_float, default=3 / 4, help="EMA warm-up: exponential factor")
    optim.add_argument("--ema_max_decay", type=cli.number(0, 1), default=0.9999, help="the EMA decay it warms up to")

    run = add_run_flags(parser, default_output_dir="cond-ddpm-iclevr")
    run.add_argument(
        "--validation_scheduler", default=DEFAULT_SCHEDULER, choices=sorted(SCHEDULERS), help="sampler for samples"
    )
    run.add_argument(
        "--ddpm_num_inference_steps",
        type=cli.positive_int,
        default=DEFAULT_NUM_INFERENCE_STEPS,
        help="sampling steps for samples",
    )
    if recipe is not None:
        parser.set_defaults(**RECIPES[recipe])
    return parser


def parse_args(argv=None):
    return parse_with_recipe(build_parser, check_args, argv)


def check_args(parser, args):
    """Errors a user can make in this script's own flags, caught before any work starts."""
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


def entry_point():
    """The `cond-ddpm-train` console script: `python train_conditional_ddpm.py` installed on the PATH."""
    cli.run(main, parse_args())


if __name__ == "__main__":
    entry_point()
