"""Distil a trained `CondDDPMPipeline` (the teacher) into a student that draws a scene in a few UNet evaluations:
latent consistency distillation, as diffusers' `examples/consistency_distillation/train_lcm_distill_sd_wds.py` does
it, with Accelerate on any number of processes.

    accelerate launch distill_conditional_ddpm.py --pretrained_teacher_model runs/cpu-synthetic \\
        --output_dir runs/cpu-distilled                       # the cpu distillation recipe, built-in synthetic set
    accelerate launch distill_conditional_ddpm.py --pretrained_teacher_model runs/iclevr \\
        --train_data_dir iclevr/images --train_json train.json --objects_json objects.json --output_dir runs/distilled

The student starts as the teacher, with the guidance scale as one more input of its UNet (`time_cond_proj_dim`): one
evaluation per step, guidance included. Each step noises training images at timesteps of the teacher's skipping
DDIM solver (`--num_ddim_timesteps`), lets the teacher take one guided solver step from there, and trains the student
to map both ends of the step to the same image, as the target network (an EMA of the student, `--ema_decay`) maps
the end. The run ends with the student saved by `save_pretrained` in `--output_dir`, a `CondDDPMPipeline` whose
scheduler is an `LCMScheduler`: `pipe(labels, num_inference_steps=4, guidance_scale=3)`. Checkpoints, stops on
SIGTERM, trackers and `--push_to_hub` work as in `train_conditional_ddpm.py`.
"""

import copy
from contextlib import ExitStack
from pathlib import Path

import torch
from accelerate.logging import get_logger

from cond_ddpm import cli, hub
from cond_ddpm.data import dataset_class_names, held_out_label_sets
from cond_ddpm.evaluator import first_sentence
from cond_ddpm.recipes import DEFAULT_DISTILL_RECIPE, DISTILL_RECIPES
from cond_ddpm.training.checkpoints import check_finite_weights, register_checkpoint_hooks, resume
from cond_ddpm.training.consistency import Distillation, consistency_loss, make_student
from cond_ddpm.training.ema import copy_emas_into, make_emas, update_ema
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
from cond_ddpm.training.objective import Denoiser, build_pipeline
from cond_ddpm.training.samples import Sampling, Validation, save_final
from pipeline_cond_ddpm import DISTILLED_NUM_INFERENCE_STEPS, CondDDPMPipeline

logger = get_logger(__name__)
# Settings a checkpoint must share with the run that resumes it: anything else changes the student or its meaning.
RESUME_MUST_MATCH = ("teacher", "class_names", "num_ddim_timesteps", "unet_time_cond_proj_dim", "timestep_scaling")
CARD_SETTINGS = (
    "pretrained_teacher_model",
    "num_ddim_timesteps",
    "w_min",
    "w_max",
    "unet_time_cond_proj_dim",
    "timestep_scaling_factor",
    "loss_type",
    "huber_c",
    "ema_decay",
    "synthetic_scenes",
    "same_colour_repeats",
    "train_batch_size",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_grad_norm",
    "mixed_precision",
    "seed",
)


def load_teacher(name: str) -> CondDDPMPipeline:
    try:
        teacher = CondDDPMPipeline.from_pretrained(name)
    except Exception as error:  # diffusers raises many types for an edited or damaged folder: OSError, KeyError, ...
        raise ValueError(f"cannot load --pretrained_teacher_model {name}: {first_sentence(error)}") from None
    return teacher


def distillation_step(
    accelerator, distillation, models, schedulers, optimizer, lr_scheduler, batch, max_grad_norm: float
) -> torch.Tensor:
    """One forward and backward pass of the student (`models`: student, target, teacher); the optimizer steps once
    every `--gradient_accumulation_steps` of them."""
    student = models[0]
    with accelerator.accumulate(student):
        with accelerator.autocast():  # the teacher and the target are not prepared, so autocast them here
            loss = consistency_loss(distillation, *models, *schedulers, batch)
        backward_and_step(accelerator, student, loss, optimizer, lr_scheduler, max_grad_norm)
    return loss.detach()


def main(args):
    with ExitStack() as held:  # what the run holds until it ends, however it ends: its output folder's lock
        return distil(args, held)


def distil(args, held: ExitStack):
    # The teacher and the student that starts as a copy of it, first: a teacher that cannot be distilled stops the run
    # before its output folder is touched.
    output_dir = Path(args.output_dir)
    teacher_pipeline = load_teacher(args.pretrained_teacher_model)
    student_pipeline = make_student(
        teacher_pipeline, args.unet_time_cond_proj_dim, args.num_ddim_timesteps, args.timestep_scaling_factor
    )
    accelerator, repo_id = start_run(args, held)

    # The models on the device; the target network starts as the student too.
    noise_scheduler, student_scheduler = teacher_pipeline.scheduler, student_pipeline.scheduler
    teacher = Denoiser(teacher_pipeline.unet, teacher_pipeline.label_embedding).requires_grad_(False)
    teacher = teacher.to(accelerator.device)
    student = Denoiser(student_pipeline.unet, student_pipeline.label_embedding).to(memory_format=torch.channels_last)
    target = copy.deepcopy(student).requires_grad_(False).to(accelerator.device)
    # The target network is an EMA of the student at one decay; kept as diffusers' EMAModel, checkpoints hold it.
    emas = make_emas(student, args.ema_decay, min_decay=args.ema_decay)
    distillation = Distillation(
        args.num_ddim_timesteps, args.w_min, args.w_max, args.loss_type, args.huber_c, args.unet_time_cond_proj_dim
    )

    # Data: the teacher's kind of images, at its resolution and with its vocabulary.
    resolution = teacher_pipeline.image_size[0]
    with accelerator.main_process_first():
        dataset = load_training_data(args, resolution)
    class_names = dataset_class_names(dataset)
    if class_names != teacher_pipeline.class_names:
        raise ValueError(
            f"the training data knows {len(class_names)} objects and the teacher {len(teacher_pipeline.class_names)},"
            " and they differ; distil on data with the objects.json the teacher was trained with"
        )
    validation_labels = held_out_label_sets(dataset, args.num_validation_images, args.seed)
    train_dataloader = make_dataloader(args, accelerator, dataset)
    training_state = {
        "teacher": str(args.pretrained_teacher_model),
        "class_names": class_names,
        "num_ddim_timesteps": args.num_ddim_timesteps,
        "unet_time_cond_proj_dim": args.unet_time_cond_proj_dim,
        "timestep_scaling": args.timestep_scaling_factor,
        **run_state(args, accelerator),
    }
    register_checkpoint_hooks(accelerator, student_scheduler, emas)

    optimizer = make_optimizer(args, accelerator, student.parameters())
    schedule = step_schedule(args, accelerator, train_dataloader)
    lr_scheduler = make_lr_scheduler(args, accelerator, optimizer, schedule.max_train_steps)
    student, optimizer, train_dataloader, lr_scheduler, evaluator = prepare_run(
        args,
        accelerator,
        student,
        optimizer,
        train_dataloader,
        lr_scheduler,
        emas,
        len(class_names),
        "cond_ddpm_distill",
    )

    checkpoint, steps_asked = args.resume_from_checkpoint, schedule.max_train_steps
    global_step = resume(accelerator, checkpoint, output_dir, training_state, steps_asked, True, RESUME_MUST_MATCH)
    copy_emas_into(emas, target)  # a resumed run's target network is the checkpoint's

    steps = Steps(args, accelerator, student, emas, lr_scheduler, schedule, training_state, global_step)
    steps.announce(f"distilling {args.pretrained_teacher_model} on {len(dataset)} images")
    held.callback(steps.stop.restore)  # a run that fails must not leave its handlers behind (in-process callers)
    sampling = Sampling(None, args.num_inference_steps, args.guidance_scale, args.seed, args.eval_batch_size)
    validation = Validation(sampling, validation_labels, evaluator, output_dir)
    for epoch in steps.epochs():
        student.train()
        for batch in steps.batches(train_dataloader, epoch):
            loss = distillation_step(
                accelerator,
                distillation,
                (student, target, teacher),
                (noise_scheduler, student_scheduler),
                optimizer,
                lr_scheduler,
                batch,
                args.max_grad_norm,
            )
            steps.loss_log.add(loss)
            if not accelerator.sync_gradients:
                continue
            update_ema(accelerator, student, emas)
            copy_emas_into(emas, target)
            if steps.after_step(epoch):  # a stop was asked for: its checkpoint is saved
                accelerator.end_training()
                return None
            if steps.done:
                break

        if steps.validation_due(epoch):
            validation.draw(
                accelerator, build_pipeline(accelerator, student, student_scheduler), epoch, steps.step, steps.stop
            )
        accelerator.wait_for_everyone()
        if steps.done:
            break

    # Finish: the student's own weights are the ones saved, as diffusers' LCM scripts save them.
    steps.finish()
    if accelerator.is_main_process:
        scorer = evaluator if steps.stop.received is None else None  # a stop request skips the final scores
        check_finite_weights(student, steps.step, output_dir)
        pipeline = build_pipeline(accelerator, student, student_scheduler)
        card_text = hub.CardText(
            f"distilled from {Path(args.pretrained_teacher_model).name}",
            "distilled by cond-ddpm's `distill_conditional_ddpm.py` (latent consistency distillation) from the"
            f" teacher `{args.pretrained_teacher_model}`; it draws a scene in {DISTILLED_NUM_INFERENCE_STEPS} UNet"
            " evaluations",
            CARD_SETTINGS,
        )
        save_final(args, accelerator, pipeline, sampling, scorer, steps.step, repo_id, card_text)
    accelerator.end_training()
    return output_dir


def build_parser(recipe: str | None = DEFAULT_DISTILL_RECIPE, add_help: bool = True) -> cli.ArgumentParser:
    """The distillation flags, with the values of `recipe` (none: no recipe) as the defaults of those it names."""
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter, add_help=add_help)
    parser.add_argument(
        "--recipe",
        choices=sorted(DISTILL_RECIPES),
        default=DEFAULT_DISTILL_RECIPE,
        help="a shipped recipe (DISTILL_RECIPES in cond_ddpm/recipes.py) whose values are the defaults of its flags",
    )
    parser.add_argument(
        "--pretrained_teacher_model",
        help="the teacher (required): a folder saved by train_conditional_ddpm.py, or a Hub repository of one",
    )
    add_data_flags(parser)

    distillation = parser.add_argument_group("distillation")
    distillation.add_argument(
        "--num_ddim_timesteps",
        type=cli.positive_int,
        help="timesteps of the teacher's DDIM solver; the student's sampler picks its steps among them",
    )
    distillation.add_argument(
        "--w_min", type=cli.non_negative_float, help="the lowest guidance scale the student learns, less 1"
    )
    distillation.add_argument(
        "--w_max", type=cli.non_negative_float, help="the highest guidance scale the student learns, less 1"
    )
    distillation.add_argument(
        "--unet_time_cond_proj_dim", type=cli.positive_int, default=256, help="width of the guidance embedding"
    )
    distillation.add_argument(
        "--timestep_scaling_factor",
        type=cli.positive_float,
        default=10.0,
        help="the consistency boundary's time scale (LCMScheduler's timestep_scaling)",
    )
    distillation.add_argument("--loss_type", default="huber", choices=["l2", "huber"], help="the distance")
    distillation.add_argument("--huber_c", type=cli.positive_float, default=0.001, help="the Huber loss's c")
    distillation.add_argument(
        "--ema_decay", type=cli.number(0, 1, high_open=True), default=0.95, help="the target network's EMA decay"
    )

    add_optimisation_flags(parser)
    run = add_run_flags(parser, default_output_dir="cond-ddpm-iclevr-distilled")
    run.add_argument(
        "--num_inference_steps",
        type=cli.positive_int,
        default=DISTILLED_NUM_INFERENCE_STEPS,
        help="the student's sampling steps for samples and scores",
    )
    if recipe is not None:
        parser.set_defaults(**DISTILL_RECIPES[recipe])
    return parser


def parse_args(argv=None):
    return parse_with_recipe(build_parser, check_args, argv)


def check_args(parser, args):
    """Errors a user can make in this script's own flags, caught before any work starts."""
    if not args.pretrained_teacher_model:
        parser.error(
            "--pretrained_teacher_model is required: the --output_dir of a train_conditional_ddpm.py run, or a Hub"
            " repository of one"
        )
    teacher = Path(args.pretrained_teacher_model)
    if teacher.is_dir() and not (teacher / "model_index.json").is_file():
        parser.error(
            f"--pretrained_teacher_model {teacher} is not a saved pipeline (it has no model_index.json); give the"
            " --output_dir of a finished train_conditional_ddpm.py run"
        )
    if teacher.exists() and not teacher.is_dir():
        parser.error(f"--pretrained_teacher_model {teacher} is a file; give a saved pipeline folder")
    if args.w_min > args.w_max:
        parser.error(f"--w_min {args.w_min} is above --w_max {args.w_max}")
    if args.num_inference_steps > args.num_ddim_timesteps:
        parser.error(
            f"--num_inference_steps {args.num_inference_steps} exceeds --num_ddim_timesteps {args.num_ddim_timesteps}:"
            " the student's sampler picks its steps among the solver's"
        )


def entry_point():
    """The `cond-ddpm-distill` console script: `python distill_conditional_ddpm.py` installed on the PATH."""
    cli.run(main, parse_args())


if __name__ == "__main__":
    entry_point()
