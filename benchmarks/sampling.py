"""Sampling speed against accuracy: schedulers and step counts, each with several guidance scales, same model and seeds.

    python benchmarks/sampling.py --pipeline runs/small --evaluator_checkpoint runs/evaluator/evaluator.pth
    python benchmarks/sampling.py ... --quick      # the default sampler and DPM-Solver++ 10, guidance 1 and default
    python benchmarks/sampling.py ... --splits test   # half the time: score test.json only

For each setting: the time to generate the 32 label sets of test.json, and the evaluator's accuracy on test.json and
new_test.json, and the fewest steps that lose no accuracy against 1000-step DDPM.
"""

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cond_ddpm import cli  # noqa: E402
from cond_ddpm.atomic_io import atomic_write_text  # noqa: E402
from cond_ddpm.data import NEW_TEST_JSON, TEST_JSON, read_label_sets, read_objects_json  # noqa: E402
from cond_ddpm.evaluator import evaluate, load_evaluator  # noqa: E402
from cond_ddpm.sampling import generate, load_pipeline, set_scheduler  # noqa: E402
from pipeline_cond_ddpm import (  # noqa: E402
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_SCHEDULER,
    multi_hot,
)

DEFAULT_SAMPLER = (DEFAULT_SCHEDULER, DEFAULT_NUM_INFERENCE_STEPS)
SAMPLERS = [("ddpm", 1000), ("ddim", 50), ("dpm++", 25), ("dpm++", 20), ("dpm++", 10), DEFAULT_SAMPLER]
GUIDANCE_SCALES = sorted({1.0, 2.0, 3.0, 5.0, DEFAULT_GUIDANCE_SCALE})


def main():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--pipeline", required=True, help="a folder saved by the training script")
    parser.add_argument("--evaluator_checkpoint", required=True, help="ResNet18 evaluator ({'model': state_dict})")
    parser.add_argument(
        "--seeds", type=cli.seed, nargs="+", default=[0], help="several seeds average out the 32-image noise"
    )
    parser.add_argument(
        "--splits", nargs="+", default=["test", "new_test"], choices=["test", "new_test"], help="label files to draw"
    )
    parser.add_argument("--quick", action="store_true", help="two samplers at two guidance scales only")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    class_names = read_objects_json()
    pipeline = load_pipeline(args.pipeline, class_names, device)
    evaluator = load_evaluator(args.evaluator_checkpoint, len(class_names), device)
    label_files = {"test": TEST_JSON, "new_test": NEW_TEST_JSON}
    splits = {name: read_label_sets(label_files[name], class_names) for name in args.splits}
    quick = ([DEFAULT_SAMPLER, ("dpm++", 10)], [1.0, DEFAULT_GUIDANCE_SCALE])
    samplers, scales = quick if args.quick else (SAMPLERS, GUIDANCE_SCALES)

    rows = []
    for (scheduler, steps), guidance in [(s, g) for s in samplers for g in scales]:
        set_scheduler(pipeline, scheduler)
        accuracies, seconds = {split: [] for split in splits}, []
        for seed in args.seeds:
            for split, label_sets in splits.items():
                start = time.perf_counter()
                images = generate(pipeline, label_sets, steps, guidance, seed=seed)
                seconds.append(time.perf_counter() - start)  # both files hold 32 label sets
                accuracies[split].append(evaluate(evaluator, images, multi_hot(label_sets, class_names)))
        rows.append(
            {
                "scheduler": scheduler,
                "steps": steps,
                "guidance_scale": guidance,
                "seconds_for_32_images": sum(seconds) / len(seconds),
                **{split: sum(a) / len(a) for split, a in accuracies.items()},
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nSampling {args.pipeline} on {where}, seeds {args.seeds}\n")
    accuracy_columns = "".join(f" {split} accuracy |" for split in splits)
    print(f"| scheduler | steps | guidance | seconds for 32 images |{accuracy_columns}")
    print("|---" * (4 + len(splits)) + "|")
    for r in rows:
        accuracies = "".join(f" {r[split]:.3f} |" for split in splits)
        print(
            f"| {r['scheduler']} | {r['steps']} | {r['guidance_scale']} | {r['seconds_for_32_images']:.1f} |"
            + accuracies
        )
    reference = [r for r in rows if r["scheduler"] == "ddpm"]
    if reference:
        best = max(reference, key=lambda r: sum(r[split] for split in splits))
        matching = [r for r in rows if all(r[split] >= best[split] for split in splits)]
        fastest = min(matching, key=lambda r: (r["steps"], r["seconds_for_32_images"]))
        print(
            f"\nFewest steps with no accuracy lost against DDPM-1000 (guidance {best['guidance_scale']}): "
            f"{fastest['scheduler']} {fastest['steps']} steps, guidance {fastest['guidance_scale']}"
        )
    if args.output:
        atomic_write_text(
            args.output,
            json.dumps({"device": where, "pipeline": args.pipeline, "seeds": args.seeds, "rows": rows}, indent=2)
            + "\n",
        )


if __name__ == "__main__":
    main()
