"""The synthetic renderer writes the real i-CLEVR layout; both load through `datasets` the same way."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from cond_ddpm import data as iclevr_data
from cond_ddpm.data import (
    OBJECTS_JSON,
    TEST_JSON,
    build_dataset,
    load_hub_dataset,
    load_iclevr_dataset,
    read_label_sets,
    repeat_same_colour_pairs,
    split_by_scene,
    synthesize,
)
from cond_ddpm.render import SIZES, SceneObject, random_scene, render_scene

REAL_SPEC = Path(__file__).resolve().parents[2] / "shared" / "iclevr"  # the course's files, where a checkout has them


def test_shipped_spec_files_are_the_real_ones(class_names):
    assert len(class_names) == 24
    assert class_names[:3] == ["gray cube", "red cube", "blue cube"] and class_names[-1] == "yellow cylinder"
    if not REAL_SPEC.is_dir():
        pytest.skip("the course's spec files are not beside this checkout")
    for name in ("objects.json", "test.json", "new_test.json"):
        assert (OBJECTS_JSON.parent / name).read_bytes() == (REAL_SPEC / name).read_bytes()


def test_synthetic_layout_matches_the_real_spec(synthetic_dir, class_names):
    train = json.loads((synthetic_dir / "train.json").read_text())
    assert (synthetic_dir / "objects.json").read_bytes() == OBJECTS_JSON.read_bytes()
    files = sorted(p.name for p in (synthetic_dir / "images").iterdir())
    assert files == sorted(train) and len(files) == 18
    assert all(re.fullmatch(r"CLEVR_train_\d{6}_[012]\.png", name) for name in files)
    with PILImage.open(synthetic_dir / "images" / files[0]) as image:
        assert image.size == (320, 240) and image.mode == "RGBA"
    for scene in {name[:-6] for name in files}:
        one, two, three = (train[f"{scene}_{k}.png"] for k in range(3))
        # Each image of a scene adds one object to the previous one, as in i-CLEVR.
        assert three[:1] == one and three[:2] == two and len(set(three)) == 3
        assert set(three) <= set(class_names)


def test_rendering_is_deterministic_per_seed(synthetic_dir, tmp_path):
    again = synthesize(tmp_path / "again", num_scenes=2, seed=0, num_workers=2)
    other = synthesize(tmp_path / "other", num_scenes=2, seed=1, num_workers=1)
    name = "CLEVR_train_000001_2.png"
    assert (again / "images" / name).read_bytes() == (synthetic_dir / "images" / name).read_bytes()
    assert (other / "images" / name).read_bytes() != (synthetic_dir / "images" / name).read_bytes()


def test_every_colour_and_shape_renders_distinguishably(class_names):
    """Each object alone, large, in the same spot: 24 different images, and the colours are told apart by hue."""
    rng = np.random.default_rng(0)
    _, camera, light = random_scene(rng, class_names, num_objects=1)
    images = {}
    for name in class_names:
        color, shape = name.split()
        obj = SceneObject(shape, color, "rubber", SIZES["large"], 0.0, 0.0, 0.3)
        images[name] = render_scene([obj], camera, light)[0][..., :3].astype(int)
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(images[a] - images[b]).mean() > 0.5, (a, b)


def test_a_scene_of_given_objects_holds_exactly_them(class_names):
    """The renderer draws a label set (e.g. of new_test.json), not just random objects; bad label sets are refused."""
    names = ["red cube", "red sphere", "gray cylinder"]
    objects, camera, light = random_scene(np.random.default_rng(0), class_names, names=names)
    assert [obj.name for obj in objects] == names
    assert len(render_scene(objects, camera, light)) == 3
    for bad in ([], ["red cube", "red cube"], ["pink cube"]):
        with pytest.raises(ValueError, match="distinct objects of class_names"):
            random_scene(np.random.default_rng(0), class_names, names=bad)


def test_loader_gives_normalised_images_and_multi_hot_labels(synthetic_dir, class_names):
    dataset = load_iclevr_dataset(synthetic_dir / "images", synthetic_dir / "train.json", resolution=32)
    train = json.loads((synthetic_dir / "train.json").read_text())
    assert len(dataset) == 18
    row = dataset[5]
    assert row["pixel_values"].shape == (3, 32, 32) and row["pixel_values"].dtype == torch.float32
    assert -1 <= row["pixel_values"].min() < row["pixel_values"].max() <= 1
    names = list(train.values())[5]  # rows keep train.json's order
    assert row["labels"].shape == (24,)
    assert row["labels"].nonzero().flatten().tolist() == sorted(class_names.index(n) for n in names)


def test_loader_resizes_the_whole_frame(tmp_path):
    """A red stripe at the left edge of a 320x240 frame survives: a centre crop would have cut it off."""
    frame = np.full((240, 320, 4), 128, dtype=np.uint8)
    frame[:, :20, :3] = (255, 0, 0)
    (tmp_path / "images").mkdir()
    PILImage.fromarray(frame, "RGBA").save(tmp_path / "images" / "a.png")
    (tmp_path / "train.json").write_text(json.dumps({"a.png": ["red cube"]}))
    pixels = load_iclevr_dataset(tmp_path / "images", tmp_path / "train.json", resolution=64)[0]["pixel_values"]
    assert pixels[0, :, 0].min() > 0.9 and pixels[1, :, 0].max() < -0.9  # red at the left edge
    assert pixels[0, :, 32].abs().max() < 0.05  # grey in the middle


def test_hub_datasets_load_with_names_or_class_labels(tmp_path, synthetic_dir, class_names):
    rows = build_dataset(synthetic_dir / "images", synthetic_dir / "train.json")
    rows.save_to_disk(tmp_path / "class-labels")
    with_names = Dataset.from_dict(
        {
            "picture": rows.cast_column("image", Image(decode=False))["image"],
            "objects_named": [[class_names[i] for i in o] for o in rows["objects"]],
        },
        features=Features({"picture": Image(), "objects_named": List(Value("string"))}),
    )
    with_names.save_to_disk(tmp_path / "names")
    first = load_hub_dataset(str(tmp_path / "class-labels"), resolution=16)[0]
    second = load_hub_dataset(str(tmp_path / "names"), 16, image_column="picture", label_column="objects_named")[0]
    assert torch.equal(first["labels"], second["labels"]) and torch.equal(first["pixel_values"], second["pixel_values"])


def test_hub_datasets_take_a_config_name_and_a_cache_dir(tmp_path, synthetic_dir, monkeypatch):
    rows = build_dataset(synthetic_dir / "images", synthetic_dir / "train.json")
    asked = []
    monkeypatch.setattr(iclevr_data, "load_dataset", lambda *args, **kwargs: asked.append((args, kwargs)) or rows)
    load_hub_dataset("someone/iclevr", 16, config_name="small", cache_dir=str(tmp_path / "hub-cache"))
    assert asked == [(("someone/iclevr", "small"), {"cache_dir": str(tmp_path / "hub-cache"), "split": "train"})]


def test_an_image_replaced_under_the_same_name_is_resized_again(tmp_path, synthetic_dir):
    images = tmp_path / "images"
    images.mkdir()
    train = {"a.png": ["red cube"]}
    (tmp_path / "train.json").write_text(json.dumps(train))
    PILImage.new("RGB", (32, 24), (255, 0, 0)).save(images / "a.png")
    red = load_iclevr_dataset(images, tmp_path / "train.json", resolution=8)[0]["pixel_values"]
    earlier = (images / "a.png").stat().st_mtime_ns
    PILImage.new("RGB", (32, 24), (0, 0, 255)).save(images / "a.png")
    os.utime(images / "a.png", ns=(earlier + 10**9, earlier + 10**9))  # a coarse clock could give both one time
    blue = load_iclevr_dataset(images, tmp_path / "train.json", resolution=8)[0]["pixel_values"]
    assert red[0].min() > 0.9 and blue[2].min() > 0.9, "the new image, not the cached copy of the old one"


def test_long_steps_show_their_progress(tmp_path, capsys):
    folder = synthesize(tmp_path / "rendered", num_scenes=2, seed=0, num_workers=1)
    build_dataset(folder / "images", folder / "train.json")
    shown = capsys.readouterr().err
    assert re.search(r"rendering scenes: 100%.* 2/2 ", shown) and re.search(r"checking images: 100%.* 6/6 ", shown)


def test_split_by_scene_keeps_scenes_together(synthetic_dir):
    rows = build_dataset(synthetic_dir / "images", synthetic_dir / "train.json")
    train, validation = split_by_scene(rows, validation_fraction=0.34, seed=0)
    scene = lambda d: {Path(c["path"]).stem[:-2] for c in d.cast_column("image", Image(decode=False))["image"]}  # noqa: E731
    assert len(train) + len(validation) == 18 and len(validation) == 6
    assert not scene(train) & scene(validation)


def label_rows(label_sets, class_names):
    features = Features({"objects": List(ClassLabel(names=class_names))})
    return Dataset.from_dict({"objects": [[class_names.index(n) for n in s] for s in label_sets]}, features=features)


def test_same_colour_pairs_are_repeated_and_nothing_else(class_names):
    label_sets = [
        ["red cube"],
        ["red cube", "red sphere"],
        ["red cube", "blue cube"],
        ["gray cube", "red cylinder", "gray sphere"],
    ]
    repeated = repeat_same_colour_pairs(label_rows(label_sets, class_names), 3)
    counts = [[class_names[i] for i in o] for o in repeated["objects"]]
    assert [counts.count(s) for s in label_sets] == [1, 3, 1, 3] and len(repeated) == 8


def test_repeated_rows_load_like_the_others(synthetic_dir):
    dataset = load_iclevr_dataset(synthetic_dir / "images", synthetic_dir / "train.json", resolution=16)
    repeated = repeat_same_colour_pairs(dataset, 2)
    assert len(dataset) < len(repeated) < 2 * len(dataset)  # the 1-object images hold no pair
    extra = repeated[len(repeated) - 1]
    assert extra["pixel_values"].shape == (3, 16, 16) and extra["labels"].sum() >= 2


def test_repeating_checks_its_inputs(class_names):
    rows = label_rows([["red cube"]], class_names)
    with pytest.raises(ValueError, match="times must be a positive integer, got 0"):
        repeat_same_colour_pairs(rows, 0)
    other_vocabulary = Dataset.from_dict(
        {"objects": [[0]]}, features=Features({"objects": List(ClassLabel(names=["cat", "dog"]))})
    )
    assert repeat_same_colour_pairs(other_vocabulary, 1) is other_vocabulary  # not repeating needs no colours
    with pytest.raises(
        ValueError, match="object names must read 'colour shape' to find same-coloured pairs, got 'cat'"
    ):
        repeat_same_colour_pairs(other_vocabulary, 2)


def test_label_files_are_checked(tmp_path, class_names):
    assert len(read_label_sets(TEST_JSON, class_names)) == 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([["red cube"], ["purple cone"]]))
    with pytest.raises(ValueError, match=r"bad.json, entry 1: unknown object name 'purple cone'"):
        read_label_sets(bad, class_names)


# --- Bad data: a clear error that names the file ----------------------------------------------------------------------


def write_folder(tmp_path, entries, images=("a.png",)):
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in images:
        PILImage.new("RGBA", (320, 240)).save(tmp_path / "images" / name)
    (tmp_path / "train.json").write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return tmp_path / "images", tmp_path / "train.json"


@pytest.mark.parametrize(
    "entries, images, error, message",
    [
        (
            {"a.png": ["red cube"], "b.png": ["red cube"]},
            ("a.png",),
            FileNotFoundError,
            r"lists 'b.png', but .*b.png does not exist",
        ),
        (
            {"a.png": ["red cubes"]},
            ("a.png",),
            ValueError,
            r"train.json, entry 'a.png': unknown object name 'red cubes'",
        ),
        ({}, (), ValueError, r"train.json lists no images: the dataset would be empty"),
        ('{"a.png": ["red cube"]', ("a.png",), ValueError, r"train.json is not valid JSON"),
        (
            {"a.png": "red cube"},
            ("a.png",),
            ValueError,
            r"entry 'a.png': a label set must be a non-empty list of object names",
        ),
    ],
    ids=["missing-image", "unknown-name", "empty", "malformed-json", "labels-not-a-list"],
)
def test_bad_data_is_named(tmp_path, entries, images, error, message):
    image_dir, train_json = write_folder(tmp_path, entries, images)
    with pytest.raises(error, match=message):
        build_dataset(image_dir, train_json)


def test_unreadable_png_is_named(tmp_path):
    image_dir, train_json = write_folder(tmp_path, {"a.png": ["red cube"], "b.png": ["blue cube"]})
    (image_dir / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"cannot read image .*b.png"):
        build_dataset(image_dir, train_json)


def test_a_truncated_png_is_named(tmp_path):
    """Its header is whole, so it passes the first check; decoding it for the resized cache fails, naming it."""
    image_dir, train_json = write_folder(tmp_path, {"a.png": ["red cube"]})
    data = (image_dir / "a.png").read_bytes()
    (image_dir / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*a.png"):
        load_iclevr_dataset(image_dir, train_json, resolution=16)


def test_synthesize_refuses_a_non_empty_folder_and_bad_counts(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken already exists and is not empty"):
        synthesize(tmp_path / "taken", num_scenes=1)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="num_scenes must be an integer from 1 to 100000, got 0"):
        synthesize(tmp_path / "new", num_scenes=0)


def test_preview_draws_images_with_their_labels(synthetic_dir, tmp_path):
    output = iclevr_data.preview(synthetic_dir, tmp_path / "preview.png", num_images=5)
    with PILImage.open(output) as sheet:
        assert sheet.size == (3 * 256, 2 * (192 + 42))
        assert len(np.unique(np.asarray(sheet.convert("L")))) > 50  # pictures, not an empty sheet


def test_rendering_more_scenes_than_the_disk_holds_is_refused_before_any_is_drawn(tmp_path, monkeypatch):
    monkeypatch.setattr(iclevr_data.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 0, 10**6))
    with pytest.raises(OSError, match=r"100 scenes need about 5,000,000 bytes in .*, and 1,000,000 are free"):
        iclevr_data.synthesize(tmp_path / "new" / "set", num_scenes=100)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match=r"num_scenes must be an integer from 1 to 100000, got 100000000"):
        iclevr_data.synthesize(tmp_path / "huge", num_scenes=100_000_000)
