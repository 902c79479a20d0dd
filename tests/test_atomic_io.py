"""cond_ddpm.atomic_io: outputs appear whole or not at all, and never replace what they were not meant to."""

import errno
from pathlib import Path

import pytest
from conftest import FullDisk

from cond_ddpm.atomic_io import INCOMPLETE_PREFIX, atomic_write, atomic_write_text, staged_contents, staged_directory


def test_a_folder_writer_refuses_a_file_in_its_place_even_when_overwriting(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(FileExistsError, match=f"{mine} is a file, and a folder is to be written there"):
        with staged_directory(mine, overwrite=True) as staging:
            (staging / "result.txt").write_text("new")
    assert mine.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("existing", ["folder", "device"])
def test_a_file_writer_refuses_what_is_not_a_regular_file(tmp_path, existing):
    target = tmp_path / "out" if existing == "folder" else Path("/dev/null")
    if existing == "folder":
        target.mkdir()
    expected = "is a folder; a file is to be written there" if existing == "folder" else "is not a regular file"
    with pytest.raises(OSError, match=f"{target} {expected}"):
        atomic_write_text(target, "text")
    assert target.is_dir() if existing == "folder" else target.is_char_device()


def test_a_name_near_the_file_system_limit_still_gets_written(tmp_path):
    path = tmp_path / ("a" * 250 + ".txt")  # its staging name would pass 255 bytes uncut
    assert atomic_write_text(path, "text").read_text() == "text"


def test_a_failed_write_names_the_users_path_not_the_staging_file(tmp_path):
    path = tmp_path / "grid.png"

    def full_disk(temporary):
        raise OSError(errno.ENOSPC, "No space left on device", str(temporary))

    with pytest.raises(OSError, match=f"cannot write {path}: No space left on device") as failed:
        atomic_write(path, full_disk)
    assert INCOMPLETE_PREFIX not in str(failed.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_pipeline_save_keeps_the_old_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text("old index")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "weights").write_text("old weights")
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(FullDisk):
        with staged_contents(tmp_path, marker="model_index.json") as staging:
            (staging / "unet").mkdir()
            (staging / "unet" / "weights").write_text("new weights")
            raise FullDisk()
    assert (tmp_path / "model_index.json").read_text() == "old index"
    assert (tmp_path / "unet" / "weights").read_text() == "old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "model_index.json", "unet"]
    with staged_contents(tmp_path, marker="model_index.json") as staging:
        (staging / "unet").mkdir()
        (staging / "unet" / "weights").write_text("new weights")
        (staging / "model_index.json").write_text("new index")
    assert (tmp_path / "unet" / "weights").read_text() == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "model_index.json", "unet"]


def test_a_failed_directory_write_keeps_the_old_directory(tmp_path):
    final = tmp_path / "best"
    final.mkdir()
    (final / "a").write_text("old")
    with pytest.raises(FullDisk):
        with staged_directory(final, overwrite=True) as staging:
            (staging / "a").write_text("new")
            raise FullDisk()
    assert (final / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["best"]
