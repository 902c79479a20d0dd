"""CondDDPMPipeline: a DDPM that draws multi-object scenes from multi-hot object labels (i-CLEVR).

This file is also the pipeline's remote code: `save_pretrained` copies it into the saved folder, so the folder
loads with plain diffusers (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`) where this
project is not installed. It therefore imports nothing but torch, diffusers, huggingface_hub and the standard library.
"""

import difflib
import inspect
import json
import numbers
import os
import shutil
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    ImagePipelineOutput,
    LCMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, snapshot_download, upload_folder
from torch import nn

# Model sizes, one per use. `attention_levels` counts UNet levels from full resolution (0); `cross_attention` switches
# from an added label embedding alone to `UNet2DConditionModel`, whose attention layers also attend to one token per
# object, made of a vector of its own plus one per word of its name ("red", "cube"), shared by objects that share it.
PRESETS = {
    # Tests and smoke runs: 0.7M parameters, no attention.
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(), cross_attention=False),
    # The CPU model, trained at 32x32: 4.0M parameters, cross-attention at 8x8 and in the middle.
    "cpu": dict(block_out_channels=(32, 64, 128), layers_per_block=1, attention_levels=(2,), cross_attention=True),
    # The GPU model, trained at 64x64: cross-attention at 16x16, 8x8 and in the middle.
    "gpu": dict(
        block_out_channels=(64, 128, 256, 256), layers_per_block=2, attention_levels=(2, 3), cross_attention=True
    ),
}
OUTPUT_TYPES = ("pil", "np", "pt")
# Samplers by name, each built from the trained DDPM config; "dpm++sde" and "euler-a" add fresh noise at every step.
# "lcm" is a distilled pipeline's own, and the only one that suits it.
SCHEDULERS = {
    "ddpm": DDPMScheduler.from_config,
    "ddim": DDIMScheduler.from_config,
    "dpm++": DPMSolverMultistepScheduler.from_config,
    "dpm++sde": partial(DPMSolverMultistepScheduler.from_config, algorithm_type="sde-dpmsolver++"),
    "euler-a": EulerAncestralDiscreteScheduler.from_config,
    "lcm": LCMScheduler.from_config,
}
DISTILLED_SCHEDULER = "lcm"
# The sampling defaults of every command, the model card and the docs (docs/results.md: chosen on held-out label sets).
DEFAULT_SCHEDULER = "euler-a"
DEFAULT_NUM_INFERENCE_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 3.0
# A distilled pipeline (`distill_conditional_ddpm.py`) samples with its own LCMScheduler, one UNet pass per step.
DISTILLED_NUM_INFERENCE_STEPS = 4
MAX_GUIDANCE_SCALE = 100.0  # far past any useful guidance: beyond it the samples saturate to black or white
HUB_TAGS = ["cond-ddpm", "i-clevr", "class-conditional", "ddpm", "classifier-free-guidance"]
DISTILLED_HUB_TAGS = [*HUB_TAGS, "consistency-distillation", "lcm"]


def usage_snippet(location: str, distilled: bool = False) -> str:
    """Python that loads the pipeline at `location` (a Hub id or folder) with plain diffusers and draws two scenes
    with the project's default sampler, steps and guidance (a distilled pipeline: its own sampler, in
    `DISTILLED_NUM_INFERENCE_STEPS`): what a model card shows. Its strings are all in double quotes, so that it also
    runs as `python -c '...'` (the line the training scripts print at the end)."""
    steps = DISTILLED_NUM_INFERENCE_STEPS if distilled else DEFAULT_NUM_INFERENCE_STEPS
    imports, set_sampler = "DiffusionPipeline", ""
    if not distilled:
        make_scheduler = SCHEDULERS[DEFAULT_SCHEDULER]
        scheduler_class = getattr(make_scheduler, "func", make_scheduler).__self__.__name__
        options = "".join(f", {key}={value!r}" for key, value in getattr(make_scheduler, "keywords", {}).items())
        imports += f", {scheduler_class}"
        set_sampler = f"pipe.scheduler = {scheduler_class}.from_config(pipe.scheduler.config{options})\n"
    return f"""import torch
from diffusers import {imports}

pipe = DiffusionPipeline.from_pretrained({json.dumps(location)}, trust_remote_code=True)
{set_sampler}labels = [["red cube", "blue sphere"], ["gray cylinder", "yellow sphere", "cyan cube"]]
steps, guidance, generator = {steps}, {DEFAULT_GUIDANCE_SCALE}, torch.Generator().manual_seed(0)
images = pipe(labels, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
images[0].save("scene.png")
"""


def guidance_scale_embedding(guidance_scale: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """What a distilled UNet takes as `timestep_cond`: the sinusoidal embedding of w = guidance_scale - 1, as
    diffusers' LCM pipelines make it (`get_guidance_scale_embedding`), so w = 0 is the conditional prediction alone."""
    return get_timestep_embedding((guidance_scale - 1) * 1000, embedding_dim, flip_sin_to_cos=False)


def multi_hot(labels, class_names: Sequence[str]) -> torch.Tensor:
    """Turn labels into a float multi-hot tensor of shape (B, len(class_names)).

    `labels` is a list of label sets, each a list of object names and/or indices (`[["red cube", 9], []]`; an empty
    set is the unconditional "null" label), or a multi-hot tensor or array of shape (B, C) holding only 0 and 1.
    """
    num_classes = len(class_names)
    is_batch = hasattr(labels, "__len__") and getattr(labels, "ndim", 1) > 0  # a 0-d array has __len__, but no length
    if isinstance(labels, (str, bytes, Mapping)) or not is_batch or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty batch of label sets, got {labels!r}")
    if not isinstance(labels, (list, tuple)):
        try:
            tensor = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"labels must be a list of label sets or a multi-hot array, got {type(labels).__name__}"
            ) from None
        if tensor.ndim != 2 or tensor.shape[1] != num_classes:
            raise ValueError(
                f"a multi-hot label tensor must have shape (batch, {num_classes}), got {tuple(tensor.shape)}"
            )
        # Compared before the cast to float, which would drop a complex value's imaginary part.
        outside = tensor[(tensor != 0) & (tensor != 1)]
        if len(outside):
            raise ValueError(f"a multi-hot label tensor may only hold 0 and 1, got {outside[0].item()!r}")
        return tensor.to(torch.float32)
    encoded = torch.zeros(len(labels), num_classes)
    for row, label_set in enumerate(labels):
        if isinstance(label_set, (str, int)) or not isinstance(label_set, Sequence):
            raise ValueError(
                f"labels[{row}] is {label_set!r}; each label set must be a list of object names or indices,"
                ' e.g. [["red cube", "blue sphere"]] for one image'
            )
        for label in label_set:
            index = _class_index(label, class_names)
            if encoded[row, index]:
                raise ValueError(f"labels[{row}] names {class_names[index]!r} twice; each object appears at most once")
            encoded[row, index] = 1
    return encoded


def _class_index(label, class_names: Sequence[str]) -> int:
    if isinstance(label, str):
        if label not in class_names:
            close = difflib.get_close_matches(label, class_names, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown object name {label!r}{hint} Known objects: {', '.join(class_names)}")
        return class_names.index(label)
    index = _as_integer(label)
    if index is None:
        raise ValueError(f"an object must be a name or an index, got {label!r} of type {type(label).__name__}")
    if not 0 <= index < len(class_names):
        raise ValueError(f"object index {index} is out of range; indices run from 0 to {len(class_names) - 1}")
    return index


def _python_number(value):
    """The Python number a numpy scalar, 0-d array or 0-d tensor holds; any other value unchanged."""
    return value.item() if getattr(value, "ndim", None) == 0 else value


def _as_integer(value) -> int | None:
    """`value` as an int if it is one (Python, numpy or a 0-d tensor), else None. A bool is not: as a count or an
    index, `True` is a mistake."""
    value = _python_number(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_real(value) -> float | None:
    """`value` as a float if it is a real number (Python, numpy or a 0-d tensor), else None. A bool is not."""
    value = _python_number(value)
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def _fits_unet(side, levels: int) -> bool:
    """Whether an image side suits a UNet of `levels` levels, which halves the image at every level but the last."""
    return isinstance(side, int) and not isinstance(side, bool) and side > 0 and side % 2 ** (levels - 1) == 0


class LabelEmbedding(ModelMixin, ConfigMixin):
    """Map multi-hot object labels (B, C) to the UNet's conditioning.

    Each object has a learned vector; a label set is the sum of its objects' vectors, passed through an MLP and
    added to the UNet's time embedding, so it reaches every resolution. The empty (all-zero) label set, the "null"
    condition of classifier-free guidance, has its own learned vector. With `cross_attention_dim`, the module also
    hands the UNet one token per present object (plus the null token, so no row attends to nothing). An object's
    token is its own vector plus one vector per word of its name ("red", "cube"): objects that share a colour or a
    shape share part of their token, so what is learned about one carries to the others.

    Args:
        class_names (`list[str]`): the vocabulary, in objects.json index order.
        embedding_dim (`int`): width of the UNet's time embedding.
        cross_attention_dim (`int`, *optional*): width of the object tokens; `None` for a `UNet2DModel`.
    """

    @register_to_config
    def __init__(self, class_names: list[str], embedding_dim: int, cross_attention_dim: int | None = None):
        super().__init__()
        self.objects = nn.Embedding(len(class_names), embedding_dim)
        self.null = nn.Parameter(torch.randn(embedding_dim) * 0.02)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        if cross_attention_dim is not None:
            self.object_tokens = nn.Embedding(len(class_names) + 1, cross_attention_dim)  # the null token's is last
            words = sorted({word for name in class_names for word in name.split()})
            name_words = torch.zeros(len(class_names) + 1, len(words))  # the null token has no words
            for row, name in enumerate(class_names):
                name_words[row, [words.index(word) for word in name.split()]] = 1
            self.register_buffer("name_words", name_words, persistent=False)
            self.word_tokens = nn.Embedding(len(words), cross_attention_dim)

    def forward(self, multi_hot_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the keyword arguments for the UNet's forward call."""
        labels = multi_hot_labels.to(self.objects.weight.dtype)
        summed = labels @ self.objects.weight
        is_null = labels.sum(dim=1, keepdim=True) == 0
        conditioning = {"class_labels": self.mlp(torch.where(is_null, self.null, summed))}
        if self.config.cross_attention_dim is not None:
            tokens = self.object_tokens.weight + self.name_words @ self.word_tokens.weight
            conditioning["encoder_hidden_states"] = tokens.expand(labels.shape[0], -1, -1)
            conditioning["encoder_attention_mask"] = torch.cat([labels, torch.ones_like(labels[:, :1])], dim=1)
        return conditioning


class CondDDPMPipeline(DiffusionPipeline):
    r"""
    Pipeline for label-conditioned image generation with classifier-free guidance.

    Parameters:
        unet ([`UNet2DModel`] or [`UNet2DConditionModel`]):
            Predicts the noise (or velocity) of a noisy image, given the timestep and the label conditioning.
        label_embedding ([`LabelEmbedding`]):
            Maps multi-hot labels to the UNet's conditioning; its config holds the object vocabulary.
        scheduler ([`SchedulerMixin`]):
            The noise schedule; a [`DDPMScheduler`] as trained. Any diffusers scheduler made with
            `from_config(pipe.scheduler.config)` (DDIM, DPM-Solver++, ...) works in its place. A distilled pipeline
            (a UNet with `time_cond_proj_dim`, which takes the guidance scale as an input) comes with the
            [`LCMScheduler`] it was distilled for.
    """

    model_cpu_offload_seq = "label_embedding->unet"
    _callback_tensor_inputs = ["image"]

    # `label_embedding` is typed loosely: remote code loads LabelEmbedding from its own copy of this file.
    def __init__(self, unet: UNet2DModel | UNet2DConditionModel, label_embedding: ModelMixin, scheduler):
        super().__init__()
        self.register_modules(unet=unet, label_embedding=label_embedding, scheduler=scheduler)

    @classmethod
    def from_preset(
        cls,
        name: str,
        class_names: list[str],
        resolution: int,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: str = "v_prediction",
    ) -> "CondDDPMPipeline":
        """Build an untrained pipeline of the model size `name` (a key of `PRESETS`) for `resolution`-pixel images."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[name]
        levels = len(preset["block_out_channels"])
        if not _fits_unet(resolution, levels):
            raise ValueError(
                f"resolution {resolution!r} does not suit the {name!r} UNet: it halves the image {levels - 1} times,"
                f" so the resolution must be a positive multiple of {2 ** (levels - 1)}"
            )
        channels, attention = preset["block_out_channels"], preset["attention_levels"]
        if preset["cross_attention"]:
            unet = UNet2DConditionModel(
                sample_size=resolution,
                in_channels=3,
                out_channels=3,
                block_out_channels=channels,
                layers_per_block=preset["layers_per_block"],
                down_block_types=["CrossAttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)],
                mid_block_type="UNetMidBlock2DCrossAttn",
                up_block_types=[
                    "CrossAttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(levels))
                ],
                cross_attention_dim=channels[-1],
                attention_head_dim=8,
                class_embed_type="identity",
                resnet_time_scale_shift="scale_shift",
            )
        else:
            unet = UNet2DModel(
                sample_size=resolution,
                block_out_channels=channels,
                layers_per_block=preset["layers_per_block"],
                down_block_types=["AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)],
                up_block_types=["AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(levels))],
                add_attention=bool(attention),
                class_embed_type="identity",
                resnet_time_scale_shift="scale_shift",
            )
        label_embedding = LabelEmbedding(
            class_names=list(class_names),
            embedding_dim=channels[0] * 4,
            cross_attention_dim=channels[-1] if preset["cross_attention"] else None,
        )
        scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction_type
        )
        return cls(unet=unet, label_embedding=label_embedding, scheduler=scheduler)

    @property
    def class_names(self) -> list[str]:
        return list(self.label_embedding.config.class_names)

    @property
    def is_distilled(self) -> bool:
        """Whether the UNet takes the guidance scale as an input (a consistency-distilled student): then one UNet
        pass per step draws a guided image, instead of a conditional and an unconditional one."""
        return self.unet.config.get("time_cond_proj_dim") is not None

    @property
    def max_inference_steps(self) -> int:
        """The most steps the scheduler can take. The UNet knows num_train_timesteps noise levels (DDPM and DDIM
        refuse more deep inside, others go on); an LCM scheduler picks its steps among the `original_inference_steps`
        of the solver it was distilled on."""
        if isinstance(self.scheduler, LCMScheduler):
            return self.scheduler.config.original_inference_steps
        return self.scheduler.config.num_train_timesteps

    @property
    def image_size(self) -> tuple:
        """(height, width) of the images drawn: the UNet's `sample_size`, one side or a pair."""
        size = self.unet.config.sample_size
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)

    def check_inputs(
        self,
        labels,
        num_inference_steps,
        guidance_scale,
        generator,
        output_type,
        return_dict,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ):
        """Validate the call's arguments and the UNet's image size. Return the labels as a multi-hot tensor, the step
        count as an int and the guidance scale as a float."""
        encoded = multi_hot(labels, self.class_names)
        if num_inference_steps is None:
            num_inference_steps = (
                DISTILLED_NUM_INFERENCE_STEPS if self.is_distilled else self.scheduler.config.num_train_timesteps
            )
        max_steps, limit = self.max_inference_steps, "the scheduler's num_train_timesteps"
        if isinstance(self.scheduler, LCMScheduler):
            limit = "the LCM scheduler's original_inference_steps, the teacher solver's steps it was distilled on"
        steps = _as_integer(num_inference_steps)
        if steps is None or not 1 <= steps <= max_steps:
            raise ValueError(
                f"num_inference_steps must be an integer from 1 to {max_steps} ({limit}), got {num_inference_steps!r}"
            )
        scale = _as_real(guidance_scale)
        if scale is None or not 0 <= scale <= MAX_GUIDANCE_SCALE:  # also refuses nan
            raise ValueError(
                f"guidance_scale must be a number from 0 to {MAX_GUIDANCE_SCALE:g} (1 or less turns guidance off),"
                f" got {guidance_scale!r}"
            )
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(f"generator must be a torch.Generator or a list of them, one per image, got {generator!r}")
        if isinstance(generator, list) and len(generator) != len(encoded):
            raise ValueError(f"got {len(generator)} generators for {len(encoded)} images; give one per image, or one")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(return_dict, bool):
            raise ValueError(f"return_dict must be True or False, got {return_dict!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"callback_on_step_end must be callable, got {callback_on_step_end!r}")
        names = callback_on_step_end_tensor_inputs
        if not isinstance(names, (list, tuple)) or any(name not in self._callback_tensor_inputs for name in names):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be a list of names from {self._callback_tensor_inputs},"
                f" got {names!r}"
            )
        levels = len(self.unet.config.block_out_channels)
        if len(self.image_size) != 2 or not all(_fits_unet(side, levels) for side in self.image_size):
            raise ValueError(
                f"unet.config.sample_size {self.unet.config.sample_size!r} does not suit the UNet: each side must be a"
                f" positive multiple of {2 ** (levels - 1)}, the factor by which it shrinks the image"
            )
        return encoded, steps, scale

    def _image_from_callback(self, outputs, image: torch.Tensor) -> torch.Tensor:
        """The sample after `callback_on_step_end` returned `outputs`: its `"image"`, or `image` if it gives none."""
        if outputs is None:
            return image
        if not isinstance(outputs, Mapping) or not set(outputs) <= set(self._callback_tensor_inputs):
            got = list(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ValueError(
                f"callback_on_step_end must return None or a dict of tensors named from {self._callback_tensor_inputs},"
                f" got {got}"
            )
        returned = outputs.get("image", image)
        if not isinstance(returned, torch.Tensor) or returned.shape != image.shape:
            got = f"shape {tuple(returned.shape)}" if isinstance(returned, torch.Tensor) else type(returned).__name__
            raise ValueError(
                f"callback_on_step_end must return 'image' as a tensor of shape {tuple(image.shape)}, got {got}"
            )
        return returned.to(image)  # a sample in another dtype or on another device would stop the UNet

    @torch.no_grad()
    def __call__(
        self,
        labels,
        num_inference_steps: int | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["image"],  # noqa: B006 (diffusers' signature; never mutated)
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate one image per label set.

        Args:
            labels (`list[list[str | int]]`, `torch.Tensor` or `np.ndarray`):
                The objects to draw: a list of label sets, each a list of object names (`"red cube"`) or indices,
                or a multi-hot array of shape (batch, number of objects). An empty label set draws unconditionally.
            num_inference_steps (`int`, *optional*):
                The number of denoising steps, at most the scheduler's `num_train_timesteps` (an LCM scheduler's
                `original_inference_steps`). Defaults to the bundled DDPM scheduler's full 1000; the project's default
                sampler, `SCHEDULERS[DEFAULT_SCHEDULER]` (Euler ancestral), needs `DEFAULT_NUM_INFERENCE_STEPS` (25).
                A distilled pipeline defaults to `DISTILLED_NUM_INFERENCE_STEPS` (4).
            guidance_scale (`float`, *optional*, defaults to `DEFAULT_GUIDANCE_SCALE` (3.0)):
                Classifier-free guidance weight, from 0 to `MAX_GUIDANCE_SCALE` (100). Values above 1 push the image
                towards its labels, at the cost of a second (unconditional) UNet pass in the same batch; 1 or less
                skips that pass. A distilled UNet takes the scale as an input instead, in its one pass per step.
            generator (`torch.Generator`, *optional*):
                A generator (or one per image) that makes generation deterministic.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (list of `PIL.Image`), `"np"` (array (B, H, W, 3) in [0, 1]) or `"pt"` (tensor (B, 3, H, W)
                in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`~pipelines.ImagePipelineOutput`] instead of a plain tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each step as `callback_on_step_end(pipe, step, timestep, callback_kwargs)`, where
                `callback_kwargs` holds the tensors named by `callback_on_step_end_tensor_inputs`; `image` is the
                current noisy sample in [-1, 1]. A returned `{"image": ...}`, a tensor of the same shape, replaces it.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["image"]`):
                The tensors passed to `callback_on_step_end`, from `._callback_tensor_inputs`. A `PipelineCallback`
                brings its own `tensor_inputs`.

        Example:

        ```py
        >>> from pipeline_cond_ddpm import DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SCHEDULER, SCHEDULERS, CondDDPMPipeline

        >>> pipe = CondDDPMPipeline.from_preset("tiny", ["red cube", "blue sphere"], resolution=16)
        >>> pipe.scheduler = SCHEDULERS[DEFAULT_SCHEDULER](pipe.scheduler.config)
        >>> images = pipe([["red cube", "blue sphere"], ["blue sphere"]], DEFAULT_NUM_INFERENCE_STEPS).images
        >>> len(images), images[0].size
        (2, (16, 16))
        ```

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        labels, num_inference_steps, guidance_scale = self.check_inputs(
            labels,
            num_inference_steps,
            guidance_scale,
            generator,
            output_type,
            return_dict,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        # With model CPU offload the modules wait on the CPU; the execution device is where their hooks run them.
        device = self._execution_device
        labels = labels.to(device)
        do_guidance = guidance_scale > 1 and not self.is_distilled
        if do_guidance:  # conditional and unconditional passes run as one batch
            labels = torch.cat([labels, torch.zeros_like(labels)])
        conditioning = {k: v.to(self.unet.dtype) for k, v in self.label_embedding(labels).items()}
        if self.is_distilled:
            scales = torch.full((len(labels),), guidance_scale, device=device)
            embedding = guidance_scale_embedding(scales, self.unet.config.time_cond_proj_dim)
            conditioning["timestep_cond"] = embedding.to(self.unet.dtype)

        batch_size = len(labels) // 2 if do_guidance else len(labels)
        shape = (batch_size, self.unet.config.in_channels, *self.image_size)
        # Timesteps first: Euler-type schedulers derive init_noise_sigma from them, and before the first set_timesteps
        # it is the 1000-step schedule's (on the trained models' cosine schedule: 20291, not 16.5 for 25 steps).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma

        # Schedulers that add fresh noise at each step take the generator; deterministic ones have no such argument.
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([image, image]) if do_guidance else image
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_output = self.unet(model_input, t, **conditioning).sample
            if do_guidance:
                conditional, unconditional = model_output.chunk(2)
                model_output = unconditional + guidance_scale * (conditional - unconditional)
            image = self.scheduler.step(model_output, t, image, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = {"image": image}
                callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                image = self._image_from_callback(callback_on_step_end(self, i, t, callback_kwargs), image)

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save as diffusers does, plus this file as the pipeline's and the label embedding's remote code.

        With `push_to_hub` (and optionally `repo_id`, `token`, `private`, `commit_message`), the finished folder, code
        included, is uploaded afterwards, with the repository's model card, or a new one that shows how to use it.
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message") if k in kwargs}
        super().save_pretrained(save_directory, **kwargs)
        source = Path(inspect.getsourcefile(type(self)))
        shutil.copyfile(source, Path(save_directory) / f"{REMOTE_PIPELINE_MODULE}.py")
        shutil.copyfile(source, Path(save_directory) / "label_embedding" / f"{REMOTE_LABEL_EMBEDDING_MODULE}.py")
        index_file = Path(save_directory) / "model_index.json"
        index = json.loads(index_file.read_text())
        index["_class_name"] = [REMOTE_PIPELINE_MODULE, type(self).__name__]
        index["label_embedding"] = [REMOTE_LABEL_EMBEDDING_MODULE, type(self.label_embedding).__name__]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if push_to_hub:
            token = hub_kwargs.get("token")
            repo_id = hub_kwargs.get("repo_id", Path(save_directory).name)
            repo_id = create_repo(repo_id, private=hub_kwargs.get("private"), token=token, exist_ok=True).repo_id
            description = (
                "A label-conditioned DDPM (cond-ddpm) that draws i-CLEVR scenes from lists of object names:"
                f"\n\n```python\n{usage_snippet(repo_id, self.is_distilled)}```\n"
            )
            # is_modular: diffusers then takes the description as the card's text instead of its TODO template.
            card = load_or_create_model_card(repo_id, token=token, model_description=description, is_modular=True)
            tags = DISTILLED_HUB_TAGS if self.is_distilled else HUB_TAGS
            populate_model_card(card, tags=[tag for tag in tags if tag not in (card.data.tags or [])])
            card.save(Path(save_directory) / "README.md")
            upload_folder(
                repo_id=repo_id,
                folder_path=save_directory,
                token=token,
                commit_message=hub_kwargs.get("commit_message"),
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # Hub repositories are fetched whole first: diffusers' own download step would resolve the pipeline class
        # from model_index.json, that is, from the repository's remote code.
        if not os.path.isdir(pretrained_model_name_or_path):
            hub_kwargs = {k: kwargs.pop(k) for k in _HUB_DOWNLOAD_KWARGS if k in kwargs}
            pretrained_model_name_or_path = _download(str(pretrained_model_name_or_path), hub_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        # A saved model_index.json names the folder's copies of this file, for plain `DiffusionPipeline`. Loading
        # through this class uses the installed code instead, so it needs no `trust_remote_code`.
        outputs = super().load_config(*args, **kwargs)
        config = outputs[0] if isinstance(outputs, tuple) else outputs
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = cls.__name__
        if config.get("label_embedding", [None])[0] == REMOTE_LABEL_EMBEDDING_MODULE:
            config["label_embedding"] = [LabelEmbedding.__module__, LabelEmbedding.__name__]
        return outputs


# The saved folder's copies of this file; the label embedding's copy needs a name of its own, or loading through the
# installed class would find it in the component folder and run it as remote code.
REMOTE_PIPELINE_MODULE = "pipeline_cond_ddpm"
REMOTE_LABEL_EMBEDDING_MODULE = "label_embedding"
_HUB_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def _download(name: str, hub_kwargs: dict) -> str:
    """The local snapshot of the Hub repository `name`; a mistyped local path is named as such, not sent to the Hub."""
    path = Path(name).expanduser()
    parent = path.parent
    looks_local = path.is_absolute() or name.startswith((".", "~")) or len(path.parts) > 2 or path.exists()
    if looks_local or (parent != Path(".") and parent.is_dir()):
        raise FileNotFoundError(
            f"{name} is not a folder: give a saved pipeline folder, or a Hub repository 'owner/name'"
        )
    try:
        return snapshot_download(name, **hub_kwargs)
    except (ValueError, OSError) as error:  # an invalid repository id, no network, no such repository
        raise OSError(f"cannot load {name!r} from the Hugging Face Hub: {str(error).splitlines()[0]}") from None
