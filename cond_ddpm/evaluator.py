"""The course's ResNet18 evaluator: building, loading and saving it, its accuracy metric, and the 64x64 8-bit pixels it
takes.

The evaluator is a torchvision `resnet18` whose `fc` is `Sequential(Linear(512, 24), Sigmoid())`, saved as
`{"model": state_dict}`, fed 64x64 images normalised to [-1, 1]. Accuracy counts, over all images of a label file, how
many of the k top-scoring objects (k = objects in the image's label set) are in the label set, divided by the total
number of labels.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from cond_ddpm.atomic_io import atomic_write

EVALUATOR_RESOLUTION = 64


def first_sentence(error: Exception) -> str:
    """The first sentence of a library's error, past the advice on unsafe loading that torch's weights-only errors
    open with; the error's type where it says nothing (torch's EOFError on an empty file)."""
    text = str(error).rpartition("WeightsUnpickler error:")[2].strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


def build_evaluator(num_classes: int) -> nn.Module:
    model = resnet18(weights=None)
    model.fc = nn.Sequential(nn.Linear(512, num_classes), nn.Sigmoid())
    return model


def load_evaluator(path, num_classes: int, device="cpu") -> nn.Module:
    """Load an evaluator saved in the official format, `{"model": state_dict}`, onto any device."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"evaluator checkpoint {path} is a folder; give the checkpoint file, such as checkpoint.pth"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"evaluator checkpoint {path} {'is not a regular file' if path.exists() else 'does not exist'}"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"evaluator checkpoint {path} is empty (0 bytes); it must hold {{'model': state_dict}}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for files that are not safe checkpoints
        raise ValueError(f"{path} is not a PyTorch checkpoint of plain tensors: {first_sentence(error)}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} must hold {{'model': state_dict}} (the official checkpoint.pth format); found {found}"
        )
    model = build_evaluator(num_classes)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        reason = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ValueError(f"{path} does not hold a ResNet18 evaluator for {num_classes} objects: {reason}") from None
    return model.eval().to(device)


def save_evaluator(model: nn.Module, path) -> Path:
    return atomic_write(path, lambda temporary: torch.save({"model": model.state_dict()}, temporary))


def top_k_hits(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, how many of its k top-scoring objects are in its label set (k = the objects in the set)."""
    return torch.tensor(
        [
            int(label[scores.topk(int(label.sum())).indices].sum())
            for scores, label in zip(probabilities, labels, strict=True)
        ]
    )


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """The course's metric, pooled over all images: top-k hits / total labels, k = objects in each label set."""
    total = int(labels.sum())
    if total == 0:
        raise ValueError("accuracy needs at least one object in the label sets")
    return int(top_k_hits(probabilities, labels).sum()) / total


def upsample(images: torch.Tensor) -> torch.Tensor:
    """Bring images to the evaluator's 64x64, the way its training images were brought up from 32x32."""
    if images.shape[-2:] == (EVALUATOR_RESOLUTION, EVALUATOR_RESOLUTION):
        return images
    return F.interpolate(images, size=EVALUATOR_RESOLUTION, mode="bilinear", align_corners=False)


def to_evaluator_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] at the model's resolution -> 8-bit (B, 3, 64, 64), as the 64x64 PNGs hold them."""
    return (upsample(images) * 255).round().clamp(0, 255).to(torch.uint8)


def evaluate(evaluator: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of 8-bit images (B, 3, 64, 64) against multi-hot labels."""
    return accuracy(object_scores(evaluator, images), labels.cpu())


@torch.no_grad()
def object_scores(evaluator: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The evaluator's probability of each object, per 8-bit image (B, 3, 64, 64), on the CPU."""
    device = next(evaluator.parameters()).device
    probabilities = evaluator(images.to(device).float() / 127.5 - 1).cpu()
    # topk ranks NaN above every number, so NaN scores would still give an accuracy, and a meaningless one.
    unscored = int((~probabilities.isfinite().all(dim=1)).sum())
    if unscored:
        raise FloatingPointError(
            f"the evaluator produced non-finite scores (NaN or inf) for {unscored} of {len(probabilities)} images;"
            " check its weights: no accuracy can be computed from them"
        )
    return probabilities
