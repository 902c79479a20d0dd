"""Self-contained model folders, model cards, push_to_hub (the network call replaced), dataset publishing."""

import re
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_python, training_args
from datasets import ClassLabel, Image
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError

import train_conditional_ddpm
from cond_ddpm import cli, hub
from cond_ddpm import data as iclevr_data
from pipeline_cond_ddpm import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    CondDDPMPipeline,
    usage_snippet,
)

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
    """Records the Hub calls of a run in place of the network. The user is "me"; no repository has a card yet."""

    def __init__(self, existing_card=None):
        self.calls = {}
        self.existing_card = existing_card

    def whoami(self, token=None):
        self.calls["whoami"] = token
        return {"name": "me"}

    def create_repo(self, repo_id, **kwargs):
        self.calls["create_repo"] = (repo_id, kwargs)
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"me/{repo_id}"})

    def upload_folder(self, **kwargs):
        self.calls["upload_folder"] = kwargs
        self.calls["uploaded_card"] = (Path(kwargs["folder_path"]) / "README.md").read_text()

    def load_card(self, repo_id_or_path, token=None):
        self.calls["load_card"] = (repo_id_or_path, token)
        if self.existing_card is None:
            raise EntryNotFoundError(f"{repo_id_or_path} has no README.md")
        return ModelCard(self.existing_card)

    def patch(self, patch, *modules):
        for module in modules:
            for name in ("whoami", "create_repo", "upload_folder"):
                if hasattr(module, name):
                    patch.setattr(module, name, getattr(self, name))
        patch.setattr(ModelCard, "load", classmethod(lambda cls, *args, **kwargs: self.load_card(*args, **kwargs)))


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, synthetic_dir, evaluator_checkpoint):
    """A whole training run with --push_to_hub and no --hub_model_id, in this process, with only the Hub's network
    calls replaced."""
    output_dir = tmp_path_factory.mktemp("runs") / "cond-ddpm-tiny"
    fake = FakeHub()
    with pytest.MonkeyPatch.context() as patch:
        fake.patch(patch, hub)
        args = training_args(
            output_dir,
            synthetic_dir,
            "--max_train_steps",
            2,
            "--evaluator_checkpoint",
            evaluator_checkpoint,
            "--push_to_hub",
            "--hub_token",
            TOKEN,
            "--hub_private_repo",
            "--logger",
            "tensorboard",
            "--logging_dir",
            "tensorboard-logs",
        )
        cli.run(train_conditional_ddpm.main, train_conditional_ddpm.parse_args(args))
    return output_dir, fake.calls


def test_push_uploads_the_saved_folder_without_checkpoints_or_logs(pushed_run):
    output_dir, calls = pushed_run
    assert calls["whoami"] == TOKEN
    assert calls["create_repo"] == ("cond-ddpm-tiny", {"token": TOKEN, "private": True, "exist_ok": True})
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/cond-ddpm-tiny" and upload["folder_path"] == output_dir and upload["token"] == TOKEN
    assert {"checkpoint-*", "tensorboard-logs/*", "samples/*", "best/*", ".incomplete-*"} <= set(
        upload["ignore_patterns"]
    )
    assert list((output_dir / "tensorboard-logs").rglob("events.out.tfevents.*")), "--logging_dir holds the logs"
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
    assert card == pushed_run[1]["uploaded_card"]
    assert re.search(r"\| test.json \| \d\.\d{4} \|", card) and re.search(r"\| new_test.json \| \d\.\d{4} \|", card)
    assert f"sampled with {DEFAULT_SCHEDULER}, 2 steps, guidance scale {DEFAULT_GUIDANCE_SCALE}" in card
    assert "| preset | tiny |" in card and "| learning_rate | 0.001 |" in card and "| mixed_precision | no |" in card
    assert "- i-clevr" in card and "library_name: diffusers" in card
    assert f"![samples of held-out label sets]({hub.SAMPLE_GRID})" in card


def test_the_card_names_the_repository_create_repo_returned(pushed_run):
    output_dir, calls = pushed_run
    assert calls["load_card"] == ("me/cond-ddpm-tiny", TOKEN), "looked for a card the repository already has"
    card = (output_dir / "README.md").read_text()
    assert 'DiffusionPipeline.from_pretrained("me/cond-ddpm-tiny", trust_remote_code=True)' in card.replace("'", '"')


def test_the_card_carries_the_scores_as_model_index_metadata(pushed_run):
    card = ModelCard.load(pushed_run[0] / "README.md")
    results = {result.dataset_split: result for result in card.data.eval_results}
    assert set(results) == {"test", "new_test"}
    for split, result in results.items():
        assert result.metric_type == "accuracy" and f"| {split}.json | {result.metric_value:.4f} |" in card.text
    assert "model-index:" in (pushed_run[0] / "README.md").read_text()


def test_the_card_shows_the_default_sampler_steps_and_guidance():
    snippet = usage_snippet("me/model")
    scheduler_class = SCHEDULERS[DEFAULT_SCHEDULER].__self__.__name__
    assert f"pipe.scheduler = {scheduler_class}.from_config(pipe.scheduler.config)" in snippet
    assert f"steps, guidance, generator = {DEFAULT_NUM_INFERENCE_STEPS}, {DEFAULT_GUIDANCE_SCALE}," in snippet


def test_a_card_already_on_the_hub_is_kept(tmp_path, tiny_pipeline, monkeypatch):
    existing = "---\nlicense: mit\ntags:\n- mine\n---\n\n# My own words about this model\n"
    fake = FakeHub(existing_card=existing)
    fake.patch(monkeypatch, hub)
    metrics = {"test": 0.5, "new_test": 0.25, "scheduler": "ddpm", "num_inference_steps": 2, "guidance_scale": 3.0}
    settings = {"preset": "tiny", "resolution": 16, "synthetic_scenes": 6}
    hub.write_model_card(tmp_path, tiny_pipeline, settings, metrics, tmp_path / "none.png", 2, "me/m", "me/m")
    card = ModelCard((tmp_path / "README.md").read_text())  # ModelCard.load is the fake here
    assert card.text.strip() == "# My own words about this model"
    assert card.data.license == "mit" and card.data.tags[0] == "mine" and "i-clevr" in card.data.tags
    assert [r.metric_value for r in card.data.eval_results] == [0.5, 0.25]


def test_pipeline_push_to_hub_uploads_a_model_card(tmp_path, tiny_pipeline, monkeypatch):
    import pipeline_cond_ddpm

    fake = FakeHub()
    fake.patch(monkeypatch, pipeline_cond_ddpm)
    tiny_pipeline.save_pretrained(tmp_path / "tiny", push_to_hub=True, repo_id="tiny", token=TOKEN)
    assert fake.calls["upload_folder"]["repo_id"] == "me/tiny"
    card = fake.calls["uploaded_card"]
    assert "library_name: diffusers" in card and "- i-clevr" in card
    assert 'from_pretrained("me/tiny", trust_remote_code=True)' in card.replace("'", '"')


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


def test_the_model_card_names_only_flags_the_training_script_has():
    flags = {action.dest for action in train_conditional_ddpm.build_parser()._actions}
    unknown = [key for key in hub.CARD_SETTINGS if key not in flags]
    assert not unknown, f"hub.CARD_SETTINGS reads {unknown}, which are no flags of train_conditional_ddpm.py"
