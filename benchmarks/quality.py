"""Accuracy on the synthetic benchmark: train a shipped recipe on this machine, then score test.json, new_test.json,
label sets drawn like them but in neither file (held out: where settings are chosen), and label sets of three
objects that never occur together in the training labels.

    python benchmarks/quality.py                          # the CPU recipe (cond_ddpm/recipes.py), about 25 minutes
    python benchmarks/quality.py --seed 1                 # the same recipe again with another training seed
    python benchmarks/quality.py --recipe gpu             # on a GPU: the GPU recipe at 64x64
    python benchmarks/quality.py --quick                  # every step, on a budget of a few minutes
    python benchmarks/quality.py --score_only --guidance_scale 5   # re-score the trained model at another guidance
    python benchmarks/quality.py --output_dir runs/quality-repeats1 -- --same_colour_repeats 1   # a variant: flags
                                                          # after -- go to the training script, on top of the recipe
    python benchmarks/quality.py --score_only --label_files held_out_like_test held_out_like_new_test   # choosing
    python benchmarks/quality.py --recipe gpu --max_train_minutes 3 --score_checkpoints   # accuracy against minutes

Steps: (1) the built-in synthetic set and an evaluator trained on it (`evaluate_iclevr.py train`), unless
`--evaluator_checkpoint` is given; (2) `accelerate launch train_conditional_ddpm.py --recipe NAME`, timed; (3) one
image per label set, scored by the evaluator, with the default sampler, once per seed: one draw of 32 images is
noisy (a few objects either way), so the summary is the mean over `--num_seeds` seeds, with each seed's score.
Settings are chosen on the held-out label sets alone (`--label_files held_out_like_test held_out_like_new_test`);
test.json and new_test.json are scored once the choice is made.

`--max_train_minutes` stops the training by the clock, the way a scheduler ends a job: SIGTERM, after which the script
saves a checkpoint at its next step; the newest checkpoint's EMA weights are then scored. `--score_checkpoints` also
scores every saved checkpoint on the held-out label sets (seed 0): accuracy against training minutes. The results file
is rewritten after each label file is scored, so a run cut short keeps what it measured.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import one_process_training_command  # noqa: E402

from cond_ddpm import cli  # noqa: E402
from cond_ddpm.atomic_io import LOCK_NAME, atomic_write_text  # noqa: E402
from cond_ddpm.data import (  # noqa: E402
    NEW_TEST_JSON,
    TEST_JSON,
    default_synthetic_dataset,
    read_label_sets,
    read_objects_json,
    resize,
)
from cond_ddpm.evaluator import evaluate, load_evaluator, to_evaluator_pixels  # noqa: E402
from cond_ddpm.recipes import RECIPES  # noqa: E402
from cond_ddpm.render import COLORS, SHAPES, random_scene, render_scene  # noqa: E402
from cond_ddpm.sampling import generate, load_pipeline, set_scheduler  # noqa: E402
from cond_ddpm.training.checkpoints import find_checkpoints  # noqa: E402
from pipeline_cond_ddpm import (  # noqa: E402
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    CondDDPMPipeline,
    multi_hot,
)

LABEL_FILES = ("test", "new_test", "held_out_like_test", "held_out_like_new_test", "unseen_triples")
QUICK = {
    "scenes": 300,
    # fp32 and one loader worker whatever the recipe says: bf16 convolutions crawl on a CPU without bf16 units.
    "flags": ["--preset", "tiny", "--train_batch_size", "16", "--max_train_steps", "60"]
    + ["--lr_warmup_steps", "10", "--logging_steps", "20", "--mixed_precision", "no", "--dataloader_num_workers", "1"],
}


def held_out_like(label_sets: list[list[str]], reserved: set[frozenset], seed: int) -> list[list[str]]:
    """Label sets shaped like `label_sets` (the same pattern of shared colours and shapes) but in none of `reserved`:
    each set gets its own random renaming of the 8 colours and of the 3 shapes. Settings are chosen on these, so
    that test.json and new_test.json are scored only once the choice is made."""
    rng = np.random.default_rng(seed)
    colours = sorted({name.split()[0] for label_set in label_sets for name in label_set} | set(COLORS))
    shapes = sorted({name.split()[1] for label_set in label_sets for name in label_set} | set(SHAPES))
    drawn = []
    for label_set in label_sets:
        while True:
            colour_map = dict(zip(colours, rng.permutation(colours), strict=True))
            shape_map = dict(zip(shapes, rng.permutation(shapes), strict=True))
            renamed = [f"{colour_map[n.split()[0]]} {shape_map[n.split()[1]]}" for n in label_set]
            if frozenset(renamed) not in reserved:
                break
        drawn.append(renamed)
    return drawn


def unseen_triples(train_json: Path, class_names: list[str], count: int = 32, seed: int = 0) -> list[list[str]]:
    """Label sets of three objects that no training image shows together: compositional generalisation."""
    seen = {frozenset(labels) for labels in json.loads(train_json.read_text()).values() if len(labels) == 3}
    unseen = [list(c) for c in combinations(class_names, 3) if frozenset(c) not in seen]
    if len(unseen) < count:
        raise ValueError(f"only {len(unseen)} combinations of three objects are missing from {train_json}")
    return [unseen[i] for i in sorted(np.random.default_rng(seed).choice(len(unseen), count, replace=False))]


def rendered_references(
    label_sets: list[list[str]], class_names: list[str], seed: int, resolution: int
) -> torch.Tensor:
    """The renderer's own scenes of the label sets, brought to the model's resolution and up to 64x64 like its images.

    Their score is the evaluator's ceiling on these label sets: what a model that drew perfect scenes would get.
    """
    images = []
    for i, label_set in enumerate(label_sets):
        objects, camera, light = random_scene(np.random.default_rng([seed, i]), class_names, names=label_set)
        frame = Image.fromarray(render_scene(objects, camera, light)[-1], "RGBA").convert("RGB")
        pixels = torch.from_numpy(np.array(resize(frame, resolution))).permute(2, 0, 1)[None] / 255
        images.append(to_evaluator_pixels(pixels))
    return torch.cat(images)


def train(command: list[str], output_dir: Path, max_minutes: float | None) -> dict:
    """Run the training command; past `max_minutes`, send SIGTERM to its process group, as a scheduler ending a job
    would. The script then saves a checkpoint at its next step and exits."""
    started = time.time()
    process = subprocess.Popen(command, start_new_session=True)  # its own group: the signal reaches every process
    stopped = False
    try:
        process.wait(timeout=None if max_minutes is None else 60 * max_minutes)
    except subprocess.TimeoutExpired:
        stopped = True
    except KeyboardInterrupt:  # Ctrl-C no longer reaches a group of its own: pass the stop on
        os.killpg(process.pid, signal.SIGTERM)
        raise
    if stopped:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        # `accelerate launch` dies of the signal at once while the training process saves its checkpoint; that
        # process holds the folder's lock until it ends.
        with open(output_dir / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
    elif process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    return {"training_started": started, "training_minutes": (time.time() - started) / 60, "stopped_by_clock": stopped}


def checkpoint_pipeline(checkpoint: Path, class_names: list[str], device) -> CondDDPMPipeline:
    """A checkpoint as the pipeline its run would have saved: with its EMA weights, where it kept them."""
    pipeline = load_pipeline(checkpoint, class_names, device)
    for name in ("unet", "label_embedding"):
        if (checkpoint / "ema" / name).is_dir():
            module = type(getattr(pipeline, name)).from_pretrained(checkpoint / "ema" / name)
            pipeline.register_modules(**{name: module.to(device)})
    return pipeline


def split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    """This script's flags, and those after `--`, which go to the training script on top of the recipe's."""
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def main():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--recipe", default="cpu", choices=sorted(RECIPES), help="a recipe of cond_ddpm/recipes.py")
    parser.add_argument(
        "--quick", action="store_true", help="the tiny preset for 60 steps of 16 images: checks every step"
    )
    parser.add_argument(
        "--seed",
        type=cli.seed,
        default=0,
        help="training seed; another one reruns a recipe on the same data, to see how much of a difference is noise",
    )
    parser.add_argument("--evaluator_checkpoint", help="default: train one on the synthetic set first")
    parser.add_argument("--score_only", action="store_true", help="score the pipeline already trained in --output_dir")
    parser.add_argument(
        "--num_seeds", type=cli.positive_int, default=3, help="score every label file with seeds 0, 1, ..."
    )
    parser.add_argument("--output_dir", help="default: runs/quality-RECIPE")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=sorted(SCHEDULERS), help="the sampler")
    parser.add_argument(
        "--num_inference_steps", type=cli.positive_int, default=DEFAULT_NUM_INFERENCE_STEPS, help="sampling steps"
    )
    parser.add_argument(
        "--guidance_scale", type=cli.guidance_scale, default=DEFAULT_GUIDANCE_SCALE, help="guidance weight"
    )
    parser.add_argument(
        "--max_train_minutes",
        type=cli.positive_float,
        help="stop training by the clock (SIGTERM, then a checkpoint at the next step) and score the newest checkpoint",
    )
    parser.add_argument(
        "--score_checkpoints",
        action="store_true",
        help="also score every saved checkpoint on the held-out label sets, with seed 0: accuracy against minutes",
    )
    parser.add_argument(
        "--label_files",
        nargs="+",
        choices=LABEL_FILES,
        default=list(LABEL_FILES),
        help="the label sets to score: choose settings on the held_out_like ones only",
    )
    own_flags, training_flags = split_at_double_dash(sys.argv[1:])
    args = parser.parse_args(own_flags)
    if training_flags and args.score_only:
        parser.error(f"--score_only trains nothing: the flags after -- ({' '.join(training_flags)}) are unused")
    if training_flags and not args.output_dir:
        parser.error(
            f"the training flags after -- ({' '.join(training_flags)}) change the recipe: name the run's folder with"
            " --output_dir, so that it does not overwrite the recipe's own"
        )
    recipe = RECIPES[args.recipe]
    if recipe["mixed_precision"] != "no" and not (torch.cuda.is_available() or args.quick or args.score_only):
        parser.error(
            f"--recipe {args.recipe} trains at {recipe['resolution']}x{recipe['resolution']} and needs a CUDA GPU"
            " (days on a CPU); the CPU recipe is --recipe cpu"
        )
    name = ("quick" if args.quick else args.recipe) + ("" if args.seed == 0 else f"-seed{args.seed}")
    output_dir = Path(args.output_dir or ROOT / "runs" / f"quality-{name}")
    training_record = output_dir / "training.json"
    if args.score_only and not training_record.is_file():
        parser.error(
            f"--score_only: {output_dir} holds no pipeline trained by this script ({training_record} is missing)"
        )
    data = default_synthetic_dataset(QUICK["scenes"] if args.quick else recipe["synthetic_scenes"], seed=0)
    # The data folder by name: the training script would otherwise render its own set from --seed, and the unseen
    # triples below must be unseen in the set the model trained on.
    flags = (
        ["--recipe", args.recipe, "--seed", str(args.seed)]
        + (QUICK["flags"] if args.quick else [])
        + training_flags
        + ["--train_data_dir", str(data / "images"), "--train_json", str(data / "train.json")]
    )
    class_names = read_objects_json()

    evaluator_path = Path(args.evaluator_checkpoint or output_dir / "evaluator" / "evaluator.pth")
    if not evaluator_path.is_file():
        epochs = "1" if args.quick else "20"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "evaluate_iclevr.py"),
                "train",
                "--train_data_dir",
                str(data / "images"),
                "--train_json",
                str(data / "train.json"),
                "--output",
                str(evaluator_path),
                "--num_epochs",
                epochs,
            ],
            check=True,
        )
    evaluator_record = evaluator_path.with_suffix(".json")
    evaluator_accuracy = (
        json.loads(evaluator_record.read_text())["held_out_accuracy"] if evaluator_record.is_file() else None
    )

    run_dir = output_dir / "pipeline"
    if not args.score_only:
        command = one_process_training_command(*flags, "--output_dir", run_dir, "--overwrite_output_dir")
        training = {"recipe": " ".join([name, *training_flags]), "flags": flags}
        training |= train(command, run_dir, args.max_train_minutes)
        atomic_write_text(training_record, json.dumps(training, indent=2) + "\n")
    training = json.loads(training_record.read_text())

    device = "cuda" if torch.cuda.is_available() else "cpu"
    saved = find_checkpoints(run_dir)
    if (run_dir / "model_index.json").is_file():
        scored, pipeline = "the final pipeline", load_pipeline(run_dir, class_names, device)
    elif saved:  # stopped by the clock: the newest checkpoint is the model
        scored, pipeline = saved[-1].name, checkpoint_pipeline(saved[-1], class_names, device)
    else:
        parser.error(f"{run_dir} holds neither a saved pipeline nor a finished checkpoint to score")
    set_scheduler(pipeline, args.scheduler)
    evaluator = load_evaluator(evaluator_path, len(class_names), device)
    test, new_test = read_label_sets(TEST_JSON, class_names), read_label_sets(NEW_TEST_JSON, class_names)
    reserved = {frozenset(label_set) for label_set in test + new_test}
    every_label_file = {
        "test": test,
        "new_test": new_test,
        "held_out_like_test": held_out_like(test, reserved, seed=1),
        "held_out_like_new_test": held_out_like(new_test, reserved, seed=2),
        "unseen_triples": unseen_triples(data / "train.json", class_names),
    }
    label_files = {split: sets for split, sets in every_label_file.items() if split in args.label_files}
    sampler = f"{args.scheduler}, {args.num_inference_steps} steps, guidance {args.guidance_scale:g}"
    per_seed, renders = {}, {}
    result = {
        **training,
        "scored": scored,
        "sampler": sampler,
        "seeds": args.num_seeds,
        "evaluator_held_out_accuracy": evaluator_accuracy,
        "per_seed": per_seed,
        "rendered_references": renders,
    }
    tag = f"{args.scheduler}-{args.num_inference_steps}-guidance{args.guidance_scale:g}"
    if len(label_files) < len(LABEL_FILES):  # a subset keeps its own file, beside a full scoring of the same sampler
        tag += "-" + "+".join(label_files)
    results_file = output_dir / f"results-{tag}.json"
    for split, label_sets in label_files.items():
        labels = multi_hot(label_sets, class_names)
        per_seed[split], renders[split] = [], []
        for seed in range(args.num_seeds):
            images = generate(pipeline, label_sets, args.num_inference_steps, args.guidance_scale, seed=seed)
            per_seed[split].append(evaluate(evaluator, images, labels))
            references = rendered_references(label_sets, class_names, seed, pipeline.unet.config.sample_size)
            renders[split].append(evaluate(evaluator, references, labels))
        result[split] = float(np.mean(per_seed[split]))
        atomic_write_text(results_file, json.dumps(result, indent=2) + "\n")

    if args.score_checkpoints:
        result["checkpoints"] = []
        held_out = {split: sets for split, sets in label_files.items() if split.startswith("held_out")}
        for checkpoint in saved:
            saved = (checkpoint / "training_state.json").stat().st_mtime
            started = training.get("training_started")  # absent from the records of runs before the clock was kept
            row = {"step": int(checkpoint.name.split("-")[1]), "minutes": started and (saved - started) / 60}
            model = checkpoint_pipeline(checkpoint, class_names, device)
            set_scheduler(model, args.scheduler)
            for split, label_sets in held_out.items():
                images = generate(model, label_sets, args.num_inference_steps, args.guidance_scale, seed=0)
                row[split] = evaluate(evaluator, images, multi_hot(label_sets, class_names))
            result["checkpoints"].append(row)
            atomic_write_text(results_file, json.dumps(result, indent=2) + "\n")

    def cells(scores_per_seed):
        return " | ".join(f"{np.mean(v):.3f} ({', '.join(f'{x:.3f}' for x in v)})" for v in scores_per_seed.values())

    print(
        f"\n| images | training minutes | {' | '.join(split.replace('_', ' ') for split in label_files)} | sampler |"
        f"  (mean of {args.num_seeds} seeds; each seed's in brackets)\n|---|---|{'---|' * len(label_files)}---|"
    )
    print(f"| {training['recipe']} | {training['training_minutes']:.1f} | {cells(per_seed)} | {sampler} |")
    print(f"| the renderer's own scenes (the evaluator's ceiling) | | {cells(renders)} | |")
    print(
        f"\nScored: {scored}"
        + (" (training was stopped by --max_train_minutes)" if training.get("stopped_by_clock") else "")
    )
    for row in result.get("checkpoints", []):
        minutes = "" if row["minutes"] is None else f" after {row['minutes']:.1f} minutes"
        scores = ", ".join(f"{split} {value:.3f}" for split, value in row.items() if split.startswith("held_out"))
        print(f"checkpoint-{row['step']}{minutes}: {scores}")


if __name__ == "__main__":
    main()
