"""Publishing a trained pipeline: a model card in its folder, an early check that the Hub can be reached, the upload.

The saved folder is self-contained (see `CondDDPMPipeline.save_pretrained`), so the pushed repository loads with plain
diffusers: `DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)`.
"""

import shutil
from pathlib import Path

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder, whoami

from cond_ddpm.atomic_io import LOCK_NAME

# A training run's folder also holds checkpoints, logs and per-epoch samples: none of that belongs on the Hub.
IGNORE_PATTERNS = ["checkpoint-*", ".incomplete-*", LOCK_NAME, "logs/*", "best/*", "samples/*"]
SAMPLE_GRID = "sample_grid.png"
TAGS = ["cond-ddpm", "i-clevr", "class-conditional", "ddpm", "classifier-free-guidance"]
# Settings that describe the run; the rest (paths, logging, Hub credentials) say nothing about the model.
CARD_SETTINGS = (
    "preset",
    "resolution",
    "synthetic_scenes",
    "ddpm_num_steps",
    "ddpm_beta_schedule",
    "prediction_type",
    "condition_dropout",
    "snr_gamma",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
    "use_ema",
    "ema_max_decay",
    "ema_inv_gamma",
    "ema_power",
    "random_flip",
    "same_colour_repeats",
    "mixed_precision",
    "seed",
)

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A label-conditioned DDPM that draws {{ resolution }}x{{ resolution }} multi-object scenes (i-CLEVR: 3 shapes x 8
colours, 1-3 objects per image) from lists of object names, trained with cond-ddpm's `train_conditional_ddpm.py`.

![samples of held-out label sets]({{ sample_grid }})

## Usage

```python
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

pipe = DiffusionPipeline.from_pretrained("{{ location }}", trust_remote_code=True)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
labels = [["red cube", "blue sphere"], ["gray cylinder", "yellow sphere", "cyan cube"]]
images = pipe(labels, num_inference_steps=10, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
images[0].save("scene.png")
```

The objects it knows: {{ class_names }}.

## Evaluation

{{ evaluation }}

## Training

- Data: {{ data }}
- Model: the `{{ preset }}` preset, {{ parameters }}M parameters, {{ steps }} optimisation steps
- Settings:

| setting | value |
|---|---|
{{ settings }}
"""


def check_access(repo_id: str, token: str | None) -> str:
    """Fail before training when the Hub is out of reach or no token is known, naming what to do."""
    try:
        user = whoami(token=token)["name"]
    except Exception as error:  # offline, no token, revoked token: all end the same way
        raise ValueError(
            f"--push_to_hub {repo_id!r} needs the Hugging Face Hub and a token with write access, and the check"
            f" failed ({failure_reason(error, token)}); run `hf auth login`, pass --hub_token, or drop --push_to_hub"
        ) from None
    return user


def failure_reason(error: Exception, token: str | None) -> str:
    """The first line of a Hub client's error (httpx, HTTP and Hub errors alike), never showing the token."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return reason.replace(token, "***") if token else reason


def write_model_card(folder, pipeline, settings: dict, metrics: dict, sample_grid, steps: int, location: str):
    """Write README.md (and the sample grid it shows) into a saved pipeline folder."""
    folder = Path(folder)
    if Path(sample_grid).is_file():
        shutil.copyfile(sample_grid, folder / SAMPLE_GRID)
    if metrics:
        evaluation = (
            "Accuracy of the ResNet18 evaluator on the label sets of i-CLEVR's test files (top-k objects in the"
            f" label set, pooled), sampled with {metrics['scheduler']}, {metrics['num_inference_steps']} steps,"
            f" guidance scale {metrics['guidance_scale']}:\n\n| label file | accuracy |\n|---|---|\n"
            f"| test.json | {metrics['test']:.4f} |\n| new_test.json | {metrics['new_test']:.4f} |"
        )
    else:
        evaluation = (
            "No evaluator was given to the training run. Score it with"
            " `python evaluate_iclevr.py score --pipeline DIR --evaluator_checkpoint checkpoint.pth --output_dir OUT`."
        )
    if settings.get("dataset_name"):
        data = f"the Hub dataset `{settings['dataset_name']}`"
    elif settings.get("train_data_dir"):
        data = "i-CLEVR images with their `train.json` labels"
    else:
        data = f"the built-in synthetic i-CLEVR set ({settings['synthetic_scenes']} rendered scenes, 3 images each)"
    parameters = sum(p.numel() for module in (pipeline.unet, pipeline.label_embedding) for p in module.parameters())
    card = ModelCard.from_template(
        ModelCardData(library_name="diffusers", license="apache-2.0"),
        template_str=CARD_TEMPLATE,
        title=f"cond-ddpm: {settings['preset']} preset, {settings['resolution']}x{settings['resolution']}",
        resolution=settings["resolution"],
        sample_grid=SAMPLE_GRID,
        location=location,
        class_names=", ".join(pipeline.class_names),
        evaluation=evaluation,
        data=data,
        preset=settings["preset"],
        parameters=f"{parameters / 1e6:.2f}",
        steps=steps,
        settings="\n".join(f"| {key} | {settings.get(key)} |" for key in CARD_SETTINGS),
    )
    populate_model_card(card, tags=TAGS).save(folder / "README.md")


def push(folder, repo_id: str, token: str | None, private: bool) -> str:
    """Upload a saved pipeline folder (without checkpoints, logs or per-epoch samples) from the main process."""
    repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        token=token,
        commit_message="Upload CondDDPMPipeline",
        ignore_patterns=IGNORE_PATTERNS,
    )
    return f"https://huggingface.co/{repo_id}"
