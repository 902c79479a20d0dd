"""evaluate_iclevr.py: the course's metric, the official checkpoint format, scoring, re-scoring, training, figures."""

import fcntl
import io
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from cond_ddpm.atomic_io import LOCK_NAME
from cond_ddpm.data import NEW_TEST_JSON, TEST_JSON, read_label_sets
from cond_ddpm.evaluator import accuracy, build_evaluator, evaluate, load_evaluator, save_evaluator
from cond_ddpm.grids import LINE_HEIGHT, captioned_grid
from cond_ddpm.sampling import set_scheduler
from evaluate_iclevr import MAX_LABEL_SETS, main
from pipeline_cond_ddpm import DEFAULT_SCHEDULER, multi_hot


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


def checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": build_evaluator(24).state_dict()}, buffer)
    return buffer.getvalue()


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
        (lambda: b"", r"is empty \(0 bytes\); it must hold \{'model': state_dict\}"),
        (lambda: checkpoint_bytes()[:1000], "plain tensors: PytorchStreamReader failed reading zip archive"),
        (lambda: bytes(100), "plain tensors: Unsupported operand 0$"),  # not torch's advice to load unsafely
    ],
    ids=["other-key", "other-shape", "pickled-object", "not-a-checkpoint", "empty", "truncated", "zeros"],
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
    score(tiny_pipeline_dir, evaluator_checkpoint, out, "--seed", "1")
    with pytest.raises(SystemExit, match="out already exists and is not empty"):
        score(tiny_pipeline_dir, evaluator_checkpoint, out)
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1
    score(tiny_pipeline_dir, evaluator_checkpoint, out, "--overwrite_output_dir")
    assert json.loads((out / "metrics.json").read_text())["seed"] == 0
    assert not list(tmp_path.glob("**/.incomplete-*"))
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


# --- Faults: every mistake ends in one `error: ...` line, and nothing already written is lost --------------------


def error_line(command, *args) -> str:
    """The message of the SystemExit `command(*args)` must end in: one `error: ...` line (a traceback fails)."""
    with pytest.raises(SystemExit) as exit_info:
        command(*args)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def tree(folder) -> dict:
    """Every file under `folder` and its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def pipeline_copy(tmp_path, tiny_pipeline_dir):
    """A pipeline folder of the test's own, with a file of the user's beside the components."""
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "pipeline")
    (folder / "notes.txt").write_text("mine")
    return folder


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_pipeline_dir, evaluator_checkpoint):
    """A `score` output, one step per image; copy it before changing it."""
    out = tmp_path_factory.mktemp("scored") / "out"
    score(tiny_pipeline_dir, evaluator_checkpoint, out, "--num_inference_steps", "1")
    return out


@pytest.mark.parametrize("kind", ["file", "pipe"])
def test_score_refuses_an_output_dir_that_is_a_file(tmp_path, tiny_pipeline_dir, evaluator_checkpoint, kind):
    """A file, or a pipe or device (/dev/null, which the old code turned into a folder), was replaced by a folder.
    A pipe made here stands in for the device: a test must not risk the machine's /dev/null."""
    target = tmp_path / "results"
    target.write_text("mine") if kind == "file" else os.mkfifo(target)
    message = error_line(score, tiny_pipeline_dir, evaluator_checkpoint, target, "--overwrite_output_dir")
    assert f"--output_dir {target} is a file; --output_dir takes a folder" in message
    assert target.is_fifo() if kind == "pipe" else target.read_text() == "mine"


@pytest.mark.parametrize(
    "output, relation, flag",
    [
        ("pipeline", "is", "--pipeline"),
        (".", "holds", "--pipeline"),
        ("pipeline/unet", "lies inside", "--pipeline"),
        ("labels", "holds", "--test_json"),
        ("evaluator", "holds", "--evaluator_checkpoint"),
    ],
)
def test_score_refuses_an_output_dir_over_its_inputs(tmp_path, pipeline_copy, output, relation, flag):
    """With --overwrite_output_dir, a folder that is or holds an input was replaced: the pipeline being scored,
    every checkpoint beside it and the user's own files."""
    (tmp_path / "labels").mkdir()
    shutil.copy(TEST_JSON, tmp_path / "labels" / "test.json")
    (tmp_path / "evaluator").mkdir()
    checkpoint = save_evaluator(build_evaluator(24), tmp_path / "evaluator" / "checkpoint.pth")
    before = tree(tmp_path)
    message = error_line(
        score,
        pipeline_copy,
        checkpoint,
        tmp_path / output,
        "--overwrite_output_dir",
        "--test_json",
        str(tmp_path / "labels" / "test.json"),
    )
    assert re.search(f"--output_dir .* {relation} the input {flag} ", message), message
    assert tree(tmp_path) == before


@pytest.mark.parametrize("content", ["notes", "foreign-metrics", "half-a-layout"])
def test_overwriting_replaces_only_an_earlier_scores_output(tmp_path, tiny_pipeline_dir, evaluator_checkpoint, content):
    out = tmp_path / "out"
    out.mkdir()
    if content == "notes":  # a folder of the user's, with a test/ folder of their own in it
        (out / "test").mkdir()
        (out / "test" / "test_model.py").write_text("mine")
        (out / "notes.txt").write_text("mine")
    elif content == "foreign-metrics":  # score's layout, but not its metrics.json
        (out / "metrics.json").write_text(json.dumps({"loss": 0.1}))
    else:
        (out / "test").mkdir()
        (out / "test" / "0.png").write_text("mine")
    before = tree(out)
    message = error_line(score, tiny_pipeline_dir, evaluator_checkpoint, out, "--overwrite_output_dir")
    assert f"--output_dir {out} holds" in message and "that score did not write" in message
    assert tree(out) == before


def test_a_second_score_into_a_folder_in_use_is_refused(tmp_path, tiny_pipeline_dir, evaluator_checkpoint, scored):
    """Two runs into one folder: the later one replaced the first's output without --overwrite_output_dir."""
    out = shutil.copytree(scored, tmp_path / "out")
    before = tree(out)
    with open(out / LOCK_NAME, "a") as held:  # as the run writing into it holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = error_line(score, tiny_pipeline_dir, evaluator_checkpoint, out, "--overwrite_output_dir")
    assert f"--output_dir {out} is in use by another run" in message
    assert tree(out) == before


def test_score_through_a_symbolic_link_replaces_the_linked_folders_contents(
    tmp_path, tiny_pipeline_dir, evaluator_checkpoint, scored
):
    target = shutil.copytree(scored, tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    score(tiny_pipeline_dir, evaluator_checkpoint, link, "--overwrite_output_dir", "--seed", "3")
    assert link.is_symlink() and json.loads((target / "metrics.json").read_text())["seed"] == 3
    assert not list(tmp_path.glob("**/.incomplete-*"))


@pytest.mark.parametrize("command", ["score", "denoise"])
def test_more_steps_than_the_noise_schedule_are_refused_before_sampling(
    tmp_path, tiny_pipeline_dir, evaluator_checkpoint, command
):
    if command == "score":
        argv = ["--evaluator_checkpoint", str(evaluator_checkpoint), "--output_dir", str(tmp_path / "out")]
    else:
        argv = ["--labels", "red cube", "--output", str(tmp_path / "d.png")]
    argv = [command, "--pipeline", str(tiny_pipeline_dir), "--num_inference_steps", "1001", "--device", "cpu", *argv]
    message = error_line(main, argv)
    assert "--num_inference_steps 1001 exceeds the 1000 steps of the pipeline's noise schedule" in message
    assert list(tmp_path.iterdir()) == []


def test_an_evaluator_checkpoint_that_is_a_folder_is_named_as_one(tmp_path, scored):
    message = error_line(main, ["rescore", "--output_dir", str(scored), "--evaluator_checkpoint", str(tmp_path)])
    assert f"evaluator checkpoint {tmp_path} is a folder; give the checkpoint file" in message


@pytest.mark.parametrize("fault", ["other-size", "bomb", "folder"])
def test_rescore_names_a_bad_png_and_what_it_needs(tmp_path, evaluator_checkpoint, scored, fault):
    out = shutil.copytree(scored, tmp_path / "out")
    png = out / "test" / "5.png"
    png.unlink()
    if fault == "other-size":
        Image.new("RGB", (32, 48)).save(png)
        expected = f"{png} is 32x48; the evaluator takes 64x64 images"
    elif fault == "bomb":  # 70 bytes whose header claims 100000x100000 pixels
        png.write_bytes(png_claiming(100_000, 100_000))
        expected = f"cannot read image {png}: Image size (10000000000 pixels) exceeds limit"
    else:
        png.mkdir()
        expected = f"cannot read image {png}: [Errno 21] Is a directory"
    message = error_line(
        main, ["rescore", "--output_dir", str(out), "--evaluator_checkpoint", str(evaluator_checkpoint)]
    )
    assert expected in message


def png_claiming(width: int, height: int) -> bytes:
    """A PNG file with no pixel data whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_evaluator_with_non_finite_outputs_gives_no_accuracy(tmp_path, tiny_pipeline_dir, class_names):
    evaluator = build_evaluator(len(class_names))
    with torch.no_grad():
        evaluator.fc[0].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite scores \(NaN or inf\) for 2 of 2 images"):
        evaluate(
            evaluator.eval(), torch.zeros(2, 3, 64, 64, dtype=torch.uint8), multi_hot([["red cube"]] * 2, class_names)
        )
    checkpoint = save_evaluator(evaluator, tmp_path / "nan.pth")
    message = error_line(score, tiny_pipeline_dir, checkpoint, tmp_path / "out", "--num_inference_steps", "1")
    assert "the evaluator produced non-finite scores" in message
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize(
    "file, edit, expected",
    [
        ("unet/config.json", {"sample_size": 15}, r"sample_size 15 does not suit the UNet"),
        (
            "scheduler/scheduler_config.json",
            {"beta_schedule": "nonexistent"},
            r"cannot load the pipeline in .*pipeline: nonexistent is not implemented",
        ),
        (
            "scheduler/scheduler_config.json",
            {"beta_schedule": "sigmoid"},  # DDPM has it, the other samplers do not
            r"the euler-a sampler cannot run the noise schedule in .*pipeline/scheduler: sigmoid is not implemented",
        ),
        (
            "model_index.json",
            {"unet": ["notalib", "UNet2DModel"]},
            r"cannot load the pipeline in .*pipeline: notalib is not one of the libraries Diffusers can load",
        ),
        ("unet/config.json", "{not json", r"cannot load the pipeline in .*: .*unet/config.json' is not a valid JSON"),
    ],
    ids=["odd-sample-size", "unknown-beta-schedule", "beta-schedule-of-ddpm-only", "unknown-library", "malformed"],
)
def test_a_pipeline_folder_that_does_not_load_is_one_line(tmp_path, pipeline_copy, file, edit, expected):
    config = pipeline_copy / file
    text = edit if isinstance(edit, str) else json.dumps({**json.loads(config.read_text()), **edit})
    config.write_text(text)
    argv = ["denoise", "--pipeline", str(pipeline_copy), "--labels", "red cube", "--output", str(tmp_path / "d.png")]
    message = error_line(main, [*argv, "--scheduler", "euler-a", "--num_inference_steps", "2", "--device", "cpu"])
    assert re.search(expected, message), message
    assert not (tmp_path / "d.png").exists()


def test_a_folder_given_as_objects_json_is_named_as_one(tmp_path, scored, evaluator_checkpoint):
    argv = ["rescore", "--output_dir", str(scored), "--evaluator_checkpoint", str(evaluator_checkpoint)]
    message = error_line(main, [*argv, "--objects_json", str(tmp_path)])
    assert f"{tmp_path} is a folder; a JSON file is expected" in message


def test_a_label_file_beyond_what_score_holds_in_memory_is_refused(tmp_path, tiny_pipeline_dir, evaluator_checkpoint):
    (tmp_path / "many.json").write_text(json.dumps([["red cube"]] * (MAX_LABEL_SETS + 1)))
    out = tmp_path / "out"
    message = error_line(
        score, tiny_pipeline_dir, evaluator_checkpoint, out, "--test_json", str(tmp_path / "many.json")
    )
    assert f"holds {MAX_LABEL_SETS + 1} label sets; score and rescore take at most {MAX_LABEL_SETS}" in message
    assert not out.exists()


@pytest.mark.parametrize("output", ["pipeline/model_index.json", "pipe"])
def test_denoise_refuses_an_output_over_an_input_or_a_pipe(tmp_path, pipeline_copy, output):
    """The drawing went over the pipeline's model_index.json; over a pipe or device, after all the sampling."""
    target = tmp_path / output
    if output == "pipe":
        os.mkfifo(target)
    before = tree(pipeline_copy)
    argv = ["denoise", "--pipeline", str(pipeline_copy), "--labels", "red cube", "--output", str(target)]
    message = error_line(main, [*argv, "--num_inference_steps", "2", "--device", "cpu"])
    expected = "is not a regular file" if output == "pipe" else "lies inside the input --pipeline"
    assert f"--output {target} {expected}" in message
    assert tree(pipeline_copy) == before and (output != "pipe" or target.is_fifo())


@pytest.mark.parametrize("output", ["train.pth", "images/evaluator.pth"])
def test_train_refuses_outputs_over_its_inputs(tmp_path, synthetic_dir, output):
    """--output DIR/train.pth put its metadata, DIR/train.json, over the labels it trained on."""
    data = shutil.copytree(synthetic_dir, tmp_path / "data")
    before = tree(data)
    argv = ["train", "--train_data_dir", str(data / "images"), "--train_json", str(data / "train.json")]
    message = error_line(main, [*argv, "--output", str(data / output), "--num_epochs", "1", "--device", "cpu"])
    expected = "is the input --train_json" if output == "train.pth" else "lies inside the input --train_data_dir"
    assert expected in message
    assert tree(data) == before


def test_denoise_draws_at_most_one_frame_per_step(tmp_path, tiny_pipeline_dir):
    """--num_frames 10**10 asked numpy for 80 GB of frame positions before the first step."""
    argv = [
        "denoise",
        "--pipeline",
        str(tiny_pipeline_dir),
        "--labels",
        "red cube",
        "--output",
        str(tmp_path / "d.png"),
    ]
    main([*argv, "--num_inference_steps", "3", "--num_frames", str(10**10), "--device", "cpu"])
    with Image.open(tmp_path / "d.png") as figure:
        assert figure.width == 3 * 128
