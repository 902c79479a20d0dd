"""evaluate_iclevr.py: the course's metric, the official checkpoint format, scoring, re-scoring, training, figures."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from cond_ddpm.data import NEW_TEST_JSON, TEST_JSON, read_label_sets
from cond_ddpm.grids import LINE_HEIGHT, captioned_grid
from evaluate_iclevr import (
    DEFAULT_SCHEDULER,
    accuracy,
    build_evaluator,
    evaluate,
    load_evaluator,
    main,
    save_evaluator,
    set_scheduler,
)
from pipeline_cond_ddpm import multi_hot


def test_accuracy_counts_top_k_hits_over_all_labels():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.2, 0.9, 0.3, 0.1]])
    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    # Image 0: top-2 = {0, 1}, both right. Image 1: top-1 = {1}, wrong.
    assert accuracy(scores, labels) == 2 / 3


def test_accuracy_is_pooled_not_averaged_per_image():
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.9, 0.8, 0.1, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    # Image 0: 1 of 1. Image 1: top-3 = {0, 1, 2}, of which 0 and 2 are right: 2 of 3.
    pooled, per_image = (1 + 2) / (1 + 3), (1 / 1 + 2 / 3) / 2
    assert accuracy(scores, labels) == pooled and pooled != per_image


def test_accuracy_needs_labels():
    with pytest.raises(ValueError, match="at least one object"):
        accuracy(torch.rand(2, 4), torch.zeros(2, 4))


def test_official_checkpoint_format_loads_and_scores(tmp_path, class_names):
    """A checkpoint written the way the course's evaluator.py expects ({'model': state_dict}) loads and scores."""
    torch.manual_seed(0)
    model = resnet18(weights=None)
    model.fc = nn.Sequential(nn.Linear(512, 24), nn.Sigmoid())
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pth")
    loaded = load_evaluator(tmp_path / "checkpoint.pth", len(class_names))
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    labels = multi_hot([["red cube"], ["red cube", "blue cube"], ["gray sphere"]], class_names)
    with torch.no_grad():
        expected = accuracy(model.eval()(images.float() / 127.5 - 1), labels)
    assert evaluate(loaded, images, labels) == expected
    assert list(torch.load(save_evaluator(loaded, tmp_path / "again.pth"), weights_only=True)) == ["model"]


class NotATensor:
    pass


@pytest.mark.parametrize(
    "content, message",
    [
        (
            lambda: {"state_dict": build_evaluator(24).state_dict()},
            r"must hold \{'model': state_dict\}.*found \['state_dict'\]",
        ),
        (lambda: {"model": build_evaluator(10).state_dict()}, "does not hold a ResNet18 evaluator for 24 objects"),
        (lambda: {"model": NotATensor()}, "is not a PyTorch checkpoint of plain tensors"),
        (lambda: b"garbage", "is not a PyTorch checkpoint of plain tensors"),
    ],
    ids=["other-key", "other-shape", "pickled-object", "not-a-checkpoint"],
)
def test_bad_checkpoints_are_refused_clearly(tmp_path, class_names, content, message):
    path = tmp_path / "checkpoint.pth"
    value = content()
    path.write_bytes(value) if isinstance(value, bytes) else torch.save(value, path)
    with pytest.raises(ValueError, match=message):
        load_evaluator(path, len(class_names))


def score(tiny_pipeline_dir, evaluator_checkpoint, output_dir, *extra):
    return main(
        [
            "score",
            "--pipeline",
            str(tiny_pipeline_dir),
            "--evaluator_checkpoint",
            str(evaluator_checkpoint),
            "--output_dir",
            str(output_dir),
            "--num_inference_steps",
            "2",
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_score_writes_images_grids_and_metrics_that_rescore_exactly(
    tmp_path, tiny_pipeline_dir, evaluator_checkpoint, class_names
):
    out = tmp_path / "out"
    metrics = score(tiny_pipeline_dir, evaluator_checkpoint, out, "--seed", "7", "--batch_size", "20")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert {"test", "new_test", "num_inference_steps", "guidance_scale", "scheduler", "seed"} <= set(saved)
    assert saved["seed"] == 7 and saved["num_inference_steps"] == 2 and saved["scheduler"] == DEFAULT_SCHEDULER
    for split, label_file in (("test", TEST_JSON), ("new_test", NEW_TEST_JSON)):
        count = len(read_label_sets(label_file, class_names))
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(f"{i}.png" for i in range(count))
        with Image.open(out / split / "0.png") as image:
            assert image.size == (64, 64)  # generated at 16x16, upsampled before saving
        # The grid shows each image with its label set under it.
        label_sets = read_label_sets(label_file, class_names)
        with Image.open(out / f"{split}_grid.png") as grid:
            expected = captioned_grid([Image.open(out / split / f"{i}.png") for i in range(count)], label_sets)
            assert np.array_equal(np.asarray(grid), np.asarray(expected))
    # Anyone re-scoring the PNGs gets exactly the numbers in metrics.json.
    rescored = main(
        ["rescore", "--output_dir", str(out), "--evaluator_checkpoint", str(evaluator_checkpoint), "--device", "cpu"]
    )
    assert rescored == {"test": saved["test"], "new_test": saved["new_test"]}
    evaluator = load_evaluator(evaluator_checkpoint, len(class_names))
    label_sets = read_label_sets(TEST_JSON, class_names)
    pngs = torch.stack(
        [torch.from_numpy(np.array(Image.open(out / "test" / f"{i}.png"))).permute(2, 0, 1) for i in range(32)]
    )
    assert evaluate(evaluator, pngs, multi_hot(label_sets, class_names)) == saved["test"]


def test_images_do_not_depend_on_the_batch_size(tmp_path, tiny_pipeline_dir, evaluator_checkpoint):
    score(tiny_pipeline_dir, evaluator_checkpoint, tmp_path / "a", "--batch_size", "64")
    score(tiny_pipeline_dir, evaluator_checkpoint, tmp_path / "b", "--batch_size", "5")
    assert (tmp_path / "a" / "test" / "9.png").read_bytes() == (tmp_path / "b" / "test" / "9.png").read_bytes()


@pytest.mark.parametrize("name", ["dpm++sde", "euler-a"])
def test_stochastic_samplers_add_noise_from_the_generator(tiny_pipeline, name):
    set_scheduler(tiny_pipeline, name)
    scheduler = tiny_pipeline.scheduler

    def first_step(seed):
        scheduler.set_timesteps(3)  # a fresh run each time
        zeros = torch.zeros(1, 3, 4, 4)
        return scheduler.step(
            zeros, scheduler.timesteps[0], zeros, generator=torch.Generator().manual_seed(seed)
        ).prev_sample

    assert torch.equal(first_step(0), first_step(0))
    assert not torch.equal(first_step(0), first_step(1))  # plain DPM-Solver++ ignores the generator


def test_score_keeps_an_existing_output_unless_told(tmp_path, tiny_pipeline_dir, evaluator_checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("earlier results")
    with pytest.raises(SystemExit, match="out already exists and is not empty"):
        score(tiny_pipeline_dir, evaluator_checkpoint, out)
    assert (out / "metrics.json").read_text() == "earlier results"
    score(tiny_pipeline_dir, evaluator_checkpoint, out, "--overwrite_output_dir")
    assert "test" in json.loads((out / "metrics.json").read_text())
    assert not list(tmp_path.glob(".incomplete-*"))
    shown = capsys.readouterr().err
    assert re.search(r"drawing test\.json: .*/32 ", shown) and re.search(r"drawing new_test\.json: .*/32 ", shown)


def test_denoise_draws_the_process(tmp_path, tiny_pipeline_dir, capsys):
    main(
        [
            "denoise",
            "--pipeline",
            str(tiny_pipeline_dir),
            "--labels",
            "red sphere,cyan cylinder, cyan cube",
            "--num_inference_steps",
            "10",
            "--num_frames",
            "4",
            "--output",
            str(tmp_path / "denoise.png"),
            "--device",
            "cpu",
        ]
    )
    with Image.open(tmp_path / "denoise.png") as figure:  # each frame captioned with its timestep and the labels
        assert figure.size == (4 * 128, 128 + 4 * LINE_HEIGHT)
        captions = np.asarray(figure)[128:, :128]
    for line in range(4):
        assert (captions[line * LINE_HEIGHT : (line + 1) * LINE_HEIGHT] < 128).any(), line
    shown = capsys.readouterr()
    assert "t = [" in shown.out and re.search(r"denoising: 100%.* 10/10 ", shown.err)


def test_train_command_saves_an_evaluator_in_the_official_format(tmp_path, synthetic_dir, class_names):
    output = tmp_path / "evaluator.pth"
    held_out = main(
        [
            "train",
            "--train_data_dir",
            str(synthetic_dir / "images"),
            "--train_json",
            str(synthetic_dir / "train.json"),
            "--output",
            str(output),
            "--num_epochs",
            "1",
            "--validation_fraction",
            "0.34",
            "--device",
            "cpu",
        ]
    )
    assert 0 <= held_out <= 1
    assert json.loads(output.with_suffix(".json").read_text())["held_out_accuracy"] == held_out
    load_evaluator(output, len(class_names))
