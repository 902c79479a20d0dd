"""distill_conditional_ddpm.py: a student distilled from a tiny teacher saves, loads with plain diffusers, samples in
4 UNet evaluations with the guidance as an input, resumes exactly, and refuses bad flags in one line."""

import re
import shutil
import signal

import pytest
import torch
from conftest import assert_same_weights, run_args, run_python, start_training, wait_for
from diffusers import DiffusionPipeline, LCMScheduler

import distill_conditional_ddpm
from cond_ddpm import cli
from cond_ddpm.recipes import DISTILL_RECIPES
from cond_ddpm.sampling import set_scheduler
from cond_ddpm.training.consistency import make_student, predicted_image_and_noise
from pipeline_cond_ddpm import CondDDPMPipeline, guidance_scale_embedding


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, class_names):
    """An untrained teacher of the cpu preset (cross-attention, so a UNet2DConditionModel) at 8x8."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teachers") / "teacher"
    CondDDPMPipeline.from_preset("cpu", class_names, resolution=8).save_pretrained(folder)
    return folder


def distillation_args(output_dir, teacher_dir, data_dir, *extra):
    """Flags for a few seconds of distillation on the rendered test scenes."""
    return run_args(output_dir, data_dir, "--pretrained_teacher_model", teacher_dir, *extra)


def distil_main(argv):
    """The distillation script's command line, run in this process: a user error exits with its one line."""
    cli.run(distill_conditional_ddpm.main, distill_conditional_ddpm.parse_args(argv))


@pytest.fixture(scope="session")
def distilled_run(tmp_path_factory, teacher_dir, synthetic_dir):
    """Four steps, checkpointed every two: the run and the flags it was given."""
    output_dir = tmp_path_factory.mktemp("distilled") / "student"
    args = distillation_args(output_dir, teacher_dir, synthetic_dir, "--max_train_steps", 4, "--checkpointing_steps", 2)
    distil_main(args)
    return output_dir, args


def count_unet_calls(pipeline) -> list:
    calls = []
    pipeline.unet.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    return calls


def test_the_student_saves_loads_with_plain_diffusers_and_draws_in_4_unet_evaluations(distilled_run):
    output_dir, _ = distilled_run
    plain = DiffusionPipeline.from_pretrained(output_dir, trust_remote_code=True)
    ours = CondDDPMPipeline.from_pretrained(output_dir)
    assert isinstance(plain.scheduler, LCMScheduler) and plain.is_distilled
    calls = count_unet_calls(plain)
    labels = [["red cube", "blue sphere"]]
    drawn = plain(labels, num_inference_steps=4, guidance_scale=3, generator=torch.manual_seed(0), output_type="np")
    assert drawn.images.shape == (1, 8, 8, 3)
    assert calls == [1, 1, 1, 1]  # one evaluation per step of one image: the guidance is an input, not a second pass
    again = ours(labels, num_inference_steps=4, guidance_scale=3, generator=torch.manual_seed(0), output_type="np")
    assert (again.images == drawn.images).all()
    card = (output_dir / "README.md").read_text()
    assert "steps, guidance, generator = 4, 3.0" in card and "pipe.scheduler =" not in card
    assert "- lcm" in card and "distill_conditional_ddpm.py" in card


def test_a_student_draws_in_4_steps_by_default_and_refuses_steps_its_scheduler_cannot_take(distilled_run):
    student = CondDDPMPipeline.from_pretrained(distilled_run[0])
    calls = count_unet_calls(student)
    student([["gray cube"]], output_type="np")
    assert len(calls) == 4
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer from 1 to 50 \(the LCM scheduler's"):
        student([["gray cube"]], num_inference_steps=51)


def test_the_students_guidance_input_changes_its_output(distilled_run):
    student = CondDDPMPipeline.from_pretrained(distilled_run[0])
    images = [
        student([["red cube"]], 2, guidance_scale=scale, generator=torch.manual_seed(0), output_type="pt").images
        for scale in (2.0, 4.0)
    ]
    assert (images[0] - images[1]).abs().max() > 1e-4


def test_an_untrained_student_is_the_teachers_conditional_prediction_at_any_guidance(teacher_dir):
    teacher = CondDDPMPipeline.from_pretrained(teacher_dir)
    student = make_student(teacher, time_cond_proj_dim=16, num_ddim_timesteps=50, timestep_scaling=10.0)
    noisy, timesteps = torch.randn(2, 3, 8, 8), torch.tensor([999, 19])
    labels = torch.zeros(2, 24)
    labels[:, [1, 10]] = 1
    with torch.no_grad():
        taught = teacher.unet(noisy, timesteps, **teacher.label_embedding(labels)).sample
        for scale in (1.0, 7.0):
            guidance = guidance_scale_embedding(torch.full((2,), scale), 16)
            learnt = student.unet(noisy, timesteps, **student.label_embedding(labels), timestep_cond=guidance).sample
            assert torch.allclose(learnt, taught, atol=1e-5)


def test_the_guidance_embedding_is_diffusers_lcm_embedding_of_the_scale_less_one():
    """LatentConsistencyModelPipeline.get_guidance_scale_embedding, written out (that pipeline needs transformers)."""
    scales, half = torch.tensor([1.0, 3.0, 8.5]), 16
    frequencies = torch.exp(torch.arange(half) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = ((scales - 1) * 1000)[:, None] * frequencies[None, :]
    lcm = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    # float32 angles up to 7500 radians: the two orders of operations agree to about 1e-4
    assert torch.allclose(guidance_scale_embedding(scales, 2 * half), lcm, atol=1e-3)


def test_predicted_image_and_noise_recover_what_was_mixed(teacher_dir):
    scheduler = CondDDPMPipeline.from_pretrained(teacher_dir).scheduler
    images, noise, timesteps = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8), torch.tensor([5, 500, 990])
    noisy = scheduler.add_noise(images, noise, timesteps)
    velocity = scheduler.get_velocity(images, noise, timesteps)
    image, recovered_noise = predicted_image_and_noise(velocity, timesteps, noisy, scheduler)
    assert torch.allclose(image, images, atol=1e-4) and torch.allclose(recovered_noise, noise, atol=1e-4)


def test_resuming_a_distillation_run_is_exact(distilled_run, tmp_path):
    output_dir, args = distilled_run
    resumed = tmp_path / "resumed"
    shutil.copytree(output_dir / "checkpoint-2", resumed / "checkpoint-2")
    distil_main([str(resumed) if a == str(output_dir) else a for a in args] + ["--resume_from_checkpoint", "latest"])
    assert_same_weights(resumed / "checkpoint-4", output_dir / "checkpoint-4")  # the student
    assert_same_weights(resumed / "checkpoint-4" / "ema", output_dir / "checkpoint-4" / "ema")  # its target network
    assert_same_weights(resumed, output_dir)


def test_samplers_meant_for_the_other_kind_of_pipeline_are_refused(distilled_run, teacher_dir):
    with pytest.raises(ValueError, match="is distilled: it samples with its lcm scheduler only"):
        set_scheduler(CondDDPMPipeline.from_pretrained(distilled_run[0]), "euler-a")
    with pytest.raises(ValueError, match="the lcm sampler draws with a distilled pipeline only"):
        set_scheduler(CondDDPMPipeline.from_pretrained(teacher_dir), "lcm")


@pytest.mark.parametrize(
    "teacher, extra, message",
    [
        ("missing", [], "cannot load --pretrained_teacher_model .*missing: .*is not a folder"),
        ("empty folder", [], r"empty is not a saved pipeline \(it has no model_index.json\)"),
        ("tiny preset", [], "the teacher's UNet is a UNet2DModel, which takes no guidance input"),
        ("student", [], "the teacher is already a distilled pipeline"),
        ("teacher", ["--num_inference_steps", "60"], "--num_inference_steps 60 exceeds --num_ddim_timesteps 50"),
        ("teacher", ["--num_ddim_timesteps", "2000"], "--num_ddim_timesteps 2000 exceeds the 1000 timesteps"),
        ("teacher", ["--w_min", "3", "--w_max", "1"], "--w_min 3.0 is above --w_max 1.0"),
        ("teacher", ["--ema_decay", "1"], r"--ema_decay: .*must be a number in \[0, 1\), got '1'"),
        (None, [], "--pretrained_teacher_model is required"),
    ],
)
def test_bad_distillation_flags_fail_in_one_line_before_anything_is_written(
    teacher, extra, message, tmp_path, teacher_dir, distilled_run, synthetic_dir, tiny_pipeline_dir, capsys
):
    folders = {"teacher": teacher_dir, "student": distilled_run[0], "tiny preset": tiny_pipeline_dir}
    output_dir = tmp_path / "out"
    args = run_args(output_dir, synthetic_dir, *extra)
    if teacher is not None:
        folder = folders.get(teacher, tmp_path / teacher.split()[0])
        if teacher == "empty folder":
            folder.mkdir()
        args += ["--pretrained_teacher_model", str(folder)]
    with pytest.raises(SystemExit) as stopped:
        distil_main(args)
    error = str(stopped.value.code) if stopped.value.code != 2 else capsys.readouterr().err
    assert len(error.strip().splitlines()) <= 2 and re.search(message, error), error
    assert not output_dir.exists()


def test_sigterm_stops_a_distillation_with_a_checkpoint_it_resumes_from(tmp_path, teacher_dir, synthetic_dir):
    args = distillation_args(tmp_path, teacher_dir, synthetic_dir, "--max_train_steps", 4000)
    process = start_training(args, "distill_conditional_ddpm.py")
    wait_for(process, r"steps:\s+\d+%.*\| [1-9]\d*/4000")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    step = int(re.search(r"stop requested: checkpoint-(\d+) saved", output).group(1))
    assert not (tmp_path / "model_index.json").exists()
    resumed = run_python(
        "distill_conditional_ddpm.py", *args, "--resume_from_checkpoint", "latest", "--max_train_steps", step + 1
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / f'checkpoint-{step}'} at step {step}" in resumed.stderr
    assert CondDDPMPipeline.from_pretrained(tmp_path).is_distilled


def test_two_processes_distil_one_student_with_identical_weights(tmp_path, teacher_dir, synthetic_dir):
    args = distillation_args(tmp_path / "ddp", teacher_dir, synthetic_dir, "--max_train_steps", 2)
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "bf16", "--dynamo_backend", "no", "distill_conditional_ddpm.py"]
    result = run_python(*launch, *args, "--mixed_precision", "bf16", env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the weights are identical on all 2 processes" in result.stderr
    assert "2 steps of 4 x 2 processes" in result.stderr
    assert CondDDPMPipeline.from_pretrained(tmp_path / "ddp").is_distilled


def test_every_distillation_recipe_sets_its_steps_and_only_flags_of_the_script():
    parser = distill_conditional_ddpm.build_parser(recipe=None)
    flags = {action.dest for action in parser._actions}
    for name, recipe in DISTILL_RECIPES.items():
        assert isinstance(recipe["max_train_steps"], int), name
        assert set(recipe) <= flags, f"{name} sets {sorted(set(recipe) - flags)}, which are not flags"
    assert set(distill_conditional_ddpm.CARD_SETTINGS) <= flags
