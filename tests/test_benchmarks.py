"""benchmarks/quality.py: what a recipe's images are scored against, and which recipes need a GPU."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def quality(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # where the script finds its sibling modules
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def roughness(images: torch.Tensor) -> float:
    return (images[..., 1:].float() - images[..., :-1].float()).abs().mean().item()


def test_rendered_references_are_drawn_at_the_models_resolution(quality):
    class_names = quality.read_objects_json()
    label_sets = [["red cube", "blue sphere"], ["gray cylinder"]]
    native = quality.rendered_references(label_sets, class_names, seed=0, resolution=64)
    upsampled = quality.rendered_references(label_sets, class_names, seed=0, resolution=32)
    assert native.shape == upsampled.shape == (2, 3, 64, 64)
    assert native.dtype == upsampled.dtype == torch.uint8
    # A 32x32 render brought up to 64x64 is smoother than the 64x64 render of the same scene.
    assert roughness(native) > roughness(upsampled)


def test_a_gpu_recipe_is_refused_without_a_gpu(quality, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--recipe", "gpu", "--output_dir", "/nonexistent/never-written"])
    with pytest.raises(SystemExit) as stopped:
        quality.main()
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "--recipe gpu" in message and "needs a CUDA GPU" in message


def test_the_gpu_check_refuses_a_cpu_without_quick_and_a_used_results_folder(tmp_path):
    from conftest import run_python

    result = run_python("benchmarks/gpu_check.py", "--results_dir", tmp_path / "new", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr and "--quick" in result.stderr
    (tmp_path / "used" / "earlier").mkdir(parents=True)
    result = run_python("benchmarks/gpu_check.py", "--results_dir", tmp_path / "used", "--quick")
    assert result.returncode == 2 and f"--results_dir {tmp_path / 'used'} is not empty" in result.stderr
    assert (tmp_path / "used" / "earlier").is_dir()


def test_flags_after_a_double_dash_go_to_the_training_script_and_need_a_folder_of_their_own(
    quality, monkeypatch, capsys
):
    assert quality.split_at_double_dash(["--seed", "1", "--", "--same_colour_repeats", "1"]) == (
        ["--seed", "1"],
        ["--same_colour_repeats", "1"],
    )
    assert quality.split_at_double_dash(["--seed", "1"]) == (["--seed", "1"], [])
    for argv, expected in [
        (["--", "--same_colour_repeats", "1"], "name the run's folder with --output_dir"),
        (["--score_only", "--output_dir", "/nonexistent", "--", "--max_train_steps", "9"], "are unused"),
    ]:
        monkeypatch.setattr(sys, "argv", ["quality.py", *argv])
        with pytest.raises(SystemExit) as stopped:
            quality.main()
        assert stopped.value.code == 2
        message = capsys.readouterr().err
        assert expected in message and argv[-2] in message


def test_training_stopped_by_the_clock_is_waited_for_until_it_lets_go_of_its_folder(quality, tmp_path):
    # A stand-in for `accelerate launch`: its child holds the folder's lock and needs a while to save on SIGTERM.
    child = (
        "import fcntl, signal, sys, time; from pathlib import Path\n"
        f"lock = open({str(tmp_path / '.lock')!r}, 'a'); fcntl.flock(lock, fcntl.LOCK_EX)\n"
        "def save(*_): time.sleep(2); Path(sys.argv[1]).write_text('saved'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, save)\n"
        "while True: time.sleep(0.1)\n"
    )
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}, {str(tmp_path / 'state')!r}])"
    record = quality.train([sys.executable, "-c", launcher], tmp_path, max_minutes=0.05)
    assert record["stopped_by_clock"] is True
    assert (tmp_path / "state").read_text() == "saved"  # returned only once the child had finished its save
    assert 0.04 < record["training_minutes"] < 1


def test_scores_come_with_bootstrap_intervals_and_paired_differences(quality):
    rng = np.random.default_rng(0)
    objects = rng.integers(1, 4, 256)
    teacher = {"held_out": {"hits": rng.binomial(objects, 0.9, (3, 256)), "objects": objects, "seconds": 10.0}}
    student = {"held_out": {"hits": rng.binomial(objects, 0.7, (3, 256)), "objects": objects, "seconds": 1.0}}
    first = quality.summarise(teacher, None)["held_out"]
    low, high = first["interval"]
    assert low < first["accuracy"] < high and 0.01 < high - low < 0.1
    same = quality.summarise(teacher, teacher)["held_out"]
    assert same["difference"] == 0 and same["difference_interval"] == [0.0, 0.0]
    summary = quality.summarise(student, teacher)
    low, high = summary["held_out"]["difference_interval"]
    assert low < summary["held_out"]["difference"] < high < 0
    assert summary["images_per_second"] == 768 / 1.0


def test_unseen_triples_are_all_of_them_where_fewer_are_asked_for(quality, tmp_path):
    class_names = ["red cube", "blue cube", "red sphere", "blue sphere"]
    (tmp_path / "train.json").write_text(json.dumps({"a.png": ["red cube", "blue cube", "red sphere"]}))
    assert len(quality.unseen_triples(tmp_path / "train.json", class_names, count=256)) == 3
