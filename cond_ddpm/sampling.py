"""Drawing scenes from a saved pipeline for scoring and figures: loading it, choosing its sampler, generating 8-bit
images one seed per label set, and the strip of a denoising process.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cond_ddpm.evaluator import first_sentence, to_evaluator_pixels
from cond_ddpm.grids import captioned_grid
from pipeline_cond_ddpm import (
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_SCHEDULER,
    DISTILLED_NUM_INFERENCE_STEPS,
    DISTILLED_SCHEDULER,
    SCHEDULERS,
    CondDDPMPipeline,
)

DENOISING_FRAMES = 8  # the steps a denoising strip shows: `evaluate_iclevr.py denoise` and the demo


def load_pipeline(path, class_names: list[str], device) -> CondDDPMPipeline:
    """Load a pipeline and check that it speaks the vocabulary of the label files it will be scored on."""
    if not Path(path, "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved pipeline (it has no model_index.json)")
    try:
        pipeline = CondDDPMPipeline.from_pretrained(path).to(device)
    except Exception as error:  # diffusers raises many types for an edited or damaged folder: OSError, KeyError, ...
        raise ValueError(f"cannot load the pipeline in {path}: {first_sentence(error)}") from None
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


def default_sampler(pipeline: CondDDPMPipeline) -> tuple[str, int]:
    """The sampler and step count a pipeline is scored with unless told otherwise: the project's default, or a
    distilled pipeline's LCM scheduler in its few steps."""
    if pipeline.is_distilled:
        return DISTILLED_SCHEDULER, DISTILLED_NUM_INFERENCE_STEPS
    return DEFAULT_SCHEDULER, DEFAULT_NUM_INFERENCE_STEPS


def set_scheduler(pipeline: CondDDPMPipeline, name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if pipeline.is_distilled != (name == DISTILLED_SCHEDULER):
        raise ValueError(
            f"the pipeline in {pipeline.name_or_path} is distilled: it samples with its {DISTILLED_SCHEDULER} scheduler"
            " only"
            if pipeline.is_distilled
            else f"the {DISTILLED_SCHEDULER} sampler draws with a distilled pipeline only (distill_conditional_ddpm.py"
            f" makes one from this one); choose another of {', '.join(n for n in SCHEDULERS if n != name)}"
        )
    try:
        pipeline.scheduler = SCHEDULERS[name](pipeline.scheduler.config)
    except (ValueError, NotImplementedError) as error:  # a noise schedule the DDPM scheduler has and this one lacks
        raise ValueError(
            f"the {name} sampler cannot run the noise schedule in {pipeline.name_or_path}/scheduler: {error}"
        ) from None


def check_num_inference_steps(pipeline: CondDDPMPipeline, num_inference_steps: int) -> None:
    """Refuse more steps than the noise schedule has, before the first: some samplers fail only after the last."""
    limit = pipeline.scheduler.config.num_train_timesteps
    if num_inference_steps > limit:
        raise ValueError(
            f"--num_inference_steps {num_inference_steps} exceeds the {limit} steps of the pipeline's noise schedule"
            " (num_train_timesteps in scheduler/scheduler_config.json)"
        )


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
        if not torch.isfinite(images).all():  # uint8 would turn NaN into black pixels and score them
            raise FloatingPointError(
                "the pipeline drew NaN or infinite pixels: its weights have diverged, or the sampler cannot run"
                f" {num_inference_steps} steps; nothing was scored"
            )
        # Quantise where the pipeline's PNGs would, then upsample and quantise again for the 64x64 files.
        images = (images.float() * 255).round() / 255
        chunks.append(to_evaluator_pixels(images.cpu()))
        progress.update(len(batch))
    progress.close()
    return torch.cat(chunks)


def denoising_strip(
    pipeline,
    labels: list[str],
    num_inference_steps: int,
    guidance_scale: float,
    num_frames: int = DENOISING_FRAMES,
    seed: int = 0,
) -> tuple[Image.Image, list[int]]:
    """The denoising of one label set as a captioned strip of `num_frames` steps, and the timesteps it shows."""
    # Each frame is another step: more frames than steps would only repeat them (and 10**10 would take 80 GB here).
    num_frames = min(num_frames, num_inference_steps)
    keep = set(np.linspace(0, num_inference_steps - 1, num_frames).round().astype(int).tolist())
    frames = []

    def capture(pipe, step, timestep, tensors):
        if step in keep:
            frames.append((int(timestep), (tensors["image"][:1] / 2 + 0.5).clamp(0, 1)))

    generator = torch.Generator(pipeline.device).manual_seed(seed)
    pipeline.set_progress_bar_config(desc="denoising", unit="step")
    pipeline([labels], num_inference_steps, guidance_scale, generator=generator, callback_on_step_end=capture)
    captions = [[f"t={timestep}", *labels] for timestep, _ in frames]
    images = [image[0].mul(255).round().byte().cpu() for _, image in frames]
    return captioned_grid(images, captions, columns=len(frames)), [timestep for timestep, _ in frames]
