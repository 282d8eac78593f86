"""SparK's random masks on the encoder's total-stride grid (docs/methods/spark.md, step 1).

A mask is a bool tensor `active [B, 1, h, w]`, True where a cell is visible. One cell of the grid
covers `total_stride x total_stride` pixels; every feature map of the encoder sees the same cells,
repeated to its own resolution.
"""

from __future__ import annotations

import torch


def num_visible(grid_h: int, grid_w: int, ratio: float) -> int:
    """Visible cells per image for a mask ratio: round(h*w*(1-ratio)), as the official code."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return round(grid_h * grid_w * (1.0 - ratio))


def random_visible_mask(
    batch: int,
    grid_h: int,
    grid_w: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """`[batch, 1, grid_h, grid_w]` bool, exactly `num_visible(...)` True cells per image, chosen
    uniformly (the cells with the smallest of i.i.d. uniform noises)."""
    keep = num_visible(grid_h, grid_w, ratio)
    # noise is drawn where the generator lives so that a seeded CPU generator gives the same masks
    # on every device
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, grid_h * grid_w, generator=generator, device=noise_device)
    kept_cells = noise.argsort(dim=1)[:, :keep].to(device)
    active = torch.zeros(batch, grid_h * grid_w, dtype=torch.bool, device=device)
    active.scatter_(1, kept_cells, True)
    return active.view(batch, 1, grid_h, grid_w)


def upsample_mask(active: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Repeat every cell of `active [B, 1, h, w]` to reach `size = (H, W)`, a whole multiple of it."""
    h, w = active.shape[-2:]
    height, width = size
    if height % h or width % w:
        raise ValueError(f"cannot upsample a {h}x{w} mask to {height}x{width}: not a whole multiple")
    if (height, width) == (h, w):
        return active
    return active.repeat_interleave(height // h, dim=-2).repeat_interleave(width // w, dim=-1)


def mask_image(image: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """The encoder's input: pixels of masked cells set to 0 (in normalised space)."""
    return image * upsample_mask(active, image.shape[-2:])
