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


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def two_views(image_size: int, mean: Sequence[float], std: Sequence[float], scale=(0.08, 1.0),
              color_jitter: float = 0.4, interpolation: str = "bicubic") -> Callable:
    """Two independent draws of timm's training transform without AutoAugment, random erasing or
    mixup (SiT's views, specs §3(a) step 3): RandomResizedCrop, horizontal flip, ColorJitter with
    brightness = contrast = saturation = `color_jitter` (applied always, no hue), normalised."""
    if interpolation not in INTERPOLATIONS:
        from selfsup.errors import unknown_choice

        raise unknown_choice("interpolation", interpolation, INTERPOLATIONS)
    mode = v2.InterpolationMode(interpolation)
    jitter = [v2.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
    transform = v2.Compose([
        v2.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
        *jitter,
        *to_float(mean, std),
    ])
    return lambda img: {"view1": transform(img), "view2": transform(img)}


def colour_augment(p_jitter: float = 0.8, p_gray: float = 0.2) -> list:
    return [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=p_jitter), v2.RandomGrayscale(p_gray)]


def patch_grid(image: torch.Tensor, patch_size: int, jitter: int, keep: int, grid: int = 3) -> torch.Tensor:
    """Cut a grid x grid lattice of `patch_size` patches from `image` [C, S, S], each shifted by a
    random U{0..jitter} in x and y, and keep `keep` of them at random -> [keep, C, p, p]. The lattice
    step is (S - patch_size - jitter) // (grid - 1) (68 for OBoW's 256/96/24)."""
    size = image.shape[-1]
    step = (size - patch_size - jitter) // (grid - 1)
    if step < 0 or keep > grid * grid:
        raise ValueError(f"cannot cut {keep} patches of {patch_size} px (jitter {jitter}) from a {size} px image")
    offsets = torch.randint(0, jitter + 1, (grid * grid, 2)).tolist()
    patches = []
    for n, (dy, dx) in enumerate(offsets):
        y, x = (n // grid) * step + dy, (n % grid) * step + dx
        patches.append(image[:, y:y + patch_size, x:x + patch_size])
    chosen = torch.randperm(grid * grid)[:keep].tolist()
    return torch.stack([patches[i] for i in chosen])


def multi_crop_view(mean: Sequence[float], std: Sequence[float], *, teacher_size: int, teacher_resize: int,
                    num_crops: int, crop_size: int, crop_scale=(0.08, 0.6), num_patches: int = 5,
                    patch_image_size: int = 256, patch_size: int = 96, patch_jitter: int = 24,
                    patch_scale=(0.6, 1.0), blur_p: float = 0.5) -> Callable:
    """OBoW's views (specs §2(a) step 1): `image` the teacher's view (resize, centre crop, flip; no colour
    augmentation), `crops` [num_crops, C, crop_size, crop_size] (random resized crops with colour jitter,
    grayscale, blur, flip), `patches` [num_patches, C, patch_size, patch_size] (a random resized crop
    with colour jitter / grayscale / flip, normalised, then cut into a jittered 3x3 grid of which
    `num_patches` are kept)."""
    teacher = v2.Compose([v2.Resize(teacher_resize, antialias=True), v2.CenterCrop(teacher_size),
                          v2.RandomHorizontalFlip(), *to_float(mean, std)])
    blur_kernel = max(3, (crop_size // 10) | 1)
    crop = v2.Compose([
        v2.RandomResizedCrop(crop_size, scale=tuple(crop_scale), antialias=True),
        *colour_augment(),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=blur_p),
        v2.RandomHorizontalFlip(),
        *to_float(mean, std),
    ])
    patch_image = v2.Compose([
        v2.RandomResizedCrop(patch_image_size, scale=tuple(patch_scale), antialias=True),
        *colour_augment(),
        v2.RandomHorizontalFlip(),
        *to_float(mean, std),
    ])

    def view(img) -> dict:
        out = {"image": teacher(img), "crops": torch.stack([crop(img) for _ in range(num_crops)])}
        if num_patches:
            out["patches"] = patch_grid(patch_image(img), patch_size, patch_jitter, num_patches)
        return out

    return view
