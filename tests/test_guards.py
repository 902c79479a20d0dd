"""cond_ddpm.training.guards: launches and settings that would train silently wrong are refused in one line, and idle
CPU cores are pointed out."""

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import run_python, training_args

from cond_ddpm.training import guards


def test_a_launch_whose_processes_run_alone_is_refused(tmp_path, synthetic_dir):
    result = run_python(
        "train_conditional_ddpm.py",
        *training_args(tmp_path / "alone", synthetic_dir, "--max_train_steps", 2),
        env={"OMPI_COMM_WORLD_SIZE": "2"},  # what mpirun -n 2 sets for two copies that never meet
    )
    assert result.returncode != 0
    assert "2 processes were launched but each runs alone" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "alone" / "model_index.json").exists()


def test_fp16_on_the_cpu_is_refused_in_one_line(tmp_path, synthetic_dir):
    """Accelerate has no loss scaler on a CPU, so fp16 there would train in fp32 while the model card says fp16."""
    args = training_args(tmp_path / "fp16", synthetic_dir, "--max_train_steps", 1, "--mixed_precision", "fp16")
    result = run_python("train_conditional_ddpm.py", *args)
    assert result.returncode != 0
    assert "error: --mixed_precision fp16 needs a GPU" in result.stderr
    assert "use --mixed_precision bf16 or no" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "fp16" / "model_index.json").exists()


@pytest.mark.parametrize("threads, warned", [(1, True), (4, False)])
def test_idle_cpu_cores_are_pointed_out(monkeypatch, caplog, threads, warned):
    monkeypatch.setattr(guards.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(guards.torch, "get_num_threads", lambda: threads)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING):
        guards.check_cpu_threads(SimpleNamespace(device=torch.device("cpu"), num_processes=1))
    assert ("--num_cpu_threads_per_process 4" in caplog.text) == warned
