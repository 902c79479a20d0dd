"""Image grids with each image's label set written under it, so a reader can see whether the labels were followed.

Every grid the project writes comes from here: training samples (the files and TensorBoard's), the model card's
picture (a copy of the training samples), `evaluate_iclevr.py score` and `denoise`, `python -m cond_ddpm.data preview`.
"""

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image

from cond_ddpm.atomic_io import atomic_write

LINE_HEIGHT = 14  # pixels per caption line: PIL's default font is about 11 tall


def captioned_grid(images, label_sets, columns: int = 8, tile_width: int = 128) -> Image.Image:
    """Lay `images` (PIL images, or 8-bit (3, H, W) tensors) out `columns` to a row, each resized to `tile_width`
    pixels wide (its aspect ratio kept) with the object names of its label set under it, one per line."""
    if len(images) != len(label_sets):
        raise ValueError(f"{len(images)} images but {len(label_sets)} label sets; each image needs its own")
    images = [to_pil_image(image) if isinstance(image, torch.Tensor) else image.convert("RGB") for image in images]
    tile_height = round(tile_width * images[0].height / images[0].width)
    cell_height = tile_height + LINE_HEIGHT * max(len(labels) for labels in label_sets)
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (min(columns, len(images)) * tile_width, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, labels) in enumerate(zip(images, label_sets, strict=True)):
        x, y = (i % columns) * tile_width, (i // columns) * cell_height
        grid.paste(image.resize((tile_width, tile_height), Image.Resampling.BICUBIC), (x, y))
        for line, label in enumerate(labels):
            draw.text((x + 4, y + tile_height + 1 + LINE_HEIGHT * line), label, fill="black")
    return grid


def save_captioned_grid(path, images, label_sets, columns: int = 8, tile_width: int = 128) -> Path:
    """`captioned_grid` written to `path` as a PNG, whole or not at all."""
    grid = captioned_grid(images, label_sets, columns, tile_width)
    return atomic_write(path, lambda temporary: grid.save(temporary, format="PNG"))
