"""CondDDPMPipeline and LabelEmbedding: label forms, guidance, schedulers, serialisation, bad input."""

import argparse
import math
import re

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image

from cond_ddpm import cli
from pipeline_cond_ddpm import (
    MAX_GUIDANCE_SCALE,
    PRESETS,
    SCHEDULERS,
    CondDDPMPipeline,
    LabelEmbedding,
    multi_hot,
)


def generate(pipeline, labels, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "pt", **kwargs}
    return pipeline(labels, generator=torch.Generator().manual_seed(seed), **kwargs).images


def down_path_attentions(unet):
    """(resolution, attention module) for each attention on the UNet's way down."""
    resolution = unet.config.sample_size
    for block in unet.down_blocks:
        for attention in getattr(block, "attentions", None) or []:
            yield resolution, attention
        resolution //= 2 if block.downsamplers else 1


def reloaded_label_embedding(pipeline, folder, class_names):
    """Save and reload `pipeline`; the reloaded label embedding must give the same object tokens. Returns it."""
    pipeline.save_pretrained(folder)
    loaded = CondDDPMPipeline.from_pretrained(folder).label_embedding
    labels = multi_hot([["red cube", "red sphere"]], class_names)
    assert torch.equal(
        loaded(labels)["encoder_hidden_states"], pipeline.label_embedding(labels)["encoder_hidden_states"]
    )
    return loaded


def count_unet_batches(pipeline):
    """Record the batch size of every UNet call."""
    sizes = []
    pipeline.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


# --- Label forms ---------------------------------------------------------------------------------------------------


def test_names_indices_and_multi_hot_give_the_same_labels(class_names):
    by_name = multi_hot([["red cube", "blue sphere"], ["gray cylinder"]], class_names)
    by_index = multi_hot([[1, np.int64(10)], [torch.tensor(16)]], class_names)
    mixed = multi_hot([["red cube", 10], [16]], class_names)
    from_numpy = multi_hot(by_name.numpy(), class_names)
    assert by_name.shape == (2, 24)
    assert by_name[0].nonzero().flatten().tolist() == [1, 10]
    for other in (by_index, mixed, from_numpy):
        assert torch.equal(other, by_name)


@pytest.mark.parametrize(
    "labels",
    [
        [["red cube", "blue sphere"]],
        [[1, 10]],
        torch.eye(24)[[1]] + torch.eye(24)[[10]],
        np.eye(24)[[1]] + np.eye(24)[[10]],
    ],
    ids=["names", "indices", "tensor", "numpy"],
)
def test_every_label_form_draws_the_same_image(tiny_pipeline, labels):
    reference = generate(tiny_pipeline, [["red cube", "blue sphere"]])
    assert torch.equal(generate(tiny_pipeline, labels), reference)


def test_output_types_and_return_dict(tiny_pipeline):
    labels = [["red cube"], ["cyan sphere", "gray cube"]]
    pil = tiny_pipeline(labels, num_inference_steps=2, output_type="pil").images
    array = tiny_pipeline(labels, num_inference_steps=2, output_type="np").images
    tensor = tiny_pipeline(labels, num_inference_steps=2, output_type="pt").images
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (16, 16)
    assert array.shape == (2, 16, 16, 3) and array.min() >= 0 and array.max() <= 1
    assert tensor.shape == (2, 3, 16, 16)
    as_tuple = tiny_pipeline(labels, num_inference_steps=2, output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (2, 3, 16, 16)


def test_labels_change_the_image(tiny_pipeline):
    assert not torch.equal(generate(tiny_pipeline, [["red cube"]]), generate(tiny_pipeline, [["blue sphere"]]))


# --- The null label and guidance -----------------------------------------------------------------------------------


def test_null_label_has_a_learned_embedding_of_its_own(class_names):
    torch.manual_seed(0)
    embedding = LabelEmbedding(class_names, embedding_dim=32)
    null = embedding(torch.zeros(1, 24))["class_labels"]
    single = embedding(torch.eye(24))["class_labels"]
    assert null.abs().sum() > 0  # not zero by accident of a bias-free layer
    assert not torch.isclose(single, null.expand_as(single)).all(dim=1).any()
    null.sum().backward()
    assert embedding.null.grad is not None and embedding.null.grad.abs().sum() > 0


def test_empty_label_set_draws_unconditionally(tiny_pipeline):
    assert torch.equal(generate(tiny_pipeline, [[]]), generate(tiny_pipeline, torch.zeros(1, 24)))


def test_guidance_runs_both_passes_in_one_batch(tiny_pipeline):
    sizes = count_unet_batches(tiny_pipeline)
    generate(tiny_pipeline, [["red cube"], ["blue sphere"]], guidance_scale=3.0, num_inference_steps=2)
    assert sizes == [4, 4]


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0])
def test_guidance_scale_up_to_one_skips_the_unconditional_pass(tiny_pipeline, guidance_scale):
    sizes = count_unet_batches(tiny_pipeline)
    generate(tiny_pipeline, [["red cube"], ["blue sphere"]], guidance_scale=guidance_scale, num_inference_steps=2)
    assert sizes == [2, 2]


def test_guidance_changes_the_image(tiny_pipeline):
    unguided = generate(tiny_pipeline, [["red cube"]], guidance_scale=1.0)
    assert not torch.equal(generate(tiny_pipeline, [["red cube"]], guidance_scale=4.0), unguided)


# --- Schedulers, determinism, serialisation ------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_swapped_in_schedulers_work(tiny_pipeline, scheduler_class):
    tiny_pipeline.scheduler = scheduler_class.from_config(tiny_pipeline.scheduler.config)
    images = generate(tiny_pipeline, [["red cube"]], num_inference_steps=4)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_a_fresh_scheduler_starts_from_the_noise_level_of_its_own_steps(tiny_pipeline):
    # With "leading" spacing (the trained pipelines' configs) Euler's first noise level depends on the steps: read
    # before set_timesteps, it was the 1000-step schedule's.
    tiny_pipeline.scheduler = EulerDiscreteScheduler.from_config(
        tiny_pipeline.scheduler.config, timestep_spacing="leading"
    )
    first_call = generate(tiny_pipeline, [["red cube"]], num_inference_steps=4)
    assert torch.equal(first_call, generate(tiny_pipeline, [["red cube"]], num_inference_steps=4))


def test_generator_makes_results_reproducible(tiny_pipeline):
    first, again = generate(tiny_pipeline, [["red cube"]], seed=3), generate(tiny_pipeline, [["red cube"]], seed=3)
    assert torch.equal(first, again)
    assert not torch.equal(first, generate(tiny_pipeline, [["red cube"]], seed=4))


def test_save_and_load_round_trip_exactly(tiny_pipeline, tmp_path):
    tiny_pipeline.scheduler = DPMSolverMultistepScheduler.from_config(tiny_pipeline.scheduler.config)
    tiny_pipeline.save_pretrained(tmp_path)
    loaded = CondDDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.label_embedding, LabelEmbedding)
    assert isinstance(loaded.scheduler, DPMSolverMultistepScheduler)
    assert loaded.class_names == tiny_pipeline.class_names
    labels = [["red cube", "blue sphere"], []]
    assert torch.equal(
        generate(loaded, labels, guidance_scale=2.0), generate(tiny_pipeline, labels, guidance_scale=2.0)
    )
    weights = sorted(
        p.relative_to(tmp_path).as_posix()
        for p in tmp_path.rglob("*")
        if p.suffix in {".safetensors", ".bin", ".pt", ".pkl"}
    )
    assert weights == [
        "label_embedding/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
    ]


def test_save_pretrained_pushes_the_finished_folder(tiny_pipeline, tmp_path, monkeypatch):
    uploaded = {}
    monkeypatch.setattr(
        "pipeline_cond_ddpm.create_repo", lambda repo_id, **kw: type("Repo", (), {"repo_id": f"me/{repo_id}"})
    )
    monkeypatch.setattr(
        "pipeline_cond_ddpm.upload_folder",
        lambda **kw: uploaded.update(kw, files=sorted(p.name for p in kw["folder_path"].iterdir())),
    )
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, repo, token=None: throw(EntryNotFoundError(repo))))
    tiny_pipeline.save_pretrained(tmp_path / "tiny", push_to_hub=True, token="hf_x")
    assert uploaded["repo_id"] == "me/tiny" and uploaded["token"] == "hf_x"
    assert {"pipeline_cond_ddpm.py", "model_index.json", "README.md"} <= set(uploaded["files"])


def throw(error):
    raise error


# --- The diffusers pipeline API ------------------------------------------------------------------------------------


class RecordImages(PipelineCallback):
    tensor_inputs = ["image"]

    def __init__(self):
        super().__init__()
        self.steps = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.steps.append((step_index, callback_kwargs["image"].shape))
        return {"image": callback_kwargs["image"] * 0}


def test_pipeline_callbacks_see_and_replace_the_sample(tiny_pipeline):
    record, other = RecordImages(), RecordImages()
    images = generate(tiny_pipeline, [["red cube"]], callback_on_step_end=MultiPipelineCallbacks([record, other]))
    assert record.steps == other.steps == [(i, (1, 3, 16, 16)) for i in range(3)]
    single = RecordImages()
    assert torch.equal(generate(tiny_pipeline, [["red cube"]], callback_on_step_end=single), images)
    assert torch.equal(images, torch.full_like(images, 0.5)), "the last step's zeroed sample, shown as grey"


def test_callback_tensor_inputs_are_named_as_in_diffusers(tiny_pipeline):
    seen = []
    generate(
        tiny_pipeline,
        [["red cube"]],
        callback_on_step_end=lambda pipe, step, t, tensors: seen.append(sorted(tensors)),
        callback_on_step_end_tensor_inputs=["image"],
    )
    assert seen == [["image"]] * 3
    for names in (["x"], "image", None):
        with pytest.raises(
            ValueError, match=r"callback_on_step_end_tensor_inputs must be a list of names from \['image'\]"
        ):
            generate(
                tiny_pipeline, [["red cube"]], callback_on_step_end=print, callback_on_step_end_tensor_inputs=names
            )


@pytest.mark.parametrize(
    "returned, message",
    [
        ([1], r"must return None or a dict of tensors named from \['image'\], got list"),
        (
            {"latents": torch.zeros(1)},
            r"must return None or a dict of tensors named from \['image'\], got \['latents'\]",
        ),
        ({"image": "noise"}, r"must return 'image' as a tensor of shape \(2, 3, 16, 16\), got str"),
        (
            {"image": torch.zeros(1, 3, 4, 4)},
            r"must return 'image' as a tensor of shape \(2, 3, 16, 16\), got shape \(1, 3, 4, 4\)",
        ),
    ],
    ids=["list", "unknown-name", "not-a-tensor", "wrong-shape"],
)
def test_a_callback_that_returns_something_else_is_refused_clearly(tiny_pipeline, returned, message):
    with pytest.raises(ValueError, match=f"callback_on_step_end {message}"):
        generate(tiny_pipeline, [["red cube"], ["blue sphere"]], callback_on_step_end=lambda *args: returned)


def test_a_sample_a_callback_returns_in_another_dtype_is_taken_back_as_the_pipelines(tiny_pipeline):
    def in_float64(pipeline, step, timestep, tensors):
        return {"image": tensors["image"].double()}

    images = generate(tiny_pipeline, [["red cube"]], callback_on_step_end=in_float64)
    assert images.dtype == torch.float32
    assert torch.equal(images, generate(tiny_pipeline, [["red cube"]]))


def test_a_rectangular_sample_size_draws_rectangular_images(tiny_pipeline):
    tiny_pipeline.unet.register_to_config(sample_size=(16, 8))
    assert generate(tiny_pipeline, [["red cube"], ["blue sphere"]]).shape == (2, 3, 16, 8)


def test_sampling_runs_on_the_execution_device(tiny_pipeline, monkeypatch):
    """With model CPU offload the modules sit on the CPU between calls; the hooks run them on the execution device."""
    asked = []
    monkeypatch.setattr(
        CondDDPMPipeline, "_execution_device", property(lambda pipe: asked.append(True) or torch.device("cpu"))
    )
    generate(tiny_pipeline, [["red cube"]])
    assert asked


# --- Presets -------------------------------------------------------------------------------------------------------


def test_tiny_preset_is_small_enough_for_tests_and_cpus(tiny_pipeline):
    parameters = sum(p.numel() for m in (tiny_pipeline.unet, tiny_pipeline.label_embedding) for p in m.parameters())
    assert parameters <= 2_000_000


@pytest.mark.parametrize(
    "preset, resolution, unet_class, attended",
    [("gpu", 64, UNet2DConditionModel, [16, 8]), ("cpu", 32, UNet2DConditionModel, [8])],
)
def test_presets_attend_at_their_resolutions(class_names, preset, resolution, unet_class, attended):
    unet = CondDDPMPipeline.from_preset(preset, class_names, resolution=resolution).unet
    assert type(unet) is unet_class
    assert sorted({resolution for resolution, _ in down_path_attentions(unet)}, reverse=True) == attended


def test_the_tiny_preset_has_no_attention(class_names):
    assert type(CondDDPMPipeline.from_preset("tiny", class_names, resolution=16).unet) is UNet2DModel


def test_cross_attention_attends_to_object_tokens(class_names):
    torch.manual_seed(0)
    pipeline = CondDDPMPipeline.from_preset("cpu", class_names, resolution=16)
    pipeline.set_progress_bar_config(disable=True)
    conditioning = pipeline.label_embedding(multi_hot([["red cube", "blue sphere"]], class_names))
    assert conditioning["encoder_hidden_states"].shape == (1, 25, 128)
    assert conditioning["encoder_attention_mask"].sum() == 3  # two objects and the null token
    red_cube = generate(pipeline, [["red cube"]])
    assert red_cube.shape == (1, 3, 16, 16)
    assert not torch.equal(red_cube, generate(pipeline, [["blue sphere"]]))


def test_shared_word_tokens_tie_objects_that_share_a_word(class_names, tmp_path):
    torch.manual_seed(0)
    pipeline = CondDDPMPipeline.from_preset("cpu", class_names, resolution=16)
    embedding = pipeline.label_embedding
    with torch.no_grad():
        embedding.object_tokens.weight.zero_()  # what is left of each token is the sum of its words' vectors
    tokens = embedding(torch.zeros(1, 24))["encoder_hidden_states"][0]
    token = dict(zip(class_names, tokens[:-1], strict=True))
    assert torch.allclose(token["red cube"] - token["red sphere"], token["blue cube"] - token["blue sphere"], atol=1e-6)
    assert torch.allclose(
        token["red cube"] - token["blue cube"], token["red cylinder"] - token["blue cylinder"], atol=1e-6
    )
    assert not torch.allclose(token["red cube"], token["red sphere"])
    assert tokens[-1].abs().sum() == 0  # the null token has no words
    tokens.sum().backward()
    assert embedding.word_tokens.weight.grad.abs().sum(dim=1).gt(0).all()

    reloaded = reloaded_label_embedding(pipeline, tmp_path, class_names)
    assert torch.equal(reloaded.word_tokens.weight, embedding.word_tokens.weight)


# --- Bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, message",
    [
        ([["red cub"]], "unknown object name 'red cub'; did you mean 'red cube'"),
        ([[24]], "object index 24 is out of range; indices run from 0 to 23"),
        ([[-1]], "object index -1 is out of range"),
        (torch.zeros(2, 10), r"must have shape \(batch, 24\), got \(2, 10\)"),
        (torch.full((1, 24), 2.0), "may only hold 0 and 1, got 2.0"),
        (np.full((1, 24), np.nan), "may only hold 0 and 1, got nan"),
        (np.eye(24, dtype=complex)[[1]] * (1 + 1j), r"may only hold 0 and 1, got \(1\+1j\)"),
        (torch.tensor(3), "non-empty batch of label sets, got tensor\\(3\\)"),
        ([], "non-empty batch"),
        (["red cube", "blue sphere"], "each label set must be a list"),
        ([["red cube", "red cube"]], "names 'red cube' twice"),
        ([[1.5]], "an object must be a name or an index, got 1.5"),
        ([[True]], "an object must be a name or an index, got True"),
        ([[torch.tensor(True)]], r"an object must be a name or an index, got tensor\(True\)"),
    ],
    ids=[
        "unknown-name",
        "index-too-big",
        "index-negative",
        "width",
        "not-0-1",
        "nan",
        "complex",
        "0-d-tensor",
        "empty-batch",
        "flat-list",
        "duplicate",
        "float",
        "bool",
        "bool-tensor",
    ],
)
def test_bad_labels_are_refused_clearly(tiny_pipeline, labels, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(labels, num_inference_steps=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance_scale": -1.0}, "guidance_scale must be a number from 0 to 100 .*got -1.0"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be a number from 0 to 100 .*got inf"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a number from 0 to 100 .*got nan"),
        ({"guidance_scale": 1e6}, "guidance_scale must be a number from 0 to 100 .*got 1000000.0"),
        ({"guidance_scale": "3"}, "guidance_scale must be a number from 0 to 100 .*got '3'"),
        ({"guidance_scale": True}, "guidance_scale must be a number from 0 to 100 .*got True"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer from 1 to 1000 .*got 0"),
        ({"num_inference_steps": True}, "num_inference_steps must be an integer from 1 to 1000 .*got True"),
        ({"num_inference_steps": torch.tensor(True)}, "num_inference_steps must be an integer .*got tensor\\(True\\)"),
        ({"num_inference_steps": "25"}, "num_inference_steps must be an integer from 1 to 1000 .*got '25'"),
        ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer from 1 to 1000 .*got 2.5"),
        ({"output_type": "jpg"}, "output_type must be one of pil, np, pt, got 'jpg'"),
        ({"return_dict": "no"}, "return_dict must be True or False, got 'no'"),
        ({"generator": [torch.Generator()]}, "got 1 generators for 2 images; give one per image, or one"),
        ({"generator": 42}, "generator must be a torch.Generator or a list of them, one per image, got 42"),
        ({"generator": "seed"}, "generator must be a torch.Generator .*got 'seed'"),
        ({"generator": [torch.Generator(), 7]}, "generator must be a torch.Generator .*got \\[<torch"),
        ({"callback_on_step_end": 3}, "callback_on_step_end must be callable, got 3"),
    ],
    ids=[
        "negative-guidance",
        "inf-guidance",
        "nan-guidance",
        "huge-guidance",
        "string-guidance",
        "bool-guidance",
        "zero-steps",
        "bool-steps",
        "bool-tensor-steps",
        "string-steps",
        "fractional-steps",
        "output",
        "return-dict",
        "generators",
        "int-generator",
        "string-generator",
        "list-with-a-non-generator",
        "callback",
    ],
)
def test_bad_call_arguments_are_refused_clearly(tiny_pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline([["red cube"], ["blue sphere"]], **{"num_inference_steps": 1, **kwargs})


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_more_steps_than_the_schedule_has_are_refused_for_every_scheduler(tiny_pipeline, scheduler):
    tiny_pipeline.scheduler = SCHEDULERS[scheduler](tiny_pipeline.scheduler.config)
    # An LCM scheduler picks its steps among the 50 of the solver it was distilled on, the others among all 1000.
    limit = 50 if scheduler == "lcm" else 1000
    with pytest.raises(ValueError, match=f"num_inference_steps must be an integer from 1 to {limit} .*got {limit + 1}"):
        tiny_pipeline([["red cube"]], num_inference_steps=limit + 1)


def test_numpy_and_torch_integers_are_step_counts(tiny_pipeline):
    for steps in (np.int64(2), torch.tensor(2)):
        images = tiny_pipeline([["red cube"]], num_inference_steps=steps, output_type="pt").images
        assert images.shape == (1, 3, 16, 16)


def test_the_pipeline_and_the_command_line_cap_guidance_alike(tiny_pipeline):
    generate(tiny_pipeline, [["red cube"]], guidance_scale=cli.guidance_scale(str(MAX_GUIDANCE_SCALE)))
    above = repr(math.nextafter(MAX_GUIDANCE_SCALE, math.inf))
    with pytest.raises(argparse.ArgumentTypeError, match=f"got '{above}'"):
        cli.guidance_scale(above)
    with pytest.raises(ValueError, match=f"guidance_scale must be a number from 0 to .*got {above}"):
        generate(tiny_pipeline, [["red cube"]], guidance_scale=float(above))


def test_numpy_and_torch_numbers_are_guidance_scales(tiny_pipeline):
    reference = generate(tiny_pipeline, [["red cube"]], guidance_scale=3.0)
    for scale in (3, np.float32(3), np.int64(3), torch.tensor(3.0)):
        assert torch.equal(generate(tiny_pipeline, [["red cube"]], guidance_scale=scale), reference)


@pytest.mark.parametrize("sample_size", [0, -4, 15, (16, 15), 16.0, (16, 16, 16)])
def test_a_sample_size_the_unet_cannot_halve_is_refused_clearly(tiny_pipeline, sample_size):
    tiny_pipeline.unet.register_to_config(sample_size=sample_size)
    message = f"unet.config.sample_size {re.escape(repr(sample_size))} does not suit the UNet: each side must be a"
    with pytest.raises(ValueError, match=f"{message} positive multiple of 2"):
        generate(tiny_pipeline, [["red cube"]])


def test_labels_given_as_a_dict_are_refused_clearly(tiny_pipeline):
    with pytest.raises(ValueError, match="labels must be a non-empty batch of label sets, got {'red cube': 1}"):
        tiny_pipeline({"red cube": 1}, num_inference_steps=1)


@pytest.mark.parametrize("path", ["ABSOLUTE", "runs/tny", "./tny"])
def test_a_mistyped_local_path_is_named_as_one_not_sent_to_the_hub(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    path = str(tmp_path / "tny") if path == "ABSOLUTE" else path
    with pytest.raises(FileNotFoundError, match=f"^{path} is not a folder: give a saved pipeline folder"):
        CondDDPMPipeline.from_pretrained(path)


@pytest.mark.parametrize(
    "preset, resolution, message",
    [
        (
            "gpu",
            60,
            "resolution 60 does not suit the 'gpu' UNet: it halves the image 3 times, so the resolution must be a"
            " positive multiple of 8",
        ),
        ("tiny", 0, "resolution 0"),
        ("huge", 64, "unknown preset 'huge'; choose one of " + ", ".join(PRESETS)),
    ],
)
def test_bad_presets_and_resolutions_are_refused_clearly(class_names, preset, resolution, message):
    with pytest.raises(ValueError, match=message):
        CondDDPMPipeline.from_preset(preset, class_names, resolution)
