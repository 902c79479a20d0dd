"""What a training run draws and how it ends, shared by both training scripts: validation grids (scored, when an
evaluator is given, with the best pipeline kept in `best/`), the final scores, and the saved pipeline with its card."""

import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cond_ddpm import hub
from cond_ddpm.atomic_io import atomic_write, staged_contents, staged_directory
from cond_ddpm.data import NEW_TEST_JSON, TEST_JSON, read_label_sets
from cond_ddpm.evaluator import evaluate
from cond_ddpm.grids import save_captioned_grid
from cond_ddpm.sampling import generate, set_scheduler
from cond_ddpm.training.stopping import StopRequested
from pipeline_cond_ddpm import CondDDPMPipeline, multi_hot, usage_snippet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How a run draws its validation samples and final scores."""

    scheduler: str | None  # a name of SCHEDULERS; None: the pipeline's own (a distilled pipeline's LCM scheduler)
    num_inference_steps: int
    guidance_scale: float
    seed: int
    batch_size: int

    def describe(self, pipeline) -> str:
        return self.scheduler or type(pipeline.scheduler).__name__


def sample(sampling: Sampling, pipeline, label_sets, callback_on_step_end=None) -> torch.Tensor:
    """8-bit images of `label_sets`, drawn as `sampling` says."""
    sampler = CondDDPMPipeline(pipeline.unet, pipeline.label_embedding, pipeline.scheduler)
    if sampling.scheduler is not None:
        set_scheduler(sampler, sampling.scheduler)
    sampler.set_progress_bar_config(disable=True)
    return generate(
        sampler,
        label_sets,
        sampling.num_inference_steps,
        sampling.guidance_scale,
        sampling.seed,
        sampling.batch_size,
        callback_on_step_end,
    )


class Validation:
    """A run's validation samples: the held-out `label_sets` drawn into a captioned grid, sent to every tracker and,
    with an evaluator, scored; the pipeline of the best score so far is kept in `best/`."""

    def __init__(self, sampling: Sampling, label_sets, evaluator, output_dir):
        self.sampling, self.label_sets, self.evaluator = sampling, label_sets, evaluator
        self.output_dir = Path(output_dir)
        self.best_accuracy = -1.0

    def draw(self, accelerator, pipeline, epoch: int, step: int, stop):
        """Draw, log and score the samples of `pipeline` at `epoch`. A stop request abandons them: the next step
        boundary saves a checkpoint and stops."""
        try:
            images = sample(self.sampling, pipeline, self.label_sets, stop.check_during_sampling)
        except StopRequested:
            logger.info("stop requested: validation samples abandoned")
            return
        grid_dir = self.output_dir / "samples"
        grid = save_captioned_grid(grid_dir / f"epoch_{epoch:04d}.png", images, self.label_sets)
        atomic_write(grid_dir / "latest.png", lambda temporary: shutil.copyfile(grid, temporary))
        with Image.open(grid) as picture:  # the captioned grid, as one 8-bit (1, H, W, 3) image, to every tracker
            captioned = np.asarray(picture)[None]
        for tracker in accelerator.trackers:
            options = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({"validation": captioned}, step, **options)
        if self.evaluator is None:
            return
        accuracy = evaluate(self.evaluator, images, multi_hot(self.label_sets, pipeline.class_names))
        accelerator.log({"validation_accuracy": accuracy}, step=step)
        logger.info(f"epoch {epoch}: accuracy on {len(self.label_sets)} held-out label sets {accuracy:.4f}")
        if accuracy <= self.best_accuracy:
            return
        self.best_accuracy = accuracy
        best = self.output_dir / "best"
        with staged_directory(best, overwrite=True) as folder:
            pipeline.save_pretrained(folder)
        logger.info(f"new best validation accuracy {accuracy:.4f}: pipeline saved to {best}")


def final_scores(sampling: Sampling, pipeline, evaluator) -> dict:
    """Accuracy on test.json and new_test.json, for the record only: no choice made by training depends on it."""
    scores = {}
    for split, path in (("test", TEST_JSON), ("new_test", NEW_TEST_JSON)):
        label_sets = read_label_sets(path, pipeline.class_names)
        scores[split] = evaluate(
            evaluator, sample(sampling, pipeline, label_sets), multi_hot(label_sets, pipeline.class_names)
        )
    scores.update(
        scheduler=sampling.describe(pipeline),
        num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale,
    )
    logger.info(f"test accuracy {scores['test']:.4f}, new_test accuracy {scores['new_test']:.4f}")
    return scores


def sampling_command(folder: Path, distilled: bool = False) -> str:
    """The model card's usage snippet as one shell line: it draws scene.png from the saved pipeline with plain
    diffusers and its default sampler."""
    statements = "; ".join(line for line in usage_snippet(str(folder), distilled).splitlines() if line)
    return f"python -c {shlex.quote(statements)}"


def save_final(args, accelerator, pipeline, sampling, evaluator, global_step: int, repo_id: str | None, card_text):
    """Save the pipeline with its model card (`card_text`: a `hub.CardText`) into `--output_dir`, and push it to
    `repo_id`, if given."""
    output_dir = Path(args.output_dir)
    metrics = final_scores(sampling, pipeline, evaluator) if evaluator is not None else {}
    with staged_contents(output_dir, marker="model_index.json") as folder:
        pipeline.save_pretrained(folder)
        location = repo_id or str(output_dir.resolve())
        settings = {**vars(args), "mixed_precision": accelerator.mixed_precision}
        grid = output_dir / "samples" / "latest.png"
        hub.write_model_card(
            folder, pipeline, settings, metrics, grid, global_step, location, repo_id, args.hub_token, card_text
        )
    print(f"Pipeline saved to {output_dir}; its latest sample grid is {grid}")
    print(f"Draw a scene with it (plain diffusers): {sampling_command(output_dir, pipeline.is_distilled)}")
    if repo_id:
        url = hub.push(output_dir, repo_id, args.hub_token, args.logging_dir)
        print(f"Pushed to {url}")
