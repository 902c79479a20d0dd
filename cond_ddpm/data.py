"""i-CLEVR data: the real layout through `datasets`, and a synthetic renderer that writes the very same layout.

The layout is an image folder, `train.json` (file name -> list of object names) and `objects.json` (object name ->
index). Both real and synthetic data load through `load_iclevr_dataset`; a dataset on the Hub (or saved with
`save_to_disk`) loads through `load_hub_dataset`. Either gives a `datasets.Dataset` whose rows come as `pixel_values`
(3, R, R) in [-1, 1] and multi-hot `labels`.

    python -m cond_ddpm.data synthesize --output_dir DIR --num_scenes 1000 --seed 0
    python -m cond_ddpm.data preview --dataset_dir DIR --output preview.png
    python -m cond_ddpm.data push --dataset_dir DIR --repo_id you/iclevr-synthetic
"""

import hashlib
import io
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image, List, load_dataset, load_from_disk
from PIL import Image as PILImage
from torchvision.transforms import v2
from tqdm.auto import tqdm

from cond_ddpm import cli, hub
from cond_ddpm.atomic_io import staged_directory
from cond_ddpm.grids import save_captioned_grid
from cond_ddpm.render import RENDERER_VERSION, random_scene, render_scene
from pipeline_cond_ddpm import multi_hot

SPEC_DIR = Path(__file__).resolve().parent / "iclevr"
OBJECTS_JSON = SPEC_DIR / "objects.json"
TEST_JSON = SPEC_DIR / "test.json"
NEW_TEST_JSON = SPEC_DIR / "new_test.json"
CACHE_DIR = Path(os.environ.get("COND_DDPM_CACHE", Path.home() / ".cache" / "cond-ddpm"))
MAX_SCENES = 100_000  # 300,000 images, 17 times i-CLEVR's training set: more is a typo, not a dataset
BYTES_PER_SCENE = 50_000  # its three 320x240 PNGs, measured at about 45 kB


def _read_json(path):
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; a JSON file is expected here")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def read_objects_json(path=OBJECTS_JSON) -> list[str]:
    """The vocabulary of an objects.json ({name: index}), as a list of names in index order."""
    objects = _read_json(path)
    if not isinstance(objects, dict) or not objects or not all(type(i) is int for i in objects.values()):
        raise ValueError(f'{path} must map object names to indices 0..C-1, e.g. {{"gray cube": 0}}')
    if sorted(objects.values()) != list(range(len(objects))):
        raise ValueError(
            f"{path}: the indices must be 0..{len(objects) - 1}, each once; got {sorted(objects.values())}"
        )
    return sorted(objects, key=objects.get)


def read_label_sets(path, class_names: list[str]) -> list[list[str]]:
    """A test.json-style file: a list of label sets, each a non-empty list of known object names."""
    label_sets = _read_json(path)
    if not isinstance(label_sets, list) or not label_sets:
        raise ValueError(f'{path} must hold a non-empty list of label sets, e.g. [["red cube", "blue sphere"]]')
    for i, label_set in enumerate(label_sets):
        _check_label_set(label_set, class_names, f"{path}, entry {i}")
    return label_sets


def _check_label_set(label_set, class_names, where):
    if not isinstance(label_set, list) or not label_set or not all(isinstance(n, str) for n in label_set):
        raise ValueError(f"{where}: a label set must be a non-empty list of object names, got {label_set!r}")
    try:
        multi_hot([label_set], class_names)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


# --- The real layout ---------------------------------------------------------------------------------------------


def build_dataset(train_data_dir, train_json, objects_json=OBJECTS_JSON) -> Dataset:
    """Rows of (image, objects) from an i-CLEVR-style folder; checks every entry and names the file at fault."""
    class_names = read_objects_json(objects_json)
    entries = _read_json(train_json)
    if not isinstance(entries, dict):
        raise ValueError(f"{train_json} must map image file names to lists of object names")
    if not entries:
        raise ValueError(f"{train_json} lists no images: the dataset would be empty")
    image_dir = Path(train_data_dir)
    if image_dir.exists() and not image_dir.is_dir():
        raise NotADirectoryError(f"{image_dir} is a file; the images are read from a folder (--train_data_dir)")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    paths, objects = [], []
    for file_name, label_set in tqdm(entries.items(), desc="checking images", unit="image"):
        _check_label_set(label_set, class_names, f"{train_json}, entry {file_name!r}")
        path = image_path(image_dir, file_name, train_json)
        if not path.is_file():
            raise FileNotFoundError(f"{train_json} lists {file_name!r}, but {path} does not exist")
        _check_image_header(path)
        paths.append(str(path))
        objects.append([class_names.index(name) for name in label_set])
    features = Features({"image": Image(), "objects": List(ClassLabel(names=class_names))})
    return Dataset.from_dict({"image": paths, "objects": objects}, features=features)


def image_path(image_dir: Path, file_name: str, train_json) -> Path:
    """`image_dir / file_name`, refused when the name leads outside the image folder (an absolute path, or `..`):
    a command reads only inside the folders it was given."""
    if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
        raise ValueError(
            f"{train_json} lists {file_name!r}, which is outside the image folder {image_dir}; image names are paths"
            " inside that folder, such as CLEVR_train_000000_0.png"
        )
    return image_dir / file_name


# What PIL raises on a file it cannot decode; DecompressionBombError is a header claiming billions of pixels.
UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError)


def _check_image_header(path):
    # Reading the header of every file up front is cheap, and turns a bad file into an error before training.
    try:
        with PILImage.open(path):
            pass
    except UNREADABLE_IMAGE as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def load_iclevr_dataset(train_data_dir, train_json, objects_json=OBJECTS_JSON, resolution=64):
    """The training set of an i-CLEVR-style folder, as `with_training_transform` gives it."""
    return with_training_transform(build_dataset(train_data_dir, train_json, objects_json), resolution)


def load_hub_dataset(
    dataset_name,
    resolution=64,
    image_column="image",
    label_column="objects",
    objects_json=OBJECTS_JSON,
    config_name=None,
    cache_dir=None,
):
    """A dataset from the Hub, or a local `save_to_disk` / imagefolder path, transformed like `load_iclevr_dataset`.

    The label column holds, per image, a list of object names or a list of `ClassLabel` indices (whose names then
    are the vocabulary); with names, `objects_json` gives the vocabulary.
    """
    path = Path(dataset_name)
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        dataset = load_from_disk(dataset_name)
    else:
        dataset = load_dataset(dataset_name, config_name, cache_dir=cache_dir, split="train")
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"{dataset_name} has no column {column!r}; its columns are {dataset.column_names}")
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.rename_columns({image_column: "image", label_column: "objects"})
    label_feature = getattr(dataset.features["objects"], "feature", None)
    if not isinstance(label_feature, ClassLabel):
        class_names = read_objects_json(objects_json)
        for i, label_set in enumerate(dataset["objects"]):
            _check_label_set(label_set, class_names, f"{dataset_name}, row {i}")
        dataset = dataset.cast_column("objects", List(ClassLabel(names=class_names)))
    if len(dataset) == 0:
        raise ValueError(f"{dataset_name} has no rows")
    return with_training_transform(dataset, resolution)


def dataset_class_names(dataset: Dataset) -> list[str]:
    return list(dataset.features["objects"].feature.names)


def held_out_label_sets(dataset, count: int, seed: int) -> list[list[str]]:
    """Label sets drawn from the training labels, never one of test.json / new_test.json: best-checkpoint
    selection must not see the label sets the model is finally scored on."""
    class_names = dataset_class_names(dataset)
    reserved = {frozenset(s) for path in (TEST_JSON, NEW_TEST_JSON) for s in json.loads(path.read_text())}
    candidates = sorted({tuple(sorted(objects)) for objects in dataset.with_format(None)["objects"]})
    candidates = [c for c in candidates if frozenset(class_names[i] for i in c) not in reserved]
    chosen = np.random.default_rng(seed).permutation(len(candidates))[:count]
    return [[class_names[i] for i in candidates[j]] for j in sorted(chosen)]


def repeat_same_colour_pairs(dataset: Dataset, times: int) -> Dataset:
    """The dataset with each row whose label set holds two objects of one colour present `times` times in all.

    train.json's label sets hold such a pair in 11% of the images, new_test.json's in 28 of 32, where a model
    misses more objects than on test.json. Rows are repeated by index: nothing is decoded or copied, and the shuffle
    then draws those rows `times` times as often.
    """
    if not isinstance(times, int) or times < 1:
        raise ValueError(f"times must be a positive integer, got {times!r}")
    if times == 1:  # any vocabulary, not only 'colour shape' names
        return dataset
    class_names = dataset_class_names(dataset)
    unnamed = [name for name in class_names if len(name.split()) != 2]
    if unnamed:
        raise ValueError(f"object names must read 'colour shape' to find same-coloured pairs, got {unnamed[0]!r}")
    colours = [name.split()[0] for name in class_names]
    pairs = [
        i
        for i, objects in enumerate(dataset.with_format(None)["objects"])
        if len({colours[j] for j in objects}) < len(objects)
    ]
    return dataset.select(list(range(len(dataset))) + pairs * (times - 1))


def split_by_scene(dataset: Dataset, validation_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Hold out a fraction of the scenes of a `build_dataset` result (i-CLEVR's 3 images of a scene stay together)."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie strictly between 0 and 1, got {validation_fraction!r}")
    scenes = [
        Path(cell["path"]).stem.rsplit("_", 1)[0] for cell in dataset.cast_column("image", Image(decode=False))["image"]
    ]
    unique = sorted(set(scenes))
    held_out = set(np.random.default_rng(seed).permutation(unique)[: max(1, round(validation_fraction * len(unique)))])
    validation = [i for i, scene in enumerate(scenes) if scene in held_out]
    training = [i for i, scene in enumerate(scenes) if scene not in held_out]
    if not training:
        raise ValueError(f"validation_fraction {validation_fraction} leaves no scene to train on")
    return dataset.select(training), dataset.select(validation)


def resize(image: PILImage.Image, resolution: int) -> PILImage.Image:
    """Resize the whole frame to resolution x resolution: a centre crop would cut objects off."""
    return image.resize((resolution, resolution), PILImage.BILINEAR)


# PIL image (already RGB, already resized) -> float tensor (3, R, R) in [-1, 1].
to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])


def open_rgb(image) -> PILImage.Image:
    """Decode a path or an `Image(decode=False)` cell ({"path", "bytes"}) to RGB, naming the file if unreadable."""
    if isinstance(image, (str, Path)):
        image = {"path": str(image), "bytes": None}
    try:
        with PILImage.open(io.BytesIO(image["bytes"]) if image["bytes"] else image["path"]) as img:
            if img.mode.startswith("I"):  # 16-bit grey: convert("RGB") would clip every value above 255 to white
                img = PILImage.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8))
            return img.convert("RGB")  # i-CLEVR's PNGs are RGBA with an opaque alpha
    except UNREADABLE_IMAGE as error:
        raise ValueError(f"cannot read image {image['path'] or '(embedded bytes)'}: {error}") from None


def with_training_transform(dataset: Dataset, resolution: int) -> Dataset:
    """Rows as `pixel_values` (3, R, R) in [-1, 1] and multi-hot `labels`.

    Decoding a full-size frame costs milliseconds, more than a small model's training step on a CPU, so each image
    is decoded and resized once, by `datasets.map` into a cache file, and only small images are decoded per epoch.
    (Random flips are the training loop's, so that its RNG, which checkpoints save, decides them.)
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    class_names = dataset_class_names(dataset)
    cache = CACHE_DIR / "resized"
    cache.mkdir(parents=True, exist_ok=True)
    undecoded = dataset.cast_column("image", Image(decode=False))
    resized = undecoded.map(
        _resize_batch,
        batched=True,
        fn_kwargs={"resolution": resolution},
        # Named by what the rows hold, so a later run finds it, and a changed image or label makes a new one.
        cache_file_name=str(cache / f"{content_key(undecoded)}-{resolution}.arrow"),
        desc=f"resizing images to {resolution}x{resolution} (once)",
    )

    def to_tensors(batch):
        return {
            "pixel_values": [to_tensor(open_rgb(image)) for image in batch["image"]],
            "labels": multi_hot(batch["objects"], class_names),
        }

    return resized.with_transform(to_tensors)


def content_key(dataset: Dataset) -> str:
    """A digest of what an undecoded dataset's rows hold: the vocabulary, every label set, and every image, by its
    bytes where the dataset embeds them, else by its file's path, size and modification time."""
    digest = hashlib.sha256(json.dumps(dataset_class_names(dataset)).encode())
    rows = dataset.select_columns(["image", "objects"]).with_format(None)
    for start in range(0, len(rows), 1000):
        batch = rows[start : start + 1000]
        for image, objects in zip(batch["image"], batch["objects"], strict=True):
            if image["bytes"]:
                digest.update(hashlib.sha256(image["bytes"]).digest())
            else:
                stat = os.stat(image["path"])
                digest.update(f"{image['path']}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            digest.update(json.dumps(objects).encode())
    return digest.hexdigest()[:32]


def _resize_batch(batch, resolution):
    images = []
    for cell in batch["image"]:
        buffer = io.BytesIO()
        resize(open_rgb(cell), resolution).save(buffer, format="PNG", compress_level=1)
        images.append({"bytes": buffer.getvalue(), "path": cell["path"]})  # the path still names it in errors
    return {"image": images}


# --- The synthetic renderer ----------------------------------------------------------------------------------------


def _render_scene_files(job) -> dict[str, list[str]]:
    image_dir, scene_index, seed, class_names = job
    rng = np.random.default_rng([seed, scene_index])  # per scene, so the worker count cannot change the output
    objects, camera, light = random_scene(rng, class_names)
    labels = {}
    for count, rgba in enumerate(render_scene(objects, camera, light)):
        file_name = f"CLEVR_train_{scene_index:06d}_{count}.png"
        PILImage.fromarray(rgba, "RGBA").save(Path(image_dir) / file_name, compress_level=1)
        labels[file_name] = [obj.name for obj in objects[: count + 1]]
    return labels


def synthesize(output_dir, num_scenes: int, seed: int = 0, num_workers: int | None = None) -> Path:
    """Render `num_scenes` scenes (3 images each) into `output_dir/{images/, train.json, objects.json}`.

    The folder appears whole or not at all (see `atomic_io.staged_directory`).
    """
    if not isinstance(num_scenes, int) or not 1 <= num_scenes <= MAX_SCENES:
        raise ValueError(f"num_scenes must be an integer from 1 to {MAX_SCENES}, got {num_scenes!r}")
    disk = Path(output_dir).resolve()
    while not disk.exists():  # the nearest existing folder holds the disk it will be written to
        disk = disk.parent
    needed, free = num_scenes * BYTES_PER_SCENE, shutil.disk_usage(disk).free
    if needed > free:
        raise OSError(f"{num_scenes} scenes need about {needed:,} bytes in {disk}, and {free:,} are free")
    class_names = read_objects_json(OBJECTS_JSON)
    with staged_directory(output_dir) as staging:
        (staging / "images").mkdir()
        jobs = [(staging / "images", i, seed, class_names) for i in range(num_scenes)]
        train = {}
        # fork: the workers need only numpy and PIL, and a spawned worker would import torch first.
        with ProcessPoolExecutor(num_workers or os.cpu_count(), mp_context=get_context("fork")) as pool:
            rendered = pool.map(_render_scene_files, jobs, chunksize=16)
            for labels in tqdm(rendered, total=num_scenes, desc="rendering scenes", unit="scene"):
                train.update(labels)
        (staging / "train.json").write_text(json.dumps(train) + "\n")
        shutil.copyfile(OBJECTS_JSON, staging / "objects.json")
    return Path(output_dir)


def default_synthetic_dataset(num_scenes: int, seed: int = 0) -> Path:
    """The built-in synthetic training set, rendered into the cache on first use and reused after."""
    folder = CACHE_DIR / f"synthetic-iclevr-v{RENDERER_VERSION}-{num_scenes}-seed{seed}"
    if not folder.is_dir():
        print(f"Rendering {num_scenes} synthetic i-CLEVR scenes into {folder} (once) ...", flush=True)
        synthesize(folder, num_scenes, seed)
    return folder


# --- Command line --------------------------------------------------------------------------------------------------


def preview(dataset_dir, output, num_images: int = 12, columns: int = 3, tile: int = 256) -> Path:
    """Draw the first `num_images` images of an i-CLEVR-style folder with their labels, as one PNG."""
    dataset_dir = Path(dataset_dir)
    labels_by_file = _read_json(dataset_dir / "train.json")
    if not isinstance(labels_by_file, dict):
        raise ValueError(f"{dataset_dir / 'train.json'} must map image file names to lists of object names")
    entries = list(labels_by_file.items())[:num_images]
    images = [open_rgb(image_path(dataset_dir / "images", name, dataset_dir / "train.json")) for name, _ in entries]
    return save_captioned_grid(output, images, [labels for _, labels in entries], columns, tile)


def push(dataset_dir, repo_id: str, private: bool = False, token: str | None = None):
    """Publish an i-CLEVR-style folder as a `datasets` dataset (image + object labels) on the Hub."""
    dataset_dir = Path(dataset_dir)
    dataset = build_dataset(dataset_dir / "images", dataset_dir / "train.json", dataset_dir / "objects.json")
    try:
        dataset.push_to_hub(repo_id, private=private, token=token)
    except Exception as error:  # offline, no token, no write access: network, HTTP and Hub errors alike
        raise OSError(
            f"could not push {dataset_dir} to the Hub dataset {repo_id!r} ({hub.failure_reason(error, token)});"
            " check the network, run `hf auth login` or pass --hub_token"
        ) from None
    return dataset


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help):
        return commands.add_parser(name, help=help, description=help, formatter_class=cli.HelpFormatter)

    render = command("synthesize", "render a synthetic i-CLEVR folder")
    render.add_argument("--output_dir", required=True, help="the folder to create (images/, train.json, objects.json)")
    render.add_argument(
        "--num_scenes",
        type=cli.integer(1, MAX_SCENES),
        default=1000,
        help="each scene gives 3 images (1, 2, 3 objects)",
    )
    render.add_argument("--seed", type=cli.seed, default=0, help="another seed renders other scenes")
    render.add_argument(
        "--num_workers", type=cli.positive_int, default=None, help="rendering processes (default: all cores)"
    )
    show = command("preview", "draw images of an i-CLEVR-style folder with their labels")
    show.add_argument("--dataset_dir", required=True, help="holds images/ and train.json")
    show.add_argument("--output", required=True, help="the PNG to write")
    show.add_argument("--num_images", type=cli.positive_int, default=12, help="the first N images of train.json")
    publish = command("push", "publish an i-CLEVR-style folder as a Hub dataset")
    publish.add_argument("--dataset_dir", required=True, help="holds images/, train.json and objects.json")
    publish.add_argument("--repo_id", required=True, help="the dataset repository, e.g. you/iclevr-synthetic")
    publish.add_argument("--private", action="store_true", help="create the repository private")
    publish.add_argument("--hub_token", default=None, help="default: the token of `hf auth login` or HF_TOKEN")
    args = parser.parse_args(argv)
    if args.command == "synthesize":
        folder = cli.run(synthesize, args.output_dir, args.num_scenes, args.seed, args.num_workers)
        print(f"Wrote {3 * args.num_scenes} images to {folder / 'images'}, with train.json and objects.json")
    elif args.command == "preview":
        print(f"Drew {cli.run(preview, args.dataset_dir, args.output, args.num_images)}")
    else:
        dataset = cli.run(push, args.dataset_dir, args.repo_id, args.private, args.hub_token)
        print(f"Pushed {len(dataset)} images to https://huggingface.co/datasets/{args.repo_id}")


if __name__ == "__main__":
    main()
