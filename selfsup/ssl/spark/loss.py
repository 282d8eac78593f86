"""SparK's reconstruction loss (docs/methods/spark.md) and the inverse mapping for looking at reconstructions.

Images are cut into `patch x patch` patches, one per cell of the mask grid (patch = the encoder's
total stride), flattened in (row, column, channel) order. The target patch is normalised by its own
mean and sqrt(unbiased variance + 1e-6); the loss is the per-patch mean squared error averaged
over the masked patches only.
"""

from __future__ import annotations

import torch

from selfsup.ssl.spark.masking import upsample_mask

PATCH_VARIANCE_EPS = 1e-6


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/patch)*(W/patch), patch*patch*C], patches row-major, channels last."""
    b, c, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"image {height}x{width} is not a whole number of {patch}-px patches")
    h, w = height // patch, width // patch
    patches = images.reshape(b, c, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)  # b h w py px c
    return patches.reshape(b, h * w, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: [B, h*w, patch*patch*C] -> [B, C, h*patch, w*patch]."""
    b = patches.shape[0]
    h, w = grid
    images = patches.reshape(b, h, w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)  # b c h py w px
    return images.reshape(b, channels, h * patch, w * patch)


def patch_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and sqrt(unbiased variance + eps), each [B, L, 1]."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True, unbiased=True) + PATCH_VARIANCE_EPS).sqrt()
    return mean, std


def spark_loss(pred: torch.Tensor, target: torch.Tensor, active: torch.Tensor, patch: int) -> torch.Tensor:
    """pred, target: [B, 3, H, W]; active: [B, 1, H/patch, W/patch], True = visible.

    mean over masked patches of mean((pred_patch - normalised target_patch)^2)."""
    target_patches = patchify(target, patch)
    mean, std = patch_statistics(target_patches)
    normalised_target = (target_patches - mean) / std
    per_patch_error = (patchify(pred, patch) - normalised_target).pow(2).mean(dim=-1)  # [B, L]
    masked = (~active.bool()).flatten(1).to(per_patch_error.dtype)  # [B, L]
    if masked.shape != per_patch_error.shape:
        raise ValueError(f"mask {tuple(active.shape)} does not match {tuple(target.shape)} with {patch}-px patches")
    return (per_patch_error * masked).sum() / (masked.sum() + 1e-8)


def denormalised_prediction(pred: torch.Tensor, target: torch.Tensor, patch: int) -> torch.Tensor:
    """The prediction in image space: each predicted patch mapped back with its target patch's
    mean and std (the loss compares normalised patches)."""
    mean, std = patch_statistics(patchify(target, patch))
    grid = (target.shape[-2] // patch, target.shape[-1] // patch)
    return unpatchify(patchify(pred, patch) * std + mean, patch, grid, channels=target.shape[1])


def reconstruction_picture(pred: torch.Tensor, target: torch.Tensor, active: torch.Tensor, patch: int) -> torch.Tensor:
    """What to look at: the input at visible cells, the de-normalised prediction at masked ones."""
    visible = upsample_mask(active.bool(), target.shape[-2:])
    return torch.where(visible, target, denormalised_prediction(pred, target, patch))
