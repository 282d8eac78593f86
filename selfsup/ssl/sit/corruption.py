"""SiT v1's rotations and image corruptions (docs/methods/sit.md), on whole batches.

v1 corrupts one image at a time in a Python loop on the GPU. Here every step draws its random
numbers for the whole batch at once and paints with masks:
  a. grayscale one rectangle (the channel mean),
  b. Gaussian-blur another rectangle (per image: odd kernel 3..15, σ ~ U(0.1, 5.1)),
  c. N(0, 1) noise blocks until a pixel budget U(0, 0.3)·H·W is spent,
  d. with probability (B-1)/B, blocks copied from the co-located pixels of another image of the
     batch, same block procedure.
Blocks of one image in (c) and (d) only ever overwrite with i.i.d. noise or with one source image, so
the order in which they are pasted does not matter and their union is painted once. v1 copies in
(d) from an image that the loop may or may not have corrupted yet (depending on its index); here the
source has had (a)-(c) and not (d). Blur in (b) is computed on the whole image and kept inside the
rectangle, so pixels near the rectangle's edge average with the pixels just outside it (v1 blurs
the cut-out rectangle with reflected borders).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROTATIONS = 4
MAX_KERNEL = 15
CANDIDATE_BLOCKS = 64  # blocks drawn per image per round; more rounds only when some budget is not spent


def rotate_v1(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """v1's convention: label 1 = 90° clockwise, 2 = 180°, 3 = 90° counter-clockwise, i.e.
    `torch.rot90(x, -label)` over (H, W). Square images only (one tensor for the batch)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotations need square images, got {tuple(images.shape[-2:])}")
    out = images.clone()
    for k in range(1, ROTATIONS):
        chosen = labels == k
        if chosen.any():
            out[chosen] = torch.rot90(images[chosen], -k, dims=(-2, -1))
    return out


def random_rotations(images: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent uniform rotation per image -> (rotated copy, labels)."""
    labels = _randint(0, ROTATIONS, (images.shape[0],), generator, images.device)
    return rotate_v1(images, labels), labels


# ---- random numbers for the whole batch -------------------------------------------------------


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    # drawn where the generator lives, so that a seeded CPU generator gives the same images on any device
    return generator.device if generator is not None else device


def _uniform(shape, generator, device, low=0.0, high=1.0) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=_draw_device(generator, device))
    return (low + (high - low) * u).to(device)


def _randint(low, high, shape, generator, device) -> torch.Tensor:
    """Integers in [low, high); `low` and `high` may be tensors broadcasting to `shape`."""
    u = torch.rand(shape, generator=generator, device=_draw_device(generator, device)).to(device)
    low = torch.as_tensor(low, device=device)
    high = torch.as_tensor(high, device=device)
    return (low + (u * (high - low)).floor()).long().minimum(high - 1)


def random_rectangles(batch: int, height: int, width: int, shape=(), *, min_frac: float = 0.05,
                      max_frac: float | None = None, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """(top, bottom, left, right) [batch, *shape] as v1 draws them: the origin uniform with at least
    `min_frac` of the side left after it, a side from `min_frac` up to `max_frac` (None: the whole
    side, exclusive), clipped at the border."""
    device = torch.device(device)
    out = []
    for side in (height, width):
        low = max(1, int(min_frac * side))
        high = max(low + 1, int(max_frac * side) if max_frac is not None else side)
        start = _randint(0, max(1, side - low), (batch, *shape), generator, device)
        length = _randint(low, high, (batch, *shape), generator, device)
        out += [start, (start + length).clamp(max=side)]
    return tuple(out)


def rectangle_mask(top, bottom, left, right, height: int, width: int) -> torch.Tensor:
    """[B] corners -> a bool mask [B, 1, H, W]."""
    rows = torch.arange(height, device=top.device)
    cols = torch.arange(width, device=top.device)
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def block_mask(batch: int, height: int, width: int, max_budget: float, *, min_frac: float = 0.05,
               max_frac: float = 0.25, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """v1's block procedure for every image at once: draw a budget U(0, max_budget)·H·W, then paste
    blocks (sides in [min_frac, max_frac) of the image side, clipped) while the summed area of the
    blocks pasted so far (overlaps counted twice, as v1 does) is below the budget. -> bool [B, 1, H, W]."""
    device = torch.device(device)
    budget = _uniform((batch,), generator, device, 0.0, max_budget) * (height * width)
    spent = torch.zeros(batch, device=device)
    mask = torch.zeros(batch, height, width, device=device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    while bool((spent < budget).any()):
        top, bottom, left, right = random_rectangles(batch, height, width, (CANDIDATE_BLOCKS,), min_frac=min_frac,
                                                     max_frac=max_frac, generator=generator, device=device)
        area = ((bottom - top) * (right - left)).float()
        before = spent[:, None] + area.cumsum(1) - area  # area pasted before each candidate
        pasted = (before < budget[:, None]).float()  # [B, M]
        spent = spent + (area * pasted).sum(1)
        in_rows = ((rows >= top[..., None]) & (rows < bottom[..., None])).float() * pasted[..., None]  # [B, M, H]
        in_cols = ((cols >= left[..., None]) & (cols < right[..., None])).float()  # [B, M, W]
        mask = mask + in_rows.transpose(1, 2) @ in_cols  # how many pasted blocks cover each pixel
    return (mask > 0)[:, None]


def gaussian_kernels(sizes: torch.Tensor, sigmas: torch.Tensor, max_size: int = MAX_KERNEL) -> torch.Tensor:
    """One normalised 1-D Gaussian per image [B, max_size], centred, zero outside its own odd size."""
    offsets = torch.arange(max_size, device=sigmas.device, dtype=torch.float32) - max_size // 2
    weights = torch.exp(-offsets**2 / (2 * sigmas[:, None].float() ** 2))
    weights = weights * (offsets.abs() <= (sizes[:, None] // 2)).float()
    return weights / weights.sum(1, keepdim=True)


def blur_per_image(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur of image b with kernels[b] (reflected borders), in one grouped convolution."""
    b, c, h, w = images.shape
    k = kernels.shape[1]
    pad = min(k // 2, h - 1, w - 1)
    kernels = kernels[:, k // 2 - pad: k // 2 + pad + 1]  # zero taps beyond what a tiny image can reflect
    x = F.pad(images.reshape(1, b * c, h, w).float(), (pad, pad, pad, pad), mode="reflect")
    weight = kernels.to(x.dtype).repeat_interleave(c, dim=0)  # [B C, K]
    x = F.conv2d(x, weight[:, None, :, None], groups=b * c)
    x = F.conv2d(x, weight[:, None, None, :], groups=b * c)
    return x.reshape(b, c, h, w).to(images.dtype)


def corrupt(images: torch.Tensor, *, noise_budget: float = 0.3, replace_budget: float = 0.3, min_frac: float = 0.05,
            max_block_frac: float = 0.25, max_kernel: int = MAX_KERNEL, sigma_range=(0.1, 5.1),
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A corrupted copy of `images` [B, C, H, W] (normalised) -> (corrupted, masks), where masks
    holds the bool [B, 1, H, W] region of each step: gray, blur, noise, replace. `images` is not
    modified."""
    # outside autocast: a bf16 blur would round the untouched-looking pixels of the blurred rectangle
    with torch.autocast(device_type=images.device.type, enabled=False):
        return _corrupt(images, noise_budget, replace_budget, min_frac, max_block_frac, max_kernel, sigma_range,
                        generator)


def _corrupt(images, noise_budget, replace_budget, min_frac, max_block_frac, max_kernel, sigma_range, generator):
    b, c, h, w = images.shape
    device = images.device
    kw = {"generator": generator, "device": device}
    x = images.detach().clone()
    masks = {}
    # a. grayscale rectangle
    masks["gray"] = rectangle_mask(*random_rectangles(b, h, w, min_frac=min_frac, **kw), h, w)
    x = torch.where(masks["gray"], x.mean(1, keepdim=True).expand_as(x), x)
    # b. blur another rectangle, each image with its own kernel
    masks["blur"] = rectangle_mask(*random_rectangles(b, h, w, min_frac=min_frac, **kw), h, w)
    sizes = 2 * _randint(1, max_kernel // 2 + 1, (b,), generator, device) + 1  # 3, 5, ..., max_kernel
    sigmas = _uniform((b,), generator, device, *sigma_range)
    x = torch.where(masks["blur"], blur_per_image(x, gaussian_kernels(sizes, sigmas, max_kernel)), x)
    # c. noise blocks
    masks["noise"] = block_mask(b, h, w, noise_budget, min_frac=min_frac, max_frac=max_block_frac, **kw)
    noise = torch.randn(x.shape, generator=generator, device=_draw_device(generator, device)).to(device, x.dtype)
    x = torch.where(masks["noise"], noise, x)
    # d. blocks from another image of the batch (none when the draw picks the image itself)
    source = _randint(0, b, (b,), generator, device)
    other = (source != torch.arange(b, device=device))[:, None, None, None]
    masks["replace"] = block_mask(b, h, w, replace_budget, min_frac=min_frac, max_frac=max_block_frac, **kw) & other
    x = torch.where(masks["replace"], x[source], x)
    return x, masks
