"""The flags both training scripts take (data, optimisation, checkpoints and logging, the Hub), their checks, and the
recipe that sets their defaults: `train_conditional_ddpm.py` and `distill_conditional_ddpm.py` name each the same way,
as diffusers' example scripts do.
"""

import argparse
from pathlib import Path

from accelerate.utils import is_wandb_available

from cond_ddpm import cli
from cond_ddpm.atomic_io import LOCK_NAME
from cond_ddpm.data import MAX_SCENES, OBJECTS_JSON
from pipeline_cond_ddpm import DEFAULT_GUIDANCE_SCALE


def add_data_flags(parser) -> argparse._ArgumentGroup:
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
    data.add_argument(
        "--same_colour_repeats",
        type=cli.positive_int,
        help="show each image with two objects of one colour this many times per epoch (1: once, as every other"
        " image); new_test.json is mostly such pairs, train.json 11%%",
    )
    data.add_argument("--dataloader_num_workers", type=cli.integer(0, 256), help="data loading processes (0: inline)")
    return data


def add_optimisation_flags(parser) -> argparse._ArgumentGroup:
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
    return optim


def add_run_flags(parser, default_output_dir: str) -> argparse._ArgumentGroup:
    """Checkpoints, logging and validation samples, then the Hub's flags in a group of their own."""
    run = parser.add_argument_group("checkpoints, logging, samples")
    run.add_argument("--output_dir", default=default_output_dir, help="the pipeline, checkpoints, samples and logs")
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
    return run


def parse_with_recipe(build_parser, check_args, argv=None):
    """Parse `argv` with the parser that `build_parser(recipe)` makes for the recipe the command line names, then
    check the shared flags and, with `check_args(parser, args)`, the script's own.

    A first pass, without any recipe, reads what the command line itself gives: the recipe, whose values then become
    the defaults (it has no --help, so that `--recipe cpu --help` shows the cpu recipe's defaults)."""
    given, _ = build_parser(recipe=None, add_help=False).parse_known_args(argv)
    parser = build_parser(given.recipe)
    args = parser.parse_args(argv)
    if given.num_epochs and not given.max_train_steps:  # the epochs asked for replace the recipe's step count
        args.max_train_steps = None
    check_shared_args(parser, args)
    check_args(parser, args)
    return args


def check_shared_args(parser, args):
    """Errors a user can make in the shared flags, caught before any work starts."""
    if args.dataset_name and args.train_data_dir:
        parser.error("give either --dataset_name or --train_data_dir, not both")
    if bool(args.train_data_dir) != bool(args.train_json):
        parser.error("--train_data_dir and --train_json go together (the real i-CLEVR layout)")
    if args.objects_json != str(OBJECTS_JSON) and not (args.train_data_dir or args.dataset_name):
        parser.error(
            f"--objects_json {args.objects_json} goes with --train_data_dir or --dataset_name; the built-in synthetic"
            " set brings its own"
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
