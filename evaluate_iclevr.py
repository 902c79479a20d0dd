"""Score i-CLEVR generations with the course's ResNet18 evaluator, train such an evaluator, draw the denoising.

    python evaluate_iclevr.py score --pipeline DIR --evaluator_checkpoint checkpoint.pth --output_dir OUT
    python evaluate_iclevr.py rescore --output_dir OUT --evaluator_checkpoint checkpoint.pth
    python evaluate_iclevr.py train --train_data_dir DIR/images --train_json DIR/train.json --output evaluator.pth
    python evaluate_iclevr.py denoise --pipeline DIR --labels "red sphere,cyan cylinder,cyan cube" --output denoise.png

The evaluator is the course's: a torchvision `resnet18` whose `fc` is `Sequential(Linear(512, 24), Sigmoid())`,
saved as `{"model": state_dict}`, fed 64x64 images normalised to [-1, 1]. Accuracy counts, over all images of a
label file, how many of the k top-scoring objects (k = objects in the image's label set) are in the label set,
divided by the total number of labels.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models import resnet18
from tqdm.auto import tqdm

from cond_ddpm import cli
from cond_ddpm.atomic_io import atomic_write, atomic_write_text, staged_directory
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
from cond_ddpm.grids import save_captioned_grid
from pipeline_cond_ddpm import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    CondDDPMPipeline,
    multi_hot,
)

EVALUATOR_RESOLUTION = 64
EVALUATOR_TRAIN_RESOLUTION = 32  # the course's evaluator saw 32x32 images upsampled to 64x64


# --- The evaluator -------------------------------------------------------------------------------------------------


def build_evaluator(num_classes: int) -> nn.Module:
    model = resnet18(weights=None)
    model.fc = nn.Sequential(nn.Linear(512, num_classes), nn.Sigmoid())
    return model


def load_evaluator(path, num_classes: int, device="cpu") -> nn.Module:
    """Load an evaluator saved in the official format, `{"model": state_dict}`, onto any device."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluator checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for files that are not safe checkpoints
        raise ValueError(f"{path} is not a PyTorch checkpoint of plain tensors: {str(error).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} must hold {{'model': state_dict}} (the official checkpoint.pth format); found {found}"
        )
    model = build_evaluator(num_classes)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        reason = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ValueError(f"{path} does not hold a ResNet18 evaluator for {num_classes} objects: {reason}") from None
    return model.eval().to(device)


def save_evaluator(model: nn.Module, path) -> Path:
    return atomic_write(path, lambda temporary: torch.save({"model": model.state_dict()}, temporary))


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """The course's metric, pooled over all images: top-k hits / total labels, k = objects in each label set."""
    hits = total = 0
    for scores, label in zip(probabilities, labels, strict=True):
        k = int(label.sum())
        hits += int(label[scores.topk(k).indices].sum())
        total += k
    if total == 0:
        raise ValueError("accuracy needs at least one object in the label sets")
    return hits / total


def upsample(images: torch.Tensor) -> torch.Tensor:
    """Bring images to the evaluator's 64x64, the way its training images were brought up from 32x32."""
    if images.shape[-2:] == (EVALUATOR_RESOLUTION, EVALUATOR_RESOLUTION):
        return images
    return F.interpolate(images, size=EVALUATOR_RESOLUTION, mode="bilinear", align_corners=False)


def to_evaluator_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] at the model's resolution -> 8-bit (B, 3, 64, 64), as the 64x64 PNGs hold them."""
    return (upsample(images) * 255).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def evaluate(evaluator: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of 8-bit images (B, 3, 64, 64) against multi-hot labels."""
    device = next(evaluator.parameters()).device
    probabilities = evaluator(images.to(device).float() / 127.5 - 1)
    return accuracy(probabilities.cpu(), labels.cpu())


# --- Generating and scoring ----------------------------------------------------------------------------------------


def load_pipeline(path, class_names: list[str], device) -> CondDDPMPipeline:
    """Load a pipeline and check that it speaks the vocabulary of the label files it will be scored on."""
    if not Path(path, "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved pipeline (it has no model_index.json)")
    pipeline = CondDDPMPipeline.from_pretrained(path).to(device)
    if pipeline.class_names != class_names:
        differences = [
            f"{i}: {a!r} vs {b!r}"
            for i, (a, b) in enumerate(zip(pipeline.class_names, class_names, strict=False))
            if a != b
        ]
        raise ValueError(
            f"the pipeline in {path} knows {len(pipeline.class_names)} objects and objects.json {len(class_names)},"
            f" and they differ ({'; '.join(differences[:5]) or 'in number'}); score with the objects.json it was"
            " trained with"
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def set_scheduler(pipeline: CondDDPMPipeline, name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    pipeline.scheduler = SCHEDULERS[name](pipeline.scheduler.config)


def generate(
    pipeline,
    label_sets,
    num_inference_steps,
    guidance_scale,
    seed=0,
    batch_size=64,
    callback_on_step_end=None,
    desc="sampling",
) -> torch.Tensor:
    """8-bit images (B, 3, 64, 64), one per label set. Image i uses seed + i, so batching does not change it.
    `callback_on_step_end` goes to the pipeline (the training script's stops sampling through it)."""
    chunks = []
    progress = tqdm(total=len(label_sets), desc=desc, unit="image", leave=False)
    for start in range(0, len(label_sets), batch_size):
        batch = label_sets[start : start + batch_size]
        generators = [torch.Generator(pipeline.device).manual_seed(seed + start + i) for i in range(len(batch))]
        images = pipeline(
            batch,
            num_inference_steps,
            guidance_scale,
            generator=generators,
            output_type="pt",
            callback_on_step_end=callback_on_step_end,
        ).images
        # Quantise where the pipeline's PNGs would, then upsample and quantise again for the 64x64 files.
        images = (images.float() * 255).round() / 255
        chunks.append(to_evaluator_pixels(images.cpu()))
        progress.update(len(batch))
    progress.close()
    return torch.cat(chunks)


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


def read_pngs(folder, count: int) -> torch.Tensor:
    paths = [Path(folder) / f"{i}.png" for i in range(count)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) missing in {folder}, e.g. {missing[0]}")
    images = torch.stack([torch.from_numpy(np.array(open_rgb(p))).permute(2, 0, 1) for p in paths])
    if images.shape[-2:] != (EVALUATOR_RESOLUTION, EVALUATOR_RESOLUTION):
        raise ValueError(f"the images in {folder} are {tuple(images.shape[-2:])}; the evaluator takes 64x64")
    return images


def score_folder(evaluator, folder, label_sets, class_names) -> float:
    """Accuracy of the PNGs `folder/{i}.png` against `label_sets[i]`: exactly what anyone re-scoring them gets."""
    return evaluate(evaluator, read_pngs(folder, len(label_sets)), multi_hot(label_sets, class_names))


def score(args):
    class_names = read_objects_json(args.objects_json)
    splits = {
        "test": read_label_sets(args.test_json, class_names),
        "new_test": read_label_sets(args.new_test_json, class_names),
    }
    evaluator = load_evaluator(args.evaluator_checkpoint, len(class_names), args.device)
    pipeline = load_pipeline(args.pipeline, class_names, args.device)
    set_scheduler(pipeline, args.scheduler)
    metrics = {}
    with staged_directory(args.output_dir, overwrite=args.overwrite_output_dir) as out:
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
    for split, label_file in (("test", args.test_json), ("new_test", args.new_test_json)):
        label_sets = read_label_sets(label_file, class_names)
        metrics[split] = score_folder(evaluator, Path(args.output_dir) / split, label_sets, class_names)
    print(f"test accuracy {metrics['test']:.4f}, new_test accuracy {metrics['new_test']:.4f}")
    return metrics


# --- Training an evaluator -----------------------------------------------------------------------------------------


def _as_tensors(dataset):
    """Decode a (small) transformed dataset once; epochs then cost only the network."""
    rows = [dataset[i] for i in range(len(dataset))]
    return torch.stack([r["pixel_values"] for r in rows]), torch.stack([r["labels"] for r in rows])


def check_evaluator_output(output) -> Path:
    """Where the metadata of an evaluator saved at `output` goes; refuses an `output` it would clash with."""
    output, metadata = Path(output), Path(output).with_suffix(".json")
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder; give a file name, e.g. {output / 'evaluator.pth'}")
    if metadata == output:
        raise ValueError(
            f"--output {output} is where the training metadata goes ({metadata}); save the evaluator under another"
            " suffix, e.g. evaluator.pth"
        )
    return metadata


def train_evaluator(args):
    metadata = check_evaluator_output(args.output)
    torch.manual_seed(args.seed)
    rows = build_dataset(args.train_data_dir, args.train_json, args.objects_json)
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
    labels = [name.strip() for name in args.labels.split(",") if name.strip()]
    multi_hot([labels], class_names)  # fail on a bad name before sampling
    keep = set(np.linspace(0, args.num_inference_steps - 1, args.num_frames).round().astype(int).tolist())
    frames = []

    def capture(pipe, step, timestep, tensors):
        if step in keep:
            frames.append((int(timestep), (tensors["image"][:1] / 2 + 0.5).clamp(0, 1)))

    generator = torch.Generator(args.device).manual_seed(args.seed)
    pipeline.set_progress_bar_config(desc="denoising", unit="step")
    pipeline([labels], args.num_inference_steps, args.guidance_scale, generator=generator, callback_on_step_end=capture)
    captions = [[f"t={timestep}", *labels] for timestep, _ in frames]
    images = [image[0].mul(255).round().byte().cpu() for _, image in frames]
    save_captioned_grid(args.output, images, captions, columns=len(frames))
    print(f"denoising of {labels} at t = {[t for t, _ in frames]} drawn to {args.output}")


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

    def sampling_flags(sub, steps):
        sub.add_argument("--pipeline", required=True, help="a folder saved by the training script")
        sub.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=sorted(SCHEDULERS), help="the sampler")
        sub.add_argument("--num_inference_steps", type=cli.positive_int, default=steps, help="sampling steps")
        sub.add_argument(
            "--guidance_scale",
            type=cli.guidance_scale,
            default=DEFAULT_GUIDANCE_SCALE,
            help="classifier-free guidance weight (1 or less: off)",
        )
        sub.add_argument("--seed", type=cli.seed, default=0, help="image i of a label file is drawn with seed + i")

    sub = command("score", "generate test.json / new_test.json images and score them", label_files=True)
    sampling_flags(sub, steps=DEFAULT_NUM_INFERENCE_STEPS)
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
    sampling_flags(sub, steps=1000)
    sub.set_defaults(scheduler="ddpm")
    sub.add_argument("--labels", required=True, help='comma-separated object names, e.g. "red sphere,cyan cube"')
    sub.add_argument("--num_frames", type=cli.positive_int, default=8, help="steps drawn, evenly spaced")
    sub.add_argument("--output", required=True, help="the PNG to write")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    commands = {"score": score, "rescore": rescore, "train": train_evaluator, "denoise": denoise}
    return cli.run(commands[args.command], args)


if __name__ == "__main__":
    main()
