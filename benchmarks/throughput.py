"""Training throughput: images/s and peak memory per preset and setting, and the training script against a bare loop.

    python benchmarks/throughput.py                 # tiny and gpu presets, every setting
    python benchmarks/throughput.py --presets gpu  # one preset (on a GPU lent for minutes: gpu alone)
    python benchmarks/throughput.py --quick         # tiny preset only, fewer steps: a few minutes on a CPU

On a CPU only one setting is compiled (tiny, fp32, channels_last): compiling takes minutes there.

Settings: fp32 vs bf16 autocast, channels_last on/off, eager vs torch.compile, each in a bare PyTorch loop (the same
model and batch, random data already in memory). Then the real training script runs the same model and batch
(channels_last and eager, its defaults; fp32 on a CPU, bf16 on a GPU, as `accelerate_config.yaml` trains), and its
images/s, read from its own logs, is compared with the bare loop's in the same setting. Each measurement runs in a
process of its own, so its peak memory is its own.
"""

import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import one_process_training_command  # noqa: E402

from cond_ddpm import cli  # noqa: E402
from cond_ddpm.atomic_io import atomic_write_text  # noqa: E402
from cond_ddpm.data import read_objects_json  # noqa: E402
from cond_ddpm.training.objective import Denoiser  # noqa: E402
from pipeline_cond_ddpm import CondDDPMPipeline  # noqa: E402


def bare_loop(preset, resolution, batch_size, steps, warmup, bf16, channels_last, compile):
    """Images/s and peak memory of forward + loss + backward + AdamW step, and nothing else."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    pipeline = CondDDPMPipeline.from_preset(preset, read_objects_json(), resolution)
    model = Denoiser(pipeline.unet, pipeline.label_embedding).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    step_model = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    images = torch.randn(batch_size, 3, resolution, resolution, device=device).to(memory_format=memory_format)
    labels = (torch.rand(batch_size, 24, device=device) < 0.08).float()
    timesteps = torch.randint(0, 1000, (batch_size,), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(step_model(images, timesteps, labels).float(), images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"images_per_second": steps * batch_size / seconds, "peak_memory_mb": peak_memory_mb(device)}


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # the process's peak resident memory


def in_own_process(function, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def training_script(preset, resolution, batch_size, steps, data_scenes, precision, loader_workers):
    """The training script's images/s on the same model and batch, read from its tensorboard log."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = one_process_training_command(
            "--preset",
            preset,
            "--resolution",
            resolution,
            "--train_batch_size",
            batch_size,
            "--max_train_steps",
            steps,
            "--logging_steps",
            max(1, steps // 10),
            "--synthetic_scenes",
            data_scenes,
            "--save_images_epochs",
            100000,
            "--num_validation_images",
            1,
            "--ddpm_num_inference_steps",
            1,
            "--dataloader_num_workers",
            loader_workers,
            "--checkpointing_steps",
            10 * steps,
            "--output_dir",
            output_dir,
            "--mixed_precision",
            {"fp32": "no", "bf16": "bf16"}[precision],
        )
        subprocess.run(command, check=True, capture_output=True, text=True)
        return logged_images_per_second(output_dir)


def logged_images_per_second(output_dir) -> float:
    """The median images/s a training run logged, without its first (warm-up) and last intervals."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(next(Path(output_dir, "logs").rglob("events.out.tfevents.*")).as_posix())
    events.Reload()
    rates = [event.value for event in events.Scalars("images_per_second")][1:-1]
    return sorted(rates)[len(rates) // 2]


def main():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny preset for a few steps: checks every setting")
    parser.add_argument(
        "--presets", nargs="+", choices=["tiny", "gpu"], default=["tiny", "gpu"], help="the model sizes to time"
    )
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    # preset: (resolution, batch, timed steps, warm-up steps); the 78M-parameter base model is slow on a CPU.
    presets = {"tiny": (32, 64 if on_gpu else 32, 30, 5), "gpu": (64, 64, 30, 5) if on_gpu else (64, 8, 6, 2)}
    presets = {name: presets[name] for name in args.presets}
    if args.quick:
        presets = {"tiny": (32, 32, 10, 3)}
    rows = []
    for preset, (resolution, batch_size, steps, warmup) in presets.items():
        settings = list(itertools.product([False, True], [False, True], [False, True]))
        for bf16, channels_last, compile in settings:
            if compile and (args.quick or not on_gpu) and (bf16 or not channels_last or preset == "gpu"):
                continue  # compiling takes minutes on a CPU: there, one compiled setting of the tiny model
            result = in_own_process(
                bare_loop, preset, resolution, batch_size, steps, warmup, bf16, channels_last, compile
            )
            rows.append(
                {
                    "preset": preset,
                    "resolution": resolution,
                    "batch": batch_size,
                    "precision": "bf16" if bf16 else "fp32",
                    "channels_last": channels_last,
                    "compile": compile,
                    **result,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nTraining throughput on {device}, torch {torch.__version__}\n")
    print("| preset | resolution | batch | precision | channels_last | compile | images/s | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['resolution']} | {r['batch']} | {r['precision']} | {r['channels_last']}"
            f" | {r['compile']} | {r['images_per_second']:.1f} | {r['peak_memory_mb']:.0f} |"
        )

    comparisons = []
    precision = "bf16" if on_gpu else "fp32"  # on a CPU without bf16 matrix units, bf16 does not pay (README)
    for preset, (resolution, batch_size, _, _) in presets.items():
        bare = next(
            r
            for r in rows
            if r["preset"] == preset and r["precision"] == precision and r["channels_last"] and not r["compile"]
        )
        script_steps = 40 if args.quick or not on_gpu and preset == "gpu" else 200  # 10 logged intervals or more
        script = training_script(
            preset,
            resolution,
            batch_size,
            script_steps,
            data_scenes=200 if args.quick else 1000,
            precision=precision,
            loader_workers=4 if on_gpu else 1,
        )
        comparisons.append(
            {
                "preset": preset,
                "precision": precision,
                "bare": bare["images_per_second"],
                "script": script,
                "overhead": 1 - script / bare["images_per_second"],
            }
        )
    print(
        "\n| preset | precision | bare loop images/s | training script images/s | script overhead |"
        "\n|---|---|---|---|---|"
    )
    for c in comparisons:
        print(
            f"| {c['preset']} | {c['precision']} | {c['bare']:.1f} | {c['script']:.1f} | {100 * c['overhead']:.1f}% |"
        )
    if args.output:
        atomic_write_text(
            args.output,
            json.dumps({"device": device, "settings": rows, "script_vs_bare": comparisons}, indent=2) + "\n",
        )


if __name__ == "__main__":
    main()
