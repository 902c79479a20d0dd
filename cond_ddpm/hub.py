"""Publishing a trained pipeline: a model card in its folder, an early check that the Hub can be reached, the upload.

The saved folder is self-contained (see `CondDDPMPipeline.save_pretrained`), so the pushed repository loads with plain
diffusers: `DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)`.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import EvalResult, ModelCard, create_repo, upload_folder, whoami
from jinja2 import Template

from cond_ddpm.atomic_io import LOCK_NAME
from pipeline_cond_ddpm import DISTILLED_HUB_TAGS, HUB_TAGS, usage_snippet

# A training run's folder also holds checkpoints, logs and per-epoch samples: none of that belongs on the Hub.
IGNORE_PATTERNS = ["checkpoint-*", ".incomplete-*", LOCK_NAME, "best/*", "samples/*"]
SAMPLE_GRID = "sample_grid.png"
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


@dataclass(frozen=True)
class CardText:
    """What a model card says of how its pipeline was made: the model, a sentence, and the settings it lists."""

    model: str  # the title's description, e.g. "cpu preset"
    made_by: str  # how the pipeline was made, e.g. "trained with cond-ddpm's `train_conditional_ddpm.py`"
    setting_names: tuple[str, ...]  # the keys of the run's settings that the card's table shows


def trained_card(preset: str) -> CardText:
    return CardText(f"{preset} preset", "trained with cond-ddpm's `train_conditional_ddpm.py`", CARD_SETTINGS)


# The front matter is the new card's metadata; `write_model_card` adds the rest (tags, model-index).
CARD_TEMPLATE = """---
license: apache-2.0
---

# {{ title }}

A label-conditioned DDPM that draws {{ resolution }}x{{ resolution }} multi-object scenes (i-CLEVR: 3 shapes x 8
colours, 1-3 objects per image) from lists of object names, {{ made_by }}.

![samples of held-out label sets]({{ sample_grid }})

## Usage

```python
{{ usage }}```

The objects it knows: {{ class_names }}.

## Evaluation

{{ evaluation }}

## Training

- Data: {{ data }}
- Model: {{ model }}, {{ parameters }}M parameters, {{ steps }} optimisation steps
- Settings:

| setting | value |
|---|---|
{{ settings }}
"""


def prepare_repo(repo_id: str, token: str | None, private: bool) -> str:
    """Fail before training when the Hub is out of reach or no token is known, naming what to do; else create the
    repository and return its full id (a bare name gains the user's namespace)."""
    try:
        whoami(token=token)
    except Exception as error:  # offline, no token, revoked token: all end the same way
        raise ValueError(
            f"--push_to_hub {repo_id!r} needs the Hugging Face Hub and a token with write access, and the check"
            f" failed ({failure_reason(error, token)}); run `hf auth login`, pass --hub_token, or drop --push_to_hub"
        ) from None
    return create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id


def failure_reason(error: Exception, token: str | None) -> str:
    """The first line of a Hub client's error (httpx, HTTP and Hub errors alike), never showing the token."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return reason.replace(token, "***") if token else reason


def write_model_card(
    folder,
    pipeline,
    settings: dict,
    metrics: dict,
    sample_grid,
    steps: int,
    location: str,
    repo_id=None,
    token=None,
    card_text: CardText | None = None,
):
    """Write README.md (and the sample grid it shows) into a saved pipeline folder; `card_text` says how the pipeline
    was made (default: trained, of `settings["preset"]`).

    With `repo_id`, a card that repository already has on the Hub is kept, as diffusers' training scripts keep it;
    only its tags and, with `metrics`, its `model-index` scores are brought up to date.
    """
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
    card_text = card_text or trained_card(settings["preset"])
    parameters = sum(p.numel() for module in (pipeline.unet, pipeline.label_embedding) for p in module.parameters())
    resolution = pipeline.image_size[0]
    title = f"cond-ddpm: {card_text.model}, {resolution}x{resolution}"
    text = Template(CARD_TEMPLATE).render(
        title=title,
        resolution=resolution,
        made_by=card_text.made_by,
        sample_grid=SAMPLE_GRID,
        usage=usage_snippet(location, pipeline.is_distilled),
        class_names=", ".join(pipeline.class_names),
        evaluation=evaluation,
        data=data,
        model=card_text.model,
        parameters=f"{parameters / 1e6:.2f}",
        steps=steps,
        settings="\n".join(f"| {key} | {settings.get(key)} |" for key in card_text.setting_names),
    )
    if repo_id is None:
        card = ModelCard(text)
    else:  # is_modular: diffusers then takes the text as the new card's, instead of its TODO template
        card = load_or_create_model_card(repo_id, token=token, model_description=text, is_modular=True)
    card.data.license = card.data.license or "apache-2.0"
    if metrics:
        card.data.model_name = card.data.model_name or title
        card.data.eval_results = evaluation_results(metrics)
    tags = DISTILLED_HUB_TAGS if pipeline.is_distilled else HUB_TAGS
    populate_model_card(card, tags=[tag for tag in tags if tag not in (card.data.tags or [])])
    card.save(folder / "README.md")


def evaluation_results(metrics: dict) -> list[EvalResult]:
    """The evaluator's accuracies as `model-index` entries, which the Hub shows on the model's page."""
    return [
        EvalResult(
            task_type="text-to-image",
            task_name="Label-conditioned image generation",
            dataset_type="i-clevr",
            dataset_name=f"i-CLEVR {split}.json",
            dataset_split=split,
            metric_type="accuracy",
            metric_name="ResNet18 evaluator accuracy",
            metric_value=round(metrics[split], 4),
            metric_config=(
                f"{metrics['scheduler']}, {metrics['num_inference_steps']} steps,"
                f" guidance scale {metrics['guidance_scale']}"
            ),
        )
        for split in ("test", "new_test")
    ]


def push(folder, repo_id: str, token: str | None, logging_dir: str = "logs") -> str:
    """Upload a saved pipeline folder (without checkpoints, logs or per-epoch samples) to the repository that
    `prepare_repo` created, from the main process."""
    upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        token=token,
        commit_message="Upload CondDDPMPipeline",
        ignore_patterns=[*IGNORE_PATTERNS, f"{logging_dir}/*"],
    )
    return f"https://huggingface.co/{repo_id}"
