"""Training survives faults, inputs are checked at the boundary, and nothing already written is lost."""

import fcntl
import json
import os
import re
import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch
from conftest import ROOT, run_python, train_main, training_args

import evaluate_iclevr
from cond_ddpm import data as iclevr_data
from cond_ddpm.sampling import generate
from train_conditional_ddpm import parse_args

# --- A diverged model is never scored ---------------------------------------------------------------------------------


def test_images_that_are_not_finite_are_never_scored(tiny_pipeline):
    with torch.no_grad():  # a diverged model: every image NaN, which 8-bit pixels would turn black
        tiny_pipeline.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="the pipeline drew NaN or infinite pixels"):
        generate(tiny_pipeline, [["red cube"]], num_inference_steps=2, guidance_scale=1.0)


# --- Security ---------------------------------------------------------------------------------------------------------


def test_every_torch_load_is_weights_only():
    calls = []
    for path in [*ROOT.glob("*.py"), *(ROOT / "cond_ddpm").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        calls += [(path.name, line) for line in path.read_text().splitlines() if "torch.load(" in line]
    assert calls, "the evaluator loads its checkpoint with torch.load"
    assert all("weights_only=True" in line for _, line in calls), calls


def test_plain_diffusers_runs_the_pipeline_code_only_when_trusted(tiny_pipeline_dir):
    from diffusers import DiffusionPipeline

    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tiny_pipeline_dir)


# --- Bad-input sweep: every CLI mistake ends in one clear line and a non-zero exit ------------------------------------


def cli_error(main, argv, capsys):
    """Run a CLI's main in-process; return (exit code, message) of the SystemExit it must end in."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    return (1 if isinstance(code, str) else code), (code if isinstance(code, str) else capsys.readouterr().err)


def decompression_bomb() -> bytes:
    """A 57-byte PNG whose header claims 100000 x 100000 pixels."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunks = [(b"IHDR", header), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)) for kind, data in chunks
    )


def bad_folder(tmp_path, kind):
    from PIL import Image

    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (320, 240)).save(tmp_path / "images" / "a.png")
    entries = {"a.png": ["red cube"]}
    if kind == "missing-image":
        entries["b.png"] = ["blue cube"]
    if kind == "unknown-name":
        entries["a.png"] = ["red cone"]
    if kind == "unreadable":
        (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG broken")
    if kind == "bomb":
        (tmp_path / "images" / "a.png").write_bytes(decompression_bomb())
    if kind == "outside":  # a file beside the image folder, named through it
        Image.new("RGBA", (320, 240)).save(tmp_path / "secret.png")
        entries = {"../secret.png": ["red cube"]}
    if kind == "absolute":
        entries = {str(tmp_path / "images" / "a.png"): ["red cube"]}
    if kind == "file-as-folder":
        (tmp_path / "train.json").write_text(json.dumps(entries))
        return ["--train_data_dir", str(tmp_path / "train.json"), "--train_json", str(tmp_path / "train.json")]
    text = "{}" if kind == "empty" else "{not json" if kind == "malformed" else json.dumps(entries)
    (tmp_path / "train.json").write_text(text)
    return ["--train_data_dir", str(tmp_path / "images"), "--train_json", str(tmp_path / "train.json")]


TRAIN_BASE = [
    "--preset",
    "tiny",
    "--resolution",
    "16",
    "--logger",
    "none",
    "--max_train_steps",
    "1",
    "--mixed_precision",
    "no",
]
SWEEP = [
    # (command, arguments (TMP = a fresh folder, DATA:kind = a broken data folder), expected message)
    ("train", ["--preset", "gpu", "--resolution", "60"], "--resolution 60 must be a multiple of 8"),
    ("train", ["--resolution", "-32"], "argument --resolution: must be an integer from 1 to 1024, got '-32'"),
    ("train", ["--learning_rate", "0"], r"argument --learning_rate: must be a learning rate in \(0, 1\], got '0'"),
    ("train", ["--train_batch_size", "two"], "argument --train_batch_size: must be a positive integer, got 'two'"),
    (
        "train",
        ["--condition_dropout", "1.5"],
        r"argument --condition_dropout: must be a probability in \[0, 1\), got '1.5'",
    ),
    ("train", ["--guidance_scale", "-1"], r"argument --guidance_scale: must be a number in \[0, 100\], got '-1'"),
    ("train", ["--same_colour_repeats", "0"], "argument --same_colour_repeats: must be a positive integer, got '0'"),
    ("train", ["--preset", "giant"], "argument --preset: invalid choice: 'giant'"),
    ("train", ["--max_grad_norm", "-1"], "argument --max_grad_norm: must be a number >= 0, got '-1'"),
    ("train", ["--ema_inv_gamma", "0"], "argument --ema_inv_gamma: must be a positive number, got '0'"),
    ("train", ["--guidance_scale", "inf"], r"argument --guidance_scale: must be a number in \[0, 100\], got 'inf'"),
    ("train", ["--resolution", "100000"], "argument --resolution: must be an integer from 1 to 1024, got '100000'"),
    ("train", ["--learning_rate", "inf"], r"argument --learning_rate: must be a learning rate in \(0, 1\], got 'inf'"),
    ("train", ["--adam_beta2", "1"], r"argument --adam_beta2: must be a probability in \[0, 1\), got '1'"),
    ("train", ["--ema_max_decay", "1.5"], r"argument --ema_max_decay: must be a number in \[0, 1\], got '1.5'"),
    ("train", ["--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got '-1'"),
    ("train", ["--ddpm_num_inference_steps", "2000"], "exceeds the 1000 steps of the noise schedule"),
    (
        "train",
        ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"],
        "--overwrite_output_dir removes the checkpoints that --resume_from_checkpoint would continue",
    ),
    ("train", ["--train_data_dir", "somewhere"], "--train_data_dir and --train_json go together"),
    ("train", ["--output_dir", "NONEMPTY"], "is not empty; pass --resume_from_checkpoint latest"),
    ("train", ["--resume_from_checkpoint", "no/such/checkpoint"], "is neither a folder, nor one in --output_dir"),
    ("train", ["--evaluator_checkpoint", "no/such.pth"], "--evaluator_checkpoint no/such.pth does not exist"),
    ("train", ["DATA:missing-image"], "lists 'b.png', but .*b.png does not exist"),
    ("train", ["DATA:unknown-name"], "unknown object name 'red cone'; did you mean 'red cube'"),
    ("train", ["DATA:unreadable"], "cannot read image .*a.png"),
    ("train", ["DATA:empty"], "lists no images: the dataset would be empty"),
    ("train", ["DATA:malformed"], "train.json is not valid JSON"),
    ("train", ["DATA:bomb"], "cannot read image .*a.png: Image size .* exceeds limit"),
    ("train", ["DATA:outside"], "lists '../secret.png', which is outside the image folder"),
    ("train", ["DATA:absolute"], "lists '/.*a.png', which is outside the image folder"),
    ("train", ["DATA:file-as-folder"], "train.json is a file; the images are read from a folder"),
    ("train", ["DATA:ok", "--train_batch_size", "2"], r"--train_batch_size 2 is larger than the dataset \(1 images\)"),
    ("train", ["DATA:ok", "--objects_json", "TMP"], "is a folder; a JSON file is expected here"),
    ("train", ["--objects_json", "TMP/objects.json"], "goes with --train_data_dir or --dataset_name"),
    ("train", ["--logging_dir", "../elsewhere"], "--logging_dir '../elsewhere' must name a folder inside --output_dir"),
    ("train", ["--logging_dir", "/tmp/elsewhere"], "--logging_dir '/tmp/elsewhere' must name a folder inside"),
    (
        "train",
        ["--learning_rate", "1e30"],
        r"argument --learning_rate: must be a learning rate in \(0, 1\], got '1e30'",
    ),
    ("train", ["--synthetic_scenes", "100000000"], "argument --synthetic_scenes: must be an integer from 1 to 100000"),
    ("data", ["synthesize", "--output_dir", "TMP/x", "--num_scenes", "100000000"], "must be an integer from 1 to"),
    ("data", ["preview", "--dataset_dir", "BOMB", "--output", "TMP/p.png"], "cannot read image .*a.png: Image size"),
    ("data", ["preview", "--dataset_dir", "OUTSIDE", "--output", "TMP/p.png"], "which is outside the image folder"),
    ("data", ["preview", "--dataset_dir", "OK", "--output", "TMP"], "is a folder; a file is to be written there"),
    ("data", ["preview", "--dataset_dir", "OK", "--output", "/dev/null"], "/dev/null is not a regular file"),
    (
        "data",
        ["synthesize", "--output_dir", "TMP", "--num_scenes", "0"],
        "argument --num_scenes: must be an integer from 1 to 100000, got '0'",
    ),
    ("data", ["synthesize", "--output_dir", "NONEMPTY", "--num_scenes", "1"], "already exists and is not empty"),
    ("data", ["synthesize", "--output_dir", "TMP", "--seed", "-1"], "argument --seed: must be an integer from 0"),
    ("data", ["preview", "--dataset_dir", "LISTED", "--output", "TMP/p.png"], "must map image file names to lists"),
    (
        "data",
        ["push", "--dataset_dir", "no/such/folder", "--repo_id", "me/x"],
        r"no/such/folder/\w+\.json does not exist",
    ),
    (
        "evaluate",
        ["score", "--pipeline", "PIPELINE", "--evaluator_checkpoint", "BAD_CHECKPOINT", "--output_dir", "TMP"],
        r"must hold \{'model': state_dict\}",
    ),
    (
        "evaluate",
        ["score", "--pipeline", "TMP", "--evaluator_checkpoint", "CHECKPOINT", "--output_dir", "TMP/out"],
        "is not a saved pipeline",
    ),
    (
        "evaluate",
        [
            "score",
            "--pipeline",
            "PIPELINE",
            "--evaluator_checkpoint",
            "CHECKPOINT",
            "--output_dir",
            "TMP/out",
            "--test_json",
            "UNKNOWN_LABELS",
        ],
        "entry 0: unknown object name 'red cone'",
    ),
    (
        "evaluate",
        [
            "score",
            "--pipeline",
            "PIPELINE",
            "--evaluator_checkpoint",
            "CHECKPOINT",
            "--output_dir",
            "TMP/out",
            "--objects_json",
            "SWAPPED_VOCABULARY",
        ],
        r"they differ \(0: 'gray cube' vs 'red cube'; 1: 'red cube' vs 'gray cube'\)",
    ),
    (
        "evaluate",
        [
            "score",
            "--pipeline",
            "PIPELINE",
            "--evaluator_checkpoint",
            "CHECKPOINT",
            "--output_dir",
            "TMP",
            "--scheduler",
            "euler",
        ],
        "argument --scheduler: invalid choice: 'euler'",
    ),
    (
        "evaluate",
        ["denoise", "--pipeline", "PIPELINE", "--labels", "red cubes", "--output", "TMP/d.png"],
        "unknown object name 'red cubes'; did you mean 'red cube'",
    ),
    (
        "evaluate",
        [
            "denoise",
            "--pipeline",
            "PIPELINE",
            "--labels",
            "red cube",
            "--output",
            "TMP/d.png",
            "--guidance_scale",
            "inf",
        ],
        r"argument --guidance_scale: must be a number in \[0, 100\], got 'inf'",
    ),
    (
        "evaluate",
        ["rescore", "--output_dir", "TMP", "--evaluator_checkpoint", "CHECKPOINT", "--device", "bogus"],
        "argument --device: must be a torch device such as cpu, cuda or cuda:0, got 'bogus'",
    ),
    (
        "evaluate",
        ["rescore", "--output_dir", "TMP", "--evaluator_checkpoint", "CHECKPOINT", "--device", "cuda:7"],
        r"argument --device: 'cuda:7'( asks for a GPU|: this machine has \d+ GPU)",
    ),
    (
        "evaluate",
        ["rescore", "--output_dir", "TMP", "--evaluator_checkpoint", "CHECKPOINT"],
        r"32 image\(s\) missing in .*test",
    ),
    (
        "evaluate",
        ["train", "--train_data_dir", "TMP", "--train_json", "TMP/none.json", "--output", "TMP/e.pth"],
        "none.json does not exist",
    ),
]


@pytest.mark.parametrize("command, argv, message", SWEEP, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(SWEEP)])
def test_bad_input_sweep(
    tmp_path, capsys, tiny_pipeline_dir, evaluator_checkpoint, class_names, command, argv, message
):
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "keep.txt").write_text("mine")
    objects = json.loads(iclevr_data.OBJECTS_JSON.read_text())
    objects["gray cube"], objects["red cube"] = 1, 0
    (tmp_path / "swapped.json").write_text(json.dumps(objects))
    (tmp_path / "unknown.json").write_text(json.dumps([["red cone"]]))
    torch.save({"weights": {}}, tmp_path / "bad.pth")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "train.json").write_text(json.dumps([["red cube"]]))
    for kind in ("bomb", "outside", "ok"):  # i-CLEVR-style folders, for the commands that take one
        bad_folder(tmp_path / kind, kind)
    places = {
        "BOMB": str(tmp_path / "bomb"),
        "OUTSIDE": str(tmp_path / "outside"),
        "OK": str(tmp_path / "ok"),
        "TMP": str(tmp_path),
        "LISTED": str(tmp_path / "listed"),
        "NONEMPTY": str(tmp_path / "nonempty"),
        "PIPELINE": str(tiny_pipeline_dir),
        "CHECKPOINT": str(evaluator_checkpoint),
        "BAD_CHECKPOINT": str(tmp_path / "bad.pth"),
        "SWAPPED_VOCABULARY": str(tmp_path / "swapped.json"),
        "UNKNOWN_LABELS": str(tmp_path / "unknown.json"),
    }
    resolved = []
    for arg in argv:
        if arg.startswith("DATA:"):
            resolved += bad_folder(tmp_path, arg[5:])
        else:
            resolved.append(
                re.sub(
                    r"^(BOMB|OUTSIDE|OK|TMP|LISTED|NONEMPTY|PIPELINE|CHECKPOINT|BAD_CHECKPOINT|SWAPPED_VOCABULARY"
                    r"|UNKNOWN_LABELS)",
                    lambda m: places[m.group(1)],
                    arg,
                )
            )
    if command == "train":
        main = train_main
        resolved = TRAIN_BASE + ["--output_dir", str(tmp_path / "run")] + resolved
    else:
        main = {"data": iclevr_data.main, "evaluate": evaluate_iclevr.main}[command]
    code, text = cli_error(main, resolved, capsys)
    assert code != 0
    assert re.search(message, text), text
    assert (tmp_path / "nonempty" / "keep.txt").read_text() == "mine"


def test_the_real_entry_points_print_one_line_not_a_traceback(tmp_path, evaluator_checkpoint):
    for command in (
        ["train_conditional_ddpm.py", "--preset", "gpu", "--resolution", "30"],
        [
            "evaluate_iclevr.py",
            "rescore",
            "--output_dir",
            str(tmp_path),
            "--evaluator_checkpoint",
            str(evaluator_checkpoint),
        ],
        ["-m", "cond_ddpm.data", "push", "--dataset_dir", str(tmp_path), "--repo_id", "me/x"],
    ):
        result = run_python(*command)
        assert result.returncode != 0 and "error: " in result.stderr and "Traceback" not in result.stderr, result.stderr


# --- One run per output folder, and a folder it can write -------------------------------------------------------------


def test_a_second_run_into_a_folder_in_use_is_refused_and_writes_nothing(tmp_path, synthetic_dir):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    with open(output_dir / ".lock", "a") as held:  # as the run that owns the folder holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match=f"--output_dir {output_dir} is in use by another run"):
            train_main(training_args(output_dir, synthetic_dir, "--max_train_steps", 2, "--checkpointing_steps", 1))
        assert [p.name for p in output_dir.iterdir()] == [".lock"]
    # The lock went with its holder: the folder is free again.
    train_main(training_args(output_dir, synthetic_dir, "--max_train_steps", 1))
    assert (output_dir / "model_index.json").is_file()


def test_an_unwritable_output_dir_is_refused_before_training(tmp_path, synthetic_dir):
    output_dir = tmp_path / "read-only"
    output_dir.mkdir()
    output_dir.chmod(0o555)
    immutable = os.access(output_dir, os.W_OK)  # root writes anywhere; an immutable folder stops it too
    if immutable and subprocess.run(["chattr", "+i", str(output_dir)], capture_output=True).returncode != 0:
        pytest.skip("this user can write into any folder")
    try:
        with pytest.raises(SystemExit, match=f"error: --output_dir {output_dir} is not writable"):
            train_main(training_args(output_dir, synthetic_dir, "--max_train_steps", 1))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(output_dir)], check=True)
        output_dir.chmod(0o755)


# --- Data and evaluator faults ----------------------------------------------------------------------------------------


def test_16_bit_png_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert np.asarray(iclevr_data.open_rgb(tmp_path / "grey16.png")).tolist() == [[[128] * 3] * 4] * 4


@pytest.mark.parametrize("output", ["ev.json", "folder"])
def test_evaluator_outputs_that_would_be_lost_are_refused_before_training(tmp_path, synthetic_dir, capsys, output):
    (tmp_path / "folder").mkdir()
    argv = [
        "train",
        "--train_data_dir",
        str(synthetic_dir / "images"),
        "--train_json",
        str(synthetic_dir / "train.json"),
    ]
    argv += ["--output", str(tmp_path / output), "--num_epochs", "1", "--device", "cpu"]
    code, text = cli_error(evaluate_iclevr.main, argv, capsys)
    assert code == 1
    expected = "is where the training metadata goes" if output == "ev.json" else "is a folder; give a file name"
    assert expected in text and "training on" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_pushing_a_dataset_without_a_network_is_one_line(synthetic_dir, monkeypatch, capsys):
    class ConnectError(Exception):  # what the Hub client raises offline: no OSError
        pass

    def offline(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr("datasets.Dataset.push_to_hub", offline)
    code, text = cli_error(iclevr_data.main, ["push", "--dataset_dir", str(synthetic_dir), "--repo_id", "me/x"], capsys)
    assert code == 1
    assert "could not push" in text and "Name or service not known" in text


def test_argparse_errors_are_one_line_and_a_pointer_to_help(capsys):
    for main, argv in (
        (parse_args, ["--resolution", "-32"]),
        (evaluate_iclevr.main, ["score", "--num_inference_steps", "0"]),
        (iclevr_data.main, ["render"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 2 and ": error: " in lines[0] and "--help" in lines[1], lines
