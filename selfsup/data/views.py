"""Views (augmentations), from torchvision.transforms.v2, in two stages.

A view is a `View`: a dict of named branches (`image`, `crops`, `patches`, ...), each a geometric
part (crops and resizes to a fixed size) and a photometric part (flip, colour jitter, grayscale, blur).

- `view.sample(image)` runs in the DataLoader workers, per image, on uint8 tensors: the geometry, and
  (unless `gpu_augment`) the photometric part with torchvision.transforms.v2. It returns uint8
  tensors: a quarter of the bytes of floats to collate, to pass between processes and to copy to
  the GPU.
- `view.batch(batch)` runs on whole batches on the training device (the shard DataModule calls it
  in `on_after_batch_transfer`): uint8 -> float, with `gpu_augment` the photometric part batched
  (per-image random parameters, `batched_photometric`), normalisation, and any per-image step that
  needs the normalised image (OBoW's patch grid).
- `view(image)` does both for one image and returns normalised float tensors: what the probe's
  reader, tests and pictures use.

`gpu_augment=true` (data.gpu_augment) leaves the CPU workers only decoding and cropping; the colour
augmentations then cost the GPU a few milliseconds per batch instead of the workers milliseconds
per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from selfsup.data.contract import ViewDefaults


def to_float(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def as_uint8_image(image) -> torch.Tensor:
    """A PIL image or a tensor -> uint8 [3, H, W]."""
    if isinstance(image, torch.Tensor):
        x = image
    else:
        from torchvision.transforms.v2 import functional as TF

        x = TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
    if x.ndim == 2:
        x = x[None]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x if x.dtype == torch.uint8 else x.clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Photometric:
    """Per-image random photometric augmentation, in this order: colour jitter (probability `jitter`,
    strengths brightness/contrast/saturation/hue), grayscale (`gray`), Gaussian blur (`blur`, kernel
    size, sigma range), solarize (`solarize`, threshold on the uint8 scale), horizontal flip (`flip`).
    Flip and blur commute with the rest, so the order of the originals (flip first or last) gives the
    same distribution."""

    flip: float = 0.5
    jitter: float = 0.0
    jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    gray: float = 0.0
    blur: float = 0.0
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0
    solarize_threshold: int = 128  # on the uint8 scale, as v2.RandomSolarize takes it for uint8 images

    def transforms(self) -> list:
        """The same augmentation as torchvision.transforms.v2 transforms, for one image."""
        out = []
        if self.jitter:
            out.append(v2.RandomApply([v2.ColorJitter(*self.jitter_strength)], p=self.jitter))
        if self.gray:
            out.append(v2.RandomGrayscale(self.gray))
        if self.blur:
            out.append(v2.RandomApply([SeparableGaussianBlur(self.blur_kernel, self.blur_sigma)], p=self.blur))
        if self.solarize:
            out.append(v2.RandomSolarize(self.solarize_threshold, p=self.solarize))
        if self.flip:
            out.append(v2.RandomHorizontalFlip(self.flip))
        return out

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """The same augmentation on a float batch [N, 3, H, W] in [0, 1], each image with its own
        random draws (on x's device)."""
        return batched_photometric(x, self)


# ---- batched photometric ops, per-image parameters (each matches torchvision's op for one image) ----
def _rand(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision's rgb_to_grayscale: [N, 3, H, W] -> [N, 1, H, W]."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = ratio.view(-1, 1, 1, 1)
    return (ratio * a + (1.0 - ratio) * b).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Shift the hue by `factor` (in turns, [-0.5, 0.5]) per image: RGB -> HSV as torchvision does,
    then back with the closed form c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6 for
    n = 5, 3, 1 (R, G, B), which needs no 6-way selection (and no [N, 3, 6, H, W] temporary)."""
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    not_r = maxc != r
    is_g = maxc == g
    h = (bc - gc) * ~not_r + (2.0 + rc - bc) * (is_g & not_r) + (4.0 + gc - rc) * (~is_g & not_r)
    h6 = torch.remainder(torch.fmod(h / 6.0 + 1.0, 1.0) + factor.view(-1, 1, 1), 1.0) * 6.0
    vs = maxc * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, 1).clamp_(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma, reflect padding (as torchvision)."""
    n, c, h, w = x.shape
    half = (kernel - 1) * 0.5
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    k = k / k.sum(1, keepdim=True)  # [N, kernel]
    k = k.repeat_interleave(c, 0)  # one kernel per (image, channel)
    y = F.pad(x.reshape(1, n * c, h, w), (kernel // 2, kernel // 2, kernel // 2, kernel // 2), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, h, w)


class SeparableGaussianBlur(torch.nn.Module):
    """v2.GaussianBlur (sigma ~ U(sigma range), the same kernel, reflect padding, uint8 rounded) as two
    1-D passes: torchvision convolves with the full k x k kernel, 289 taps per pixel for OBoW's k = 17
    against 34 here (10x faster on a CPU; tests/test_data.py holds the two equal)."""

    def __init__(self, kernel: int, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        self.kernel, self.sigma = kernel, tuple(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):  # a PIL image: torchvision's own
            return v2.GaussianBlur(self.kernel, self.sigma)(x)
        sigma = _rand(1, *self.sigma, "cpu").to(x.device)  # drawn as v2.GaussianBlur draws it
        shape, fp = x.shape, x.dtype.is_floating_point
        flat = (x if fp else x.float()).reshape(-1, *shape[-3:])
        y = gaussian_blur(flat, self.kernel, sigma.expand(flat.shape[0])).reshape(shape)
        return y if fp else y.round_().to(x.dtype)


def batched_photometric(x: torch.Tensor, spec: Photometric) -> torch.Tensor:
    """`spec` applied to every image of a float batch [N, 3, H, W] in [0, 1] with its own draws. The
    four jitter ops run in one random order per batch (torchvision draws one per image)."""
    n, device = x.shape[0], x.device

    def chosen(p: float) -> torch.Tensor:
        return torch.rand(n, device=device) < p

    if spec.jitter:
        on = chosen(spec.jitter).view(-1, 1, 1, 1)
        bri, con, sat, hue = spec.jitter_strength
        jittered = x
        for op in torch.randperm(4).tolist():
            if op == 0 and bri:
                jittered = adjust_brightness(jittered, _rand(n, max(0.0, 1 - bri), 1 + bri, device))
            elif op == 1 and con:
                jittered = adjust_contrast(jittered, _rand(n, max(0.0, 1 - con), 1 + con, device))
            elif op == 2 and sat:
                jittered = adjust_saturation(jittered, _rand(n, max(0.0, 1 - sat), 1 + sat, device))
            elif op == 3 and hue:
                jittered = adjust_hue(jittered, _rand(n, -hue, hue, device))
        x = torch.where(on, jittered, x)
    if spec.gray:
        x = torch.where(chosen(spec.gray).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    if spec.blur:
        on = chosen(spec.blur)
        if on.any():
            idx = on.nonzero().flatten()
            sigma = _rand(len(idx), *spec.blur_sigma, device)
            x = x.clone()
            x[idx] = gaussian_blur(x[idx], spec.blur_kernel, sigma)
    if spec.solarize:
        # torchvision inverts a uint8 pixel at or above the threshold; the floats here are uint8 / 255
        high = x >= (spec.solarize_threshold - 0.5) / 255.0
        x = torch.where(chosen(spec.solarize).view(-1, 1, 1, 1) & high, 1.0 - x, x)
    if spec.flip:
        x = torch.where(chosen(spec.flip).view(-1, 1, 1, 1), x.flip(-1), x)
    return x


# ---- views ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Branch:
    """One output of a view: `geometry` (uint8 [3, H, W] -> uint8 [3, h, w], per image), then
    `photometric`; `copies` > 0 stacks that many independent draws ([copies, 3, h, w]); `after` maps
    the normalised float image (per image) to the final tensor."""

    geometry: Callable
    photometric: Photometric | None = None
    copies: int = 0
    after: Callable | None = None


@contextmanager
def _one_cpu_thread(device):
    """On a CPU, the batch stage runs in one thread: it is memory-bound, and a parallel region would
    leave OpenMP threads of the training process spinning on the cores the workers decode on (with
    two cores, a third of the pipeline's throughput; BENCHMARKS.md)."""
    threads = torch.get_num_threads()
    if device is None or device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class View(ViewDefaults):
    """A method's view: named branches, normalisation, and where the photometric part runs:
    per image in the workers (torchvision.transforms.v2; the default), or with `gpu_augment` batched
    (per-image random parameters) on the training device, or, where that device is a CPU, batched in
    the workers on each collated batch (`in_workers`), which leaves the training process free.
    A two-stage `TrainView` (selfsup.data.contract)."""

    two_stage = True

    def __init__(self, branches: dict[str, Branch], mean: Sequence[float], std: Sequence[float],
                 gpu_augment: bool = False, in_workers: bool = False):
        self.branches = branches
        self.mean, self.std = list(mean), list(std)
        self.gpu_augment = gpu_augment
        self.in_workers = gpu_augment and in_workers
        self._cpu_photometric = {name: v2.Compose(b.photometric.transforms())
                                 for name, b in branches.items() if b.photometric is not None}

    def with_gpu_augment(self, on: bool, in_workers: bool = False) -> View:
        return View(self.branches, self.mean, self.std, gpu_augment=on, in_workers=in_workers)

    # -- per image, in the workers --
    def sample(self, image) -> dict:
        img = as_uint8_image(image)
        out = {}
        for name, branch in self.branches.items():
            photometric = None if self.gpu_augment else self._cpu_photometric.get(name)

            def one(branch=branch, photometric=photometric):
                x = branch.geometry(img)
                return photometric(x) if photometric is not None else x

            out[name] = torch.stack([one() for _ in range(branch.copies)]) if branch.copies else one()
        return out

    # -- per collated batch, in the workers (gpu_augment without a GPU) --
    def worker_batch(self, batch: dict) -> dict:
        if not self.in_workers:
            return batch
        for name, branch in self.branches.items():
            x = batch.get(name)
            if x is None or branch.photometric is None or x.dtype != torch.uint8:
                continue
            flat = x.reshape(-1, *x.shape[-3:])  # changed in place: x may live in shared memory already
            p = branch.photometric
            if p.jitter or p.gray or p.blur:  # through floats, as torchvision does for uint8 images
                y = replace(p, flip=0.0).batched(torch.empty(flat.shape, dtype=torch.float32).copy_(flat).div_(255.0))
                flat.copy_(y.mul_(255.0).round_())
            if p.flip:  # last, as in `batched_photometric`; on the uint8 images
                flip = (torch.rand(flat.shape[0]) < p.flip).view(-1, 1, 1, 1)
                flat.copy_(torch.where(flip, flat.flip(-1), flat))
        return batch

    # -- per batch, on the training device --
    def batch(self, batch: dict) -> dict:
        with _one_cpu_thread(next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), None)):
            return self._batch(batch)

    def _batch(self, batch: dict) -> dict:
        batch = dict(batch)
        for name, branch in self.branches.items():
            x = batch.get(name)
            if x is None or x.dtype.is_floating_point:  # already done (e.g. by `__call__`)
                continue
            shape = x.shape
            x = x.reshape(-1, *shape[-3:])
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            inv_std = 1.0 / torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            y = torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)  # one allocation, in place after
            if self.gpu_augment and not self.in_workers and branch.photometric is not None:
                y = branch.photometric.batched(y.div_(255.0)).sub_(mean).mul_(inv_std)
            else:
                y.sub_(mean * 255.0).mul_(inv_std / 255.0)
            x = y.reshape(shape)
            if branch.after is not None:
                x = torch.stack([branch.after(xi) for xi in x])
            batch[name] = x
        return batch

    def __call__(self, image) -> dict:
        one = self.worker_batch({k: v[None] for k, v in self.sample(image).items()})
        return {k: v[0] for k, v in self.batch(one).items()}


class ViewCollate:
    """The collation function of a two-stage view's stream: stack, then the view's worker batch stage."""

    def __init__(self, view: View, collate: Callable):
        self.view, self.collate = view, collate

    def __call__(self, samples: list[dict]) -> dict:
        return self.view.worker_batch(self.collate(samples))


# ---- the views methods ask for ------------------------------------------------------------------
def eval_view(image_size: int, mean: Sequence[float], std: Sequence[float]) -> View:
    """Resize (shorter side) + centre crop + normalise: what the probe and visualisations see."""
    geometry = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    return View({"image": Branch(geometry)}, mean, std)


def crop_flip_view(image_size: int, mean: Sequence[float], std: Sequence[float], padding_frac: float = 0.125,
                   gpu_augment: bool = False) -> View:
    """The CIFAR recipe (random crop with padding, horizontal flip), scaled to `image_size`."""
    geometry = v2.Compose([
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.RandomCrop(image_size, padding=max(1, round(image_size * padding_frac))),
    ])
    return View({"image": Branch(geometry, Photometric(flip=0.5))}, mean, std, gpu_augment)


def resized_crop_view(image_size: int, mean: Sequence[float], std: Sequence[float], scale=(0.08, 1.0),
                      gpu_augment: bool = False) -> View:
    """RandomResizedCrop + flip (the ImageNet recipe)."""
    geometry = v2.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True)
    return View({"image": Branch(geometry, Photometric(flip=0.5))}, mean, std, gpu_augment)


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def two_views(image_size: int, mean: Sequence[float], std: Sequence[float], scale=(0.08, 1.0),
              color_jitter: float = 0.4, interpolation: str = "bicubic") -> View:
    """Two independent draws of timm's training transform without AutoAugment, random erasing or
    mixup (SiT v1's views, docs/methods/sit.md): RandomResizedCrop, horizontal flip, ColorJitter with
    brightness = contrast = saturation = `color_jitter` (applied always, no hue), normalised."""
    if interpolation not in INTERPOLATIONS:
        from selfsup.core.errors import unknown_choice

        raise unknown_choice("interpolation", interpolation, INTERPOLATIONS)
    geometry = v2.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=v2.InterpolationMode(interpolation),
                                    antialias=True)
    photometric = Photometric(flip=0.5, jitter=1.0 if color_jitter else 0.0,
                              jitter_strength=(color_jitter, color_jitter, color_jitter, 0.0))
    branch = Branch(geometry, photometric)
    return View({"view1": branch, "view2": branch}, mean, std)


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


class _PatchGrid:
    def __init__(self, patch_size: int, jitter: int, keep: int):
        self.patch_size, self.jitter, self.keep = patch_size, jitter, keep

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return patch_grid(image, self.patch_size, self.jitter, self.keep)


def multi_crop_view(mean: Sequence[float], std: Sequence[float], *, teacher_size: int, teacher_resize: int,
                    num_crops: int, crop_size: int, crop_scale=(0.08, 0.6), num_patches: int = 5,
                    patch_image_size: int = 256, patch_size: int = 96, patch_jitter: int = 24,
                    patch_scale=(0.6, 1.0), blur_p: float = 0.5, gpu_augment: bool = False) -> View:
    """OBoW's views (docs/methods/obow.md, step 1): `image` the teacher's view (resize, centre crop, flip; no colour
    augmentation), `crops` [num_crops, C, crop_size, crop_size] (random resized crops with colour jitter,
    grayscale, blur, flip), `patches` [num_patches, C, patch_size, patch_size] (a random resized crop
    with colour jitter / grayscale / flip, normalised, then cut into a jittered 3x3 grid of which
    `num_patches` are kept)."""
    colour = {"jitter": 0.8, "gray": 0.2}
    branches = {
        "image": Branch(v2.Compose([v2.Resize(teacher_resize, antialias=True), v2.CenterCrop(teacher_size)]),
                        Photometric(flip=0.5)),
        "crops": Branch(v2.RandomResizedCrop(crop_size, scale=tuple(crop_scale), antialias=True),
                        Photometric(flip=0.5, **colour, blur=blur_p, blur_kernel=max(3, (crop_size // 10) | 1)),
                        copies=num_crops),
    }
    if num_patches:
        branches["patches"] = Branch(v2.RandomResizedCrop(patch_image_size, scale=tuple(patch_scale), antialias=True),
                                     Photometric(flip=0.5, **colour),
                                     after=_PatchGrid(patch_size, patch_jitter, num_patches))
    return View(branches, mean, std, gpu_augment)
