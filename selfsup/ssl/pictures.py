"""Pictures for TensorBoard: image grids with a caption under each tile."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)


def captioned_grid(images: torch.Tensor, captions: Sequence[str], ok: Sequence[bool] | None = None,
                   columns: int = 8, scale: int = 3, title: str | None = None) -> np.ndarray:
    """`images` in [0, 1], [N, 3, H, W] -> an HWC uint8 grid; each tile framed green (ok) or red; an
    optional `title` line above the grid."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    tile_h, tile_w, text_h = h * scale, w * scale, 12
    rows = (n + columns - 1) // columns
    top = text_h + 4 if title else 0
    canvas = Image.new("RGB", (columns * (tile_w + 4), top + rows * (tile_h + text_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 2), title, fill=(0, 0, 0))
    pixels = (images.float().cpu().clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, columns)
        x, y = c * (tile_w + 4), top + r * (tile_h + text_h + 4)
        tile = Image.fromarray(pixels[i]).resize((tile_w, tile_h), Image.NEAREST)
        if ok is not None:
            draw.rectangle([x, y, x + tile_w + 3, y + tile_h + 3], fill=(0, 160, 0) if ok[i] else (200, 0, 0))
        canvas.paste(tile, (x + 2, y + 2))
        draw.text((x + 2, y + tile_h + 3), captions[i], fill=(0, 0, 0))
    return np.asarray(canvas)
