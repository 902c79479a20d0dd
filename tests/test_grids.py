"""cond_ddpm/grids.py: every image of a grid with its label set written under it."""

import numpy as np
import pytest
import torch
from PIL import Image

from cond_ddpm.grids import LINE_HEIGHT, captioned_grid, save_captioned_grid


def images(count, size=32):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


LABEL_SETS = [["red cube"], ["blue sphere", "green cylinder"], ["gray cube", "cyan sphere", "yellow cylinder"]] * 3


def test_each_row_has_room_for_the_longest_label_set_under_its_images():
    grid = captioned_grid(images(9), LABEL_SETS, columns=4, tile_width=96)
    assert grid.size == (4 * 96, 3 * (96 + 3 * LINE_HEIGHT))  # 3 rows of 4, 4, 1 images, captions of 3 lines


def test_the_captions_are_drawn_under_the_images_and_differ_with_the_labels():
    pictures = images(3)
    grid = np.asarray(captioned_grid(pictures, LABEL_SETS[:3], tile_width=96))
    other = np.asarray(captioned_grid(pictures, [["red cube"], ["blue sphere", "green cube"], LABEL_SETS[2]], 8, 96))
    assert np.array_equal(grid[:96], other[:96])  # the pictures themselves
    captions = grid[96:]
    for column, labels in enumerate(LABEL_SETS[:3]):
        for line in range(3):
            ink = (captions[line * LINE_HEIGHT : (line + 1) * LINE_HEIGHT, column * 96 : (column + 1) * 96] < 128).any()
            assert ink == (line < len(labels)), (column, line)  # one line of text per object, blank below
    changed = np.argwhere((grid != other).any(axis=-1))
    assert changed.size and changed[:, 0].min() >= 96 and changed[:, 1].min() >= 96 and changed[:, 1].max() < 192


def test_a_grid_is_refused_when_images_and_label_sets_do_not_pair_up(tmp_path):
    with pytest.raises(ValueError, match="3 images but 2 label sets"):
        save_captioned_grid(tmp_path / "grid.png", images(3), LABEL_SETS[:2])
    assert not list(tmp_path.iterdir())


def test_saved_grids_are_pngs_of_pil_and_tensor_images_alike(tmp_path):
    pictures = images(2, size=24)
    as_pil = [Image.fromarray(picture.permute(1, 2, 0).numpy()) for picture in pictures]
    first = save_captioned_grid(tmp_path / "a.png", pictures, LABEL_SETS[:2], tile_width=48)
    second = save_captioned_grid(tmp_path / "b.png", as_pil, LABEL_SETS[:2], tile_width=48)
    with Image.open(first) as a, Image.open(second) as b:
        assert a.format == "PNG" and np.array_equal(np.asarray(a), np.asarray(b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no staging files left
