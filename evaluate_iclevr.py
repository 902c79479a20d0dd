"""Score i-CLEVR generations with the course's ResNet18 evaluator, train such an evaluator, draw the denoising.

    python evaluate_iclevr.py score --pipeline DIR --evaluator_checkpoint checkpoint.pth --output_dir OUT
    python evaluate_iclevr.py rescore --output_dir OUT --evaluator_checkpoint checkpoint.pth
    python evaluate_iclevr.py train --train_data_dir DIR/images --train_json DIR/train.json --output evaluator.pth
    python evaluate_iclevr.py denoise --pipeline DIR --labels "red sphere,cyan cylinder,cyan cube" --output denoise.png

The evaluator (`cond_ddpm/evaluator.py`) is the course's ResNet18, saved as `{"model": state_dict}`; the scenes are
drawn by `cond_ddpm/sampling.py`, image i of a label file with seed + i. This file is the command line around them.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from cond_ddpm import cli
from cond_ddpm.atomic_io import (
    INCOMPLETE_PREFIX,
    LOCK_NAME,
    atomic_write,
    atomic_write_text,
    claim_folder,
    staged_contents,
)
from cond_ddpm.data import (
    NEW_TEST_JSON,
    OBJECTS_JSON,
    TEST_JSON,
    build_dataset,
    open_rgb,
    read_label_sets,
    read_objects_json,
    split_by_scene,
    with_training_transform,
)
from cond_ddpm.evaluator import (
    EVALUATOR_RESOLUTION,
    build_evaluator,
    evaluate,
    load_evaluator,
    save_evaluator,
    upsample,
)
from cond_ddpm.grids import save_captioned_grid
from cond_ddpm.sampling import (
    DENOISING_FRAMES,
    check_num_inference_steps,
    default_sampler,
    denoising_strip,
    generate,
    load_pipeline,
    set_scheduler,
)
from pipeline_cond_ddpm import (
    DEFAULT_GUIDANCE_SCALE,
    SCHEDULERS,
    multi_hot,
)

EVALUATOR_TRAIN_RESOLUTION = 32  # the course's evaluator saw 32x32 images upsampled to 64x64
# score holds a label file's images and its captioned grid in memory (the grid takes ~100 MB at 1000); the course's
# files hold 32 label sets each.
MAX_LABEL_SETS = 1000
SPLITS = ("test", "new_test")  # what score draws: a folder of PNGs and a grid for each
SCORE_OUTPUTS = {*SPLITS, *(f"{split}_grid.png" for split in SPLITS), "metrics.json"}


def read_label_file(path, class_names: list[str]) -> list[list[str]]:
    """A label file's label sets, as many as score can draw."""
    label_sets = read_label_sets(path, class_names)
    if len(label_sets) > MAX_LABEL_SETS:
        raise ValueError(
            f"{path} holds {len(label_sets)} label sets; score and rescore take at most {MAX_LABEL_SETS} per file"
            " (the course's hold 32): split it into several files"
        )
    return label_sets


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


def read_pngs(folder, count: int) -> torch.Tensor:
    """The PNGs `folder/{i}.png`, i < count, as 8-bit (count, 3, 64, 64); a bad one is named as it is read."""
    paths = [Path(folder) / f"{i}.png" for i in range(count)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) missing in {folder}, e.g. {missing[0]}")
    return torch.stack([read_png(path) for path in paths])


def read_png(path: Path) -> torch.Tensor:
    image = open_rgb(path)  # names the file if it cannot be decoded, or its header claims billions of pixels
    if image.size != (EVALUATOR_RESOLUTION, EVALUATOR_RESOLUTION):
        raise ValueError(
            f"{path} is {image.width}x{image.height}; the evaluator takes {EVALUATOR_RESOLUTION}x{EVALUATOR_RESOLUTION}"
            " images"
        )
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def score_folder(evaluator, folder, label_sets, class_names) -> float:
    """Accuracy of the PNGs `folder/{i}.png` against `label_sets[i]`: exactly what anyone re-scoring them gets."""
    return evaluate(evaluator, read_pngs(folder, len(label_sets)), multi_hot(label_sets, class_names))


# --- Where outputs may go: a command replaces only what it wrote, and never its inputs -----------------------------


def check_apart_from_inputs(what: str, output: Path, inputs: dict) -> None:
    """Refuse an output that is an input, holds one, or lies inside one (`inputs`: flag -> path): writing it could
    replace what the command reads, such as a pipeline's model_index.json or the folder of images it trains on."""
    written = output.resolve()  # a relative path or a symbolic link may name an input too
    for flag, path in inputs.items():
        read = Path(path).resolve()
        if read == written:
            relation = "is"
        elif read.is_relative_to(written):
            relation = "holds"
        elif written.is_relative_to(read):
            relation = "lies inside"
        else:
            continue
        raise ValueError(f"{what} {relation} the input {flag} {path}; write outputs apart from the inputs")


def check_file_output(what: str, path: Path, inputs: dict) -> None:
    """Refuse a file to write that is a folder, a device or a pipe (replacing it would remove it), or an input."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise FileExistsError(f"{what} is not a regular file (a device, a pipe or a socket); give a file name")
    check_apart_from_inputs(what, path, inputs)


def check_output_dir(output_dir: Path, inputs: dict) -> None:
    """Refuse an --output_dir that is a file, or an input, or holds or lies inside one."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is a file; --output_dir takes a folder")
    check_apart_from_inputs(f"--output_dir {output_dir}", output_dir, inputs)


def check_overwritable(output_dir: Path, overwrite: bool) -> None:
    """Refuse an --output_dir with entries in it, unless `overwrite` and it is an earlier score's output: one that
    holds only SCORE_OUTPUTS (and a lock and staging folders), its metrics.json naming what was scored."""
    entries = {p.name for p in output_dir.iterdir() if p.name != LOCK_NAME and not p.name.startswith(INCOMPLETE_PREFIX)}
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(
            f"--output_dir {output_dir} already exists and is not empty; choose another folder, or pass"
            " --overwrite_output_dir to replace an earlier score's output"
        )
    try:
        metrics = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # none, a folder, not JSON
        metrics = None
    written = isinstance(metrics, dict) and {*SPLITS, "pipeline", "evaluator_checkpoint"} <= set(metrics)
    foreign = sorted(entries - SCORE_OUTPUTS)
    if foreign or not written:
        raise FileExistsError(
            f"--output_dir {output_dir} holds {', '.join(foreign[:3]) if foreign else 'a metrics.json'} that score"
            " did not write; --overwrite_output_dir replaces only an earlier score's output, so choose another folder"
        )


# --- Scoring --------------------------------------------------------------------------------------------------------


def score(args):
    class_names = read_objects_json(args.objects_json)
    splits = {split: read_label_file(getattr(args, f"{split}_json"), class_names) for split in SPLITS}
    evaluator = load_evaluator(args.evaluator_checkpoint, len(class_names), args.device)
    pipeline = load_pipeline(args.pipeline, class_names, args.device)
    scheduler, steps = default_sampler(pipeline)
    args.scheduler, args.num_inference_steps = args.scheduler or scheduler, args.num_inference_steps or steps
    set_scheduler(pipeline, args.scheduler)
    check_num_inference_steps(pipeline, args.num_inference_steps)
    output_dir = Path(args.output_dir)
    read = ("pipeline", "evaluator_checkpoint", "objects_json", "test_json", "new_test_json")
    inputs = {f"--{name}": getattr(args, name) for name in read}
    check_output_dir(output_dir, inputs)
    if output_dir.is_dir():  # before the lock file goes into a folder that is refused
        check_overwritable(output_dir, args.overwrite_output_dir)
    metrics = {}
    # The lock refuses a second score into this folder while this one writes (it would replace this output unasked);
    # the check is repeated under it for a run that ended after the first one.
    with claim_folder(output_dir):
        check_overwritable(output_dir, args.overwrite_output_dir)
        with staged_contents(output_dir, marker="metrics.json") as out:
            for split, label_sets in splits.items():
                images = generate(
                    pipeline,
                    label_sets,
                    args.num_inference_steps,
                    args.guidance_scale,
                    args.seed,
                    args.batch_size,
                    desc=f"drawing {split}.json",
                )
                write_pngs(images, out / split)
                save_captioned_grid(out / f"{split}_grid.png", images, label_sets)
                metrics[split] = score_folder(evaluator, out / split, label_sets, class_names)
            metrics.update(
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                scheduler=args.scheduler,
                seed=args.seed,
                pipeline=str(args.pipeline),
                evaluator_checkpoint=str(args.evaluator_checkpoint),
            )
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"test accuracy {metrics['test']:.4f}, new_test accuracy {metrics['new_test']:.4f}; images in {args.output_dir}"
    )
    return metrics


def rescore(args):
    class_names = read_objects_json(args.objects_json)
    evaluator = load_evaluator(args.evaluator_checkpoint, len(class_names), args.device)
    metrics = {}
    for split in SPLITS:
        label_sets = read_label_file(getattr(args, f"{split}_json"), class_names)
        metrics[split] = score_folder(evaluator, Path(args.output_dir) / split, label_sets, class_names)
    print(f"test accuracy {metrics['test']:.4f}, new_test accuracy {metrics['new_test']:.4f}")
    return metrics


# --- Training an evaluator -----------------------------------------------------------------------------------------


def _as_tensors(dataset):
    """Decode a (small) transformed dataset once; epochs then cost only the network."""
    rows = [dataset[i] for i in range(len(dataset))]
    return torch.stack([r["pixel_values"] for r in rows]), torch.stack([r["labels"] for r in rows])


def check_evaluator_output(output, inputs: dict) -> Path:
    """Where the metadata of an evaluator saved at `output` goes; refuses an `output` it would clash with, and
    either file over one of the `inputs` (flag -> path)."""
    output, metadata = Path(output), Path(output).with_suffix(".json")
    check_file_output(f"--output {output}", output, inputs)
    if metadata == output:
        raise ValueError(
            f"--output {output} is where the training metadata goes ({metadata}); save the evaluator under another"
            " suffix, e.g. evaluator.pth"
        )
    check_file_output(f"the metadata file {metadata} of --output {output}", metadata, inputs)
    return metadata


def train_evaluator(args):
    torch.manual_seed(args.seed)
    rows = build_dataset(args.train_data_dir, args.train_json, args.objects_json)
    inputs = {f"--{name}": getattr(args, name) for name in ("train_data_dir", "train_json", "objects_json")}
    metadata = check_evaluator_output(args.output, inputs)
    train_rows, validation_rows = split_by_scene(rows, args.validation_fraction, args.seed)
    # The course's recipe: 32x32 images, upsampled to 64x64.
    train_x, train_y = _as_tensors(with_training_transform(train_rows, EVALUATOR_TRAIN_RESOLUTION))
    val_x, val_y = _as_tensors(with_training_transform(validation_rows, EVALUATOR_TRAIN_RESOLUTION))
    val_images = (upsample(val_x) * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    model = build_evaluator(train_y.shape[1]).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    steps_per_epoch = -(-len(train_x) // args.train_batch_size)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.learning_rate, total_steps=args.num_epochs * steps_per_epoch
    )
    print(f"training on {len(train_x)} images, validating on {len(val_x)} images of held-out scenes")
    best = -1.0
    for epoch in range(args.num_epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for start in tqdm(range(0, len(order), args.train_batch_size), desc=f"epoch {epoch}", leave=False):
            batch = order[start : start + args.train_batch_size]
            images = train_x[batch]
            flip = torch.rand(len(batch)) < 0.5
            images[flip] = images[flip].flip(-1)
            probabilities = model(upsample(images).to(args.device))
            loss = F.binary_cross_entropy(probabilities, train_y[batch].to(args.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
        model.eval()
        val_accuracy = evaluate(model, val_images, val_y)
        print(f"epoch {epoch}: loss {loss.item():.4f}, held-out accuracy {val_accuracy:.4f}", flush=True)
        if val_accuracy > best:
            best = val_accuracy
            save_evaluator(model, args.output)
    atomic_write_text(
        metadata,
        json.dumps({"held_out_accuracy": best, **vars(args)}, indent=2, default=str) + "\n",
    )
    print(f"best held-out accuracy {best:.4f}; evaluator saved to {args.output}")
    return best


# --- Drawing the denoising process ---------------------------------------------------------------------------------


def denoise(args):
    class_names = read_objects_json(args.objects_json)
    pipeline = load_pipeline(args.pipeline, class_names, args.device)
    set_scheduler(pipeline, args.scheduler)
    check_num_inference_steps(pipeline, args.num_inference_steps)
    labels = [name.strip() for name in args.labels.split(",") if name.strip()]
    multi_hot([labels], class_names)  # fail on a bad name before sampling
    check_file_output(
        f"--output {args.output}", Path(args.output), {"--pipeline": args.pipeline, "--objects_json": args.objects_json}
    )
    strip, timesteps = denoising_strip(
        pipeline, labels, args.num_inference_steps, args.guidance_scale, args.num_frames, args.seed
    )
    atomic_write(args.output, lambda temporary: strip.save(temporary, format="PNG"))
    print(f"denoising of {labels} at t = {timesteps} drawn to {args.output}")


# --- Command line --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help, label_files=False):
        sub = commands.add_parser(name, help=help, description=help, formatter_class=cli.HelpFormatter)
        sub.add_argument("--objects_json", default=OBJECTS_JSON, help="object name -> index")
        sub.add_argument(
            "--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu", help="where to run"
        )
        if label_files:
            sub.add_argument("--test_json", default=TEST_JSON, help="the first file of label sets to draw")
            sub.add_argument("--new_test_json", default=NEW_TEST_JSON, help="the second file of label sets to draw")
        return sub

    def sampling_flags(sub, scheduler, steps):
        sub.add_argument("--pipeline", required=True, help="a folder saved by a training script")
        sub.add_argument("--scheduler", default=scheduler, choices=sorted(SCHEDULERS), help="the sampler")
        sub.add_argument("--num_inference_steps", type=cli.positive_int, default=steps, help="sampling steps")
        sub.add_argument(
            "--guidance_scale",
            type=cli.guidance_scale,
            default=DEFAULT_GUIDANCE_SCALE,
            help="classifier-free guidance weight (1 or less: off)",
        )
        sub.add_argument("--seed", type=cli.seed, default=0, help="image i of a label file is drawn with seed + i")

    sub = command("score", "generate test.json / new_test.json images and score them", label_files=True)
    # The pipeline's own default sampler: euler-a in 25 steps, a distilled pipeline's lcm in 4.
    sampling_flags(sub, scheduler=None, steps=None)
    sub.add_argument("--evaluator_checkpoint", required=True, help="ResNet18 evaluator ({'model': state_dict})")
    sub.add_argument("--output_dir", required=True, help="where the PNGs, grids and metrics.json go")
    sub.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing --output_dir")
    sub.add_argument("--batch_size", type=cli.positive_int, default=64, help="images per sampling batch")

    sub = command("rescore", "score the PNGs a `score` run wrote", label_files=True)
    sub.add_argument("--output_dir", required=True, help="the --output_dir of the `score` run")
    sub.add_argument("--evaluator_checkpoint", required=True, help="ResNet18 evaluator ({'model': state_dict})")

    sub = command("train", "train a ResNet18 evaluator on an i-CLEVR-style folder")
    sub.add_argument("--train_data_dir", required=True, help="the folder of images")
    sub.add_argument("--train_json", required=True, help="file name -> list of object names")
    sub.add_argument("--output", required=True, help="where to save {'model': state_dict}")
    sub.add_argument(
        "--validation_fraction",
        type=cli.number(0, 1, low_open=True, high_open=True),
        default=0.1,
        help="scenes held out to measure accuracy",
    )
    sub.add_argument("--num_epochs", type=cli.positive_int, default=40, help="ResNet18 from scratch needs many steps")
    sub.add_argument("--train_batch_size", type=cli.positive_int, default=64, help="images per step")
    sub.add_argument("--learning_rate", type=cli.positive_float, default=2e-3, help="the one-cycle schedule's peak")
    sub.add_argument("--seed", type=cli.seed, default=0, help="seeds the weights, the split and the data order")

    sub = command("denoise", "draw the denoising process of one label set")
    sampling_flags(sub, scheduler="ddpm", steps=1000)
    sub.add_argument("--labels", required=True, help='comma-separated object names, e.g. "red sphere,cyan cube"')
    sub.add_argument("--num_frames", type=cli.positive_int, default=DENOISING_FRAMES, help="steps drawn, evenly spaced")
    sub.add_argument("--output", required=True, help="the PNG to write")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    commands = {"score": score, "rescore": rescore, "train": train_evaluator, "denoise": denoise}
    return cli.run(commands[args.command], args)


if __name__ == "__main__":
    main()
