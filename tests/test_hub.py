"""Self-contained model folders, model cards, push_to_hub (the network call replaced), dataset publishing."""

import re
import textwrap

import pytest
import torch
from conftest import run_python, training_args
from datasets import ClassLabel, Image

import train_conditional_ddpm
from cond_ddpm import cli, hub
from cond_ddpm import data as iclevr_data
from pipeline_cond_ddpm import DEFAULT_GUIDANCE_SCALE, DEFAULT_SCHEDULER, CondDDPMPipeline

# Makes `import pipeline_cond_ddpm` (and the other project modules) fail, as on a machine without this project.
WITHOUT_PROJECT = textwrap.dedent(
    """
    import sys
    for name in ("pipeline_cond_ddpm", "cond_ddpm", "train_conditional_ddpm", "evaluate_iclevr"):
        sys.modules[name] = None
    """
)
TOKEN = "hf_thisIsNotARealTokenButItMustNeverBeShown"


def test_saved_folder_loads_with_plain_diffusers_and_draws_the_same_images(tiny_pipeline_dir, tmp_path):
    script = WITHOUT_PROJECT + textwrap.dedent(
        f"""
        import torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tiny_pipeline_dir)!r}, trust_remote_code=True)
        images = pipe([["red cube", "blue sphere"], [3]], num_inference_steps=3, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
        torch.save(images, {str(tmp_path / "remote.pt")!r})
        print(type(pipe).__module__)
        """
    )
    result = run_python("-c", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("diffusers_modules"), "loaded from the folder's own code"
    local = CondDDPMPipeline.from_pretrained(tiny_pipeline_dir)
    expected = local(
        [["red cube", "blue sphere"], [3]],
        num_inference_steps=3,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert torch.equal(torch.load(tmp_path / "remote.pt", weights_only=True), expected)


def test_the_installed_class_loads_a_hub_repository_without_running_its_code(tiny_pipeline_dir, monkeypatch):
    fetched = []
    monkeypatch.setattr(
        "pipeline_cond_ddpm.snapshot_download", lambda repo, **kw: fetched.append((repo, kw)) or str(tiny_pipeline_dir)
    )
    pipeline = CondDDPMPipeline.from_pretrained("someone/cond-ddpm-tiny", revision="v1")
    assert fetched == [("someone/cond-ddpm-tiny", {"revision": "v1"})]
    assert type(pipeline) is CondDDPMPipeline


class FakeHub:
    """Records the Hub calls of a run in place of the network."""

    def __init__(self):
        self.calls = {}

    def whoami(self, token=None):
        self.calls["whoami"] = token
        return {"name": "me"}

    def create_repo(self, repo_id, **kwargs):
        self.calls["create_repo"] = (repo_id, kwargs)
        return type("RepoUrl", (), {"repo_id": repo_id})

    def upload_folder(self, **kwargs):
        self.calls["upload_folder"] = kwargs


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, synthetic_dir, evaluator_checkpoint):
    """A whole training run with --push_to_hub, in this process, with only the Hub's network calls replaced."""
    output_dir = tmp_path_factory.mktemp("runs") / "pushed"
    fake = FakeHub()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("whoami", "create_repo", "upload_folder"):
            patch.setattr(hub, name, getattr(fake, name))
        args = training_args(
            output_dir,
            synthetic_dir,
            "--max_train_steps",
            2,
            "--evaluator_checkpoint",
            evaluator_checkpoint,
            "--push_to_hub",
            "--hub_model_id",
            "me/cond-ddpm-tiny",
            "--hub_token",
            TOKEN,
            "--hub_private_repo",
            "--logger",
            "tensorboard",
        )
        cli.run(train_conditional_ddpm.main, train_conditional_ddpm.parse_args(args))
    return output_dir, fake.calls


def test_push_uploads_the_saved_folder_without_checkpoints_or_logs(pushed_run):
    output_dir, calls = pushed_run
    assert calls["whoami"] == TOKEN
    assert calls["create_repo"] == ("me/cond-ddpm-tiny", {"token": TOKEN, "private": True, "exist_ok": True})
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/cond-ddpm-tiny" and upload["folder_path"] == output_dir and upload["token"] == TOKEN
    assert {"checkpoint-*", "logs/*", "samples/*", "best/*", ".incomplete-*"} <= set(upload["ignore_patterns"])
    for needed in (
        "model_index.json",
        "pipeline_cond_ddpm.py",
        "label_embedding/label_embedding.py",
        "README.md",
        hub.SAMPLE_GRID,
    ):
        assert (output_dir / needed).is_file(), needed


def test_model_card_has_the_metrics_the_settings_and_tags(pushed_run):
    card = (pushed_run[0] / "README.md").read_text()
    assert re.search(r"\| test.json \| \d\.\d{4} \|", card) and re.search(r"\| new_test.json \| \d\.\d{4} \|", card)
    assert f"sampled with {DEFAULT_SCHEDULER}, 2 steps, guidance scale {DEFAULT_GUIDANCE_SCALE}" in card
    assert "| preset | tiny |" in card and "| learning_rate | 0.001 |" in card and "| mixed_precision | no |" in card
    assert "- i-clevr" in card and "library_name: diffusers" in card
    assert f"![samples of held-out label sets]({hub.SAMPLE_GRID})" in card


def test_the_hub_token_is_never_written_anywhere(pushed_run, capsys):
    output_dir, _ = pushed_run
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


def test_the_model_card_snippet_runs_as_written(tmp_path, tiny_pipeline_dir):
    hub.write_model_card(
        tmp_path,
        CondDDPMPipeline.from_pretrained(tiny_pipeline_dir),
        {"preset": "tiny", "resolution": 16, "synthetic_scenes": 6},
        {},
        tmp_path / "no-grid.png",
        0,
        str(tiny_pipeline_dir),
    )
    card = (tmp_path / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    result = run_python("-c", WITHOUT_PROJECT + snippet, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "scene.png").is_file()
    assert "No evaluator was given to the training run" in card


def test_push_fails_before_training_when_the_hub_is_out_of_reach(tmp_path, synthetic_dir):
    result = run_python(
        "train_conditional_ddpm.py",
        *training_args(tmp_path / "offline", synthetic_dir, "--max_train_steps", 2),
        "--push_to_hub",
        "--hub_model_id",
        "me/x",
        "--hub_token",
        TOKEN,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert "--push_to_hub 'me/x' needs the Hugging Face Hub and a token with write access" in result.stderr
    assert "steps" not in result.stderr and not list((tmp_path / "offline").glob("checkpoint-*"))
    assert TOKEN not in result.stderr + result.stdout


def test_dataset_push_publishes_images_and_object_labels(synthetic_dir, monkeypatch, capsys):
    pushed = {}
    monkeypatch.setattr(
        "datasets.Dataset.push_to_hub", lambda self, repo_id, **kw: pushed.update(dataset=self, repo_id=repo_id, **kw)
    )
    iclevr_data.main(["push", "--dataset_dir", str(synthetic_dir), "--repo_id", "me/iclevr-synthetic", "--private"])
    dataset = pushed["dataset"]
    assert pushed["repo_id"] == "me/iclevr-synthetic" and pushed["private"] is True
    assert len(dataset) == 18 and isinstance(dataset.features["image"], Image)
    assert (
        isinstance(dataset.features["objects"].feature, ClassLabel)
        and dataset.features["objects"].feature.names[0] == "gray cube"
    )
    assert "Pushed 18 images to https://huggingface.co/datasets/me/iclevr-synthetic" in capsys.readouterr().out
