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
    python benchmarks/quality.py --pipeline runs/cpu-synthetic --student runs/cpu-distilled \
        --label_files held_out_like_test held_out_like_new_test unseen_triples   # a distilled student, 1-8 steps

Steps: (1) the built-in synthetic set and an evaluator trained on it (`evaluate_iclevr.py train`), unless
`--evaluator_checkpoint` is given; (2) `accelerate launch train_conditional_ddpm.py --recipe NAME`, timed (or
`--pipeline`, a pipeline already saved); (3) one image per label set, scored by the evaluator, with the default
sampler, once per seed. The held-out and unseen-triples files hold `--num_label_sets` (256) label sets, test.json and
new_test.json 32; each score comes with a 95% interval, a bootstrap over the label sets. A `--student` is scored on
the same label sets and seeds at each of `--student_steps`, with its own sampler: its rows give the difference to the
first row, with an interval of its own (the same resamplings for both, so the comparison is paired), and every row
its images per second, measured in the same run. Settings are chosen on the held-out label sets alone
(`--label_files held_out_like_test held_out_like_new_test`); test.json and new_test.json are scored once the choice
is made.

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
from dataclasses import dataclass
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
from cond_ddpm.evaluator import evaluate, load_evaluator, object_scores, to_evaluator_pixels, top_k_hits  # noqa: E402
from cond_ddpm.recipes import RECIPES  # noqa: E402
from cond_ddpm.render import COLORS, SHAPES, random_scene, render_scene  # noqa: E402
from cond_ddpm.sampling import default_sampler, generate, load_pipeline, set_scheduler  # noqa: E402
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
BOOTSTRAP_DRAWS = 2000
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
    """`count` label sets of three objects that no training image shows together (compositional generalisation), or
    all of them where there are fewer (220 of the 2024 triples are missing from the built-in set of 5000 scenes)."""
    seen = {frozenset(labels) for labels in json.loads(train_json.read_text()).values() if len(labels) == 3}
    unseen = [list(c) for c in combinations(class_names, 3) if frozenset(c) not in seen]
    if not unseen:
        raise ValueError(f"every combination of three objects occurs in {train_json}: none is unseen")
    count = min(count, len(unseen))
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
    parser.add_argument("--pipeline", help="score this saved pipeline (e.g. `make train`'s) instead of training one")
    parser.add_argument(
        "--student",
        help="also score this pipeline (e.g. a distilled one) with its own sampler, on the same label sets and seeds",
    )
    parser.add_argument(
        "--student_steps", type=cli.positive_int, nargs="+", default=[1, 2, 4, 8], help="the student's step counts"
    )
    parser.add_argument(
        "--num_label_sets",
        type=cli.integer(32, 4096),
        default=256,
        help="label sets in each held-out and unseen-triples file (test.json and new_test.json hold 32)",
    )
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
    if args.pipeline and (args.score_only or training_flags or args.max_train_minutes or args.score_checkpoints):
        parser.error("--pipeline scores a saved pipeline: it goes without training flags and checkpoint options")
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
    if args.pipeline and not Path(args.pipeline, "model_index.json").is_file():
        parser.error(f"--pipeline {args.pipeline} is not a saved pipeline (it has no model_index.json)")
    if args.student and not Path(args.student, "model_index.json").is_file():
        parser.error(f"--student {args.student} is not a saved pipeline (it has no model_index.json)")
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

    run_dir = Path(args.pipeline) if args.pipeline else output_dir / "pipeline"
    if args.pipeline:
        training = {"recipe": f"the pipeline in {args.pipeline}", "training_minutes": None}
    elif not args.score_only:
        command = one_process_training_command(*flags, "--output_dir", run_dir, "--overwrite_output_dir")
        training = {"recipe": " ".join([name, *training_flags]), "flags": flags}
        training |= train(command, run_dir, args.max_train_minutes)
        atomic_write_text(training_record, json.dumps(training, indent=2) + "\n")
    if not args.pipeline:
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
    samplers = [Sampler(f"{args.scheduler} {args.num_inference_steps}", pipeline, args.num_inference_steps)]
    if args.student:
        student = load_pipeline(args.student, class_names, device)
        name, _ = default_sampler(student)
        set_scheduler(student, name)
        samplers += [Sampler(f"student {name} {steps}", student, steps) for steps in args.student_steps]
    evaluator = load_evaluator(evaluator_path, len(class_names), device)
    test, new_test = read_label_sets(TEST_JSON, class_names), read_label_sets(NEW_TEST_JSON, class_names)
    reserved = {frozenset(label_set) for label_set in test + new_test}
    count = args.num_label_sets
    every_label_file = {
        "test": test,
        "new_test": new_test,
        "held_out_like_test": held_out_like(repeated(test, count), reserved, seed=1),
        "held_out_like_new_test": held_out_like(repeated(new_test, count), reserved, seed=2),
        "unseen_triples": unseen_triples(data / "train.json", class_names, count),
    }
    label_files = {split: sets for split, sets in every_label_file.items() if split in args.label_files}
    sampler = f"{args.scheduler}, {args.num_inference_steps} steps, guidance {args.guidance_scale:g}"
    rows, renders = {}, {}
    result = {
        **training,
        "scored": scored,
        "sampler": sampler,
        "student": args.student,
        "seeds": args.num_seeds,
        "label_sets": {split: len(sets) for split, sets in label_files.items()},
        "evaluator_held_out_accuracy": evaluator_accuracy,
        "samplers": rows,
        "rendered_references": renders,
    }
    tag = f"{args.scheduler}-{args.num_inference_steps}-guidance{args.guidance_scale:g}"
    if len(label_files) < len(LABEL_FILES):  # a subset keeps its own file, beside a full scoring of the same sampler
        tag += "-" + "+".join(label_files)
    if args.student:
        tag += "-student-" + Path(args.student).name
    results_file = output_dir / f"results-{tag}.json"
    output_dir.mkdir(parents=True, exist_ok=True)
    for split, label_sets in label_files.items():
        labels = multi_hot(label_sets, class_names)
        references = [
            rendered_references(label_sets, class_names, seed, pipeline.unet.config.sample_size)
            for seed in range(args.num_seeds)
        ]
        renders[split] = [evaluate(evaluator, images, labels) for images in references]
    # Every sampler draws every label file once per seed, with the same label sets and seeds: the differences
    # between samplers are then paired, and their bootstrap intervals are narrower than those of the scores.
    baseline = None
    for sampler_spec in samplers:
        measured = score_sampler(sampler_spec, label_files, args.guidance_scale, args.num_seeds, evaluator, class_names)
        rows[sampler_spec.name] = summarise(measured, baseline)
        rows[sampler_spec.name]["unet_evaluations_per_image"] = unet_evaluations(sampler_spec, args.guidance_scale)
        baseline = baseline or measured
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

    print_table(result, label_files, training, scored)


def repeated(label_sets: list, count: int) -> list:
    """`label_sets` over and over, `count` of them: each copy gets renamings of its own (`held_out_like`)."""
    return [label_sets[i % len(label_sets)] for i in range(count)]


@dataclass(frozen=True)
class Sampler:
    name: str
    pipeline: CondDDPMPipeline
    num_inference_steps: int


def unet_evaluations(sampler: Sampler, guidance_scale: float) -> int:
    """UNet evaluations per image: one per step, two with classifier-free guidance unless distilled."""
    guided = guidance_scale > 1 and not sampler.pipeline.is_distilled
    return sampler.num_inference_steps * (2 if guided else 1)


def score_sampler(sampler: Sampler, label_files, guidance_scale, num_seeds, evaluator, class_names) -> dict:
    """Per label file: the evaluator's top-k hits of each seed's image of each label set (seeds x sets), each set's
    number of objects, and the seconds spent drawing."""
    measured = {}
    for split, label_sets in label_files.items():
        labels = multi_hot(label_sets, class_names)
        hits, seconds = [], 0.0
        for seed in range(num_seeds):
            started = time.perf_counter()
            images = generate(sampler.pipeline, label_sets, sampler.num_inference_steps, guidance_scale, seed=seed)
            seconds += time.perf_counter() - started
            hits.append(top_k_hits(object_scores(evaluator, images), labels).numpy())
        measured[split] = {"hits": np.stack(hits), "objects": labels.sum(dim=1).numpy(), "seconds": seconds}
    return measured


def bootstrap(hits: np.ndarray, objects: np.ndarray, draws: int = BOOTSTRAP_DRAWS) -> np.ndarray:
    """The accuracy of `draws` resamplings of the label sets (with replacement; every seed's image of a drawn set
    counts). The resamplings are the same for every sampler of a label file, so differences are paired."""
    drawn = np.random.default_rng(0).integers(0, len(objects), (draws, len(objects)))
    return hits.sum(axis=0)[drawn].sum(axis=1) / (objects[drawn].sum(axis=1) * len(hits))


def interval(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def summarise(measured: dict, baseline: dict | None) -> dict:
    """Each label file's accuracy with its 95% bootstrap interval and per-seed scores, the images per second, and
    (against `baseline`, the first sampler) the difference with its own interval."""
    summary = {}
    images = sum(m["hits"].size for m in measured.values())
    summary["images_per_second"] = images / sum(m["seconds"] for m in measured.values())
    for split, m in measured.items():
        accuracy = m["hits"].sum() / (m["objects"].sum() * len(m["hits"]))
        resampled = bootstrap(m["hits"], m["objects"])
        row = {
            "accuracy": float(accuracy),
            "interval": interval(resampled),
            "per_seed": [float(h.sum() / m["objects"].sum()) for h in m["hits"]],
        }
        if baseline is not None:
            base = baseline[split]
            row["difference"] = float(accuracy - base["hits"].sum() / (base["objects"].sum() * len(base["hits"])))
            row["difference_interval"] = interval(resampled - bootstrap(base["hits"], base["objects"]))
        summary[split] = row
    return summary


def print_table(result: dict, label_files: dict, training: dict, scored: str):
    splits = list(label_files)
    print(
        f"\n| sampler | UNet evaluations per image | images/s | {' | '.join(s.replace('_', ' ') for s in splits)} |"
        f"  (accuracy [95% interval over label sets]; below the first row, the difference to it [interval])"
        f"\n|---|---|---|{'---|' * len(splits)}"
    )
    for name, row in result["samplers"].items():
        cells = []
        for split in splits:
            cell = f"{row[split]['accuracy']:.3f} [{row[split]['interval'][0]:.3f}, {row[split]['interval'][1]:.3f}]"
            if "difference" in row[split]:
                low, high = row[split]["difference_interval"]
                cell += f" ({row[split]['difference']:+.3f} [{low:+.3f}, {high:+.3f}])"
            cells.append(cell)
        print(
            f"| {name} | {row['unet_evaluations_per_image']} | {row['images_per_second']:.1f} | {' | '.join(cells)} |"
        )
    renders = " | ".join(f"{np.mean(v):.3f}" for v in result["rendered_references"].values())
    print(f"| the renderer's own scenes (the evaluator's ceiling) | | | {renders} |")
    minutes = training.get("training_minutes")
    print(
        f"\n{training['recipe']}"
        + (f", trained in {minutes:.1f} minutes" if minutes else "")
        + f"; scored: {scored}"
        + (" (training was stopped by --max_train_minutes)" if training.get("stopped_by_clock") else "")
        + f"; label sets per file: {result['label_sets']}, {result['seeds']} seeds each"
    )
    for row in result.get("checkpoints", []):
        minutes = "" if row["minutes"] is None else f" after {row['minutes']:.1f} minutes"
        scores = ", ".join(f"{split} {value:.3f}" for split, value in row.items() if split.startswith("held_out"))
        print(f"checkpoint-{row['step']}{minutes}: {scores}")


if __name__ == "__main__":
    main()
