"""Views (augmentations) from torchvision.transforms.v2. A view function maps a decoded PIL image to
a dict of tensors that is merged into the sample; methods say which views they want."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2


def to_float(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_view(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Resize (shorter side) + centre crop + normalise: what the probe and visualisations see."""
    transform = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), *to_float(mean, std)])
    return lambda img: {"image": transform(img)}


def crop_flip_view(image_size: int, mean: Sequence[float], std: Sequence[float], padding_frac: float = 0.125) -> Callable:
    """The CIFAR recipe (random crop with padding, horizontal flip), scaled to `image_size`."""
    transform = v2.Compose([
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.RandomCrop(image_size, padding=max(1, round(image_size * padding_frac))),
        v2.RandomHorizontalFlip(),
        *to_float(mean, std),
    ])
    return lambda img: {"image": transform(img)}


def resized_crop_view(image_size: int, mean: Sequence[float], std: Sequence[float], scale=(0.08, 1.0)) -> Callable:
    """RandomResizedCrop + flip (the ImageNet recipe)."""
    transform = v2.Compose([
        v2.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True),
        v2.RandomHorizontalFlip(),
        *to_float(mean, std),
    ])
    return lambda img: {"image": transform(img)}
