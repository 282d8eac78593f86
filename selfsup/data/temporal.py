"""Temporal samples from ordered episode shards (selfsup.data.atari), for TOV-VICReg.

The stream is: shard samples (episode chunks, shuffled a little) -> `expand` (decode a chunk, one
reference (chunk, t) per stack start it owns) -> shuffle buffer of references -> the view (assemble
o_t, o_{t-3}, o_{t+3} with the starts clamped to the episode's valid starts, then augment). A chunk
carries its episode's context frames, so no sample ever reads a frame of another episode.

Views (the official code's; docs/methods/tov_vicreg.md) on the uint8 [3, 84, 84] stacks whose channels
are the 3 frames (so colour transforms act across time, as in the original); crops and flips per
sample (torchvision.transforms.v2), the colour parts batched with per-image draws (TemporalView):
- A1 (x = o_t): RandomResizedCrop(84, scale 0.08-1), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
  RandomGrayscale p=0.2, GaussianBlur(7, sigma 0.1-0.2) p=1.0, then [0, 1] floats (no normalisation);
- A2 (y = o_t): the same with blur p=0.1 and RandomSolarize(threshold 120) p=0.2;
- A3 (z = o_{t-3}, w = o_{t+3}): ColorJitter p=0.8 + RandomGrayscale p=0.2 only.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torchvision.transforms import v2

from selfsup.data.atari import Chunk, decode_chunk
from selfsup.data.contract import ViewDefaults
from selfsup.data.views import Photometric

log = logging.getLogger(__name__)


def _count(skipped) -> None:
    if skipped is not None:
        with skipped.get_lock():
            skipped.value += 1


CHUNK_POOL = 16  # decoded chunks that the references are drawn from at once (about 2 MB each)


def _decoded(samples: Iterator[dict], skipped) -> Iterator[Chunk]:
    for sample in samples:
        try:
            yield decode_chunk(sample)
        except Exception as err:  # a corrupt sample must not end a long run
            _count(skipped)
            log.warning("skipping chunk %s from %s: %s", sample.get("__key__", "?"), sample.get("__url__", "?"), err)


def expand_chunks(samples: Iterator[dict], skipped=None, pool: int = CHUNK_POOL) -> Iterator[tuple[Chunk, int]]:
    """Raw shard samples -> (chunk, t) for every stack start t of every chunk, each once. The
    references come from `pool` chunks at a time, each next one from a randomly chosen chunk (seeded
    by the first chunk's key, so a stream repeats itself): the shuffle buffer after this stage then
    mixes many episodes and games, where one chunk's 256 starts in a row would fill a good part of it.
    A chunk that cannot be decoded is skipped and counted."""
    chunks = _decoded(samples, skipped)
    open_: list[tuple[Chunk, Iterator[int]]] = []
    rng = None
    while True:
        while len(open_) < pool and (chunk := next(chunks, None)) is not None:
            open_.append((chunk, iter(chunk.starts())))
            rng = rng or random.Random(chunk.key)
        if not open_:
            return
        i = rng.randrange(len(open_))
        chunk, starts = open_[i]
        t = next(starts, None)
        if t is None:
            open_.pop(i)
            continue
        yield chunk, t


def triplet(chunk: Chunk, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]:
    """(o_t, o_{t-3}, o_{t+3}) as uint8 [3, 84, 84] arrays, and their starts in the episode."""
    starts = chunk.triplet_starts(t)
    return (*(chunk.stack(s) for s in starts), starts)


def tov_photometric() -> tuple[Photometric, Photometric, Photometric]:
    """The colour parts of A1, A2 and A3 (their flips belong to the geometry, with the crop)."""
    jitter = dict(jitter=0.8, jitter_strength=(0.4, 0.4, 0.2, 0.1), gray=0.2, flip=0.0)
    blur = dict(blur_kernel=7, blur_sigma=(0.1, 0.2))
    return (Photometric(**jitter, blur=1.0, **blur),
            Photometric(**jitter, blur=0.1, **blur, solarize=0.2, solarize_threshold=120),
            Photometric(**jitter))


def tov_geometry(image_size: int = 84, crop_scale=(0.08, 1.0), flip: float = 0.5) -> tuple[Callable, Callable]:
    """(A1/A2's crop and flip, A3's resize) on uint8 [3, 84, 84] stacks."""
    crop = v2.Compose([v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
                       *([v2.RandomHorizontalFlip(flip)] if flip else [])])
    resize = v2.Resize(image_size, antialias=True) if image_size != 84 else v2.Identity()
    return crop, resize


def tov_transforms(image_size: int = 84, crop_scale=(0.08, 1.0), flip: float = 0.5) -> tuple[Callable, Callable, Callable]:
    """A1, A2, A3 for one uint8 stack [3, H, W] -> float [3, image_size, image_size] in [0, 1], with
    torchvision's per-image transforms: the reference the batched view is held to (tests)."""
    to_float = v2.ToDtype(torch.float32, scale=True)
    crop, resize = tov_geometry(image_size, crop_scale, flip)
    p1, p2, p3 = tov_photometric()
    return (v2.Compose([crop, *p1.transforms(), to_float]), v2.Compose([crop, *p2.transforms(), to_float]),
            v2.Compose([resize, *p3.transforms(), to_float]))


VIEWS = ("x", "y", "z", "w")


class TemporalView(ViewDefaults):
    """The training view of TOV-VICReg: a (chunk, t) reference -> {x, y, z, w} (+ where they came from:
    episode, starts; and `distinct`: whether o_{t-3} and o_{t+3} differ, since the order of two equal
    stacks cannot be told). `augment=False` gives the raw stacks as [0, 1] floats (tests, pictures).

    A two-stage `TrainView` (selfsup.data.contract) over stored episode chunks: per sample in the
    workers, only the crops and flips (uint8); the colour augmentations run on whole batches with
    per-image draws (selfsup.data.views.batched_photometric) in the workers, or on the GPU with
    data.gpu_augment. Batched, the four stacks of a sample cost 0.56 of the CPU time of torchvision's
    per-image transforms (BENCHMARKS.md)."""

    two_stage = True

    def __init__(self, image_size: int = 84, crop_scale=(0.08, 1.0), augment: bool = True, flip: float = 0.5,
                 on_device: bool = False):
        self.image_size, self.crop_scale, self.flip = image_size, tuple(crop_scale), flip
        self.augment = augment
        self.on_device = on_device  # the colour stage in `batch` (on the training device) rather than in the workers
        self.crop, self.resize = tov_geometry(image_size, crop_scale, flip)
        a1, a2, a3 = tov_photometric()
        self.photometric = {"x": a1, "y": a2, "z": a3, "w": a3}

    def with_gpu_augment(self, on: bool, in_workers: bool = False) -> TemporalView:
        return TemporalView(self.image_size, self.crop_scale, self.augment, self.flip, on_device=on and not in_workers)

    def sample(self, ref: tuple[Chunk, int]) -> dict:
        chunk, t = ref
        current, previous, following, starts = triplet(chunk, t)
        distinct = not np.array_equal(previous, following)
        cur, prev, nxt = (torch.from_numpy(np.ascontiguousarray(a)) for a in (current, previous, following))
        if self.augment:
            x, y, z, w = self.crop(cur), self.crop(cur), self.resize(prev), self.resize(nxt)
        else:
            x, y, z, w = cur, cur.clone(), prev, nxt
        return {"key": f"{chunk.key}@{t}", "label": -1, "x": x, "y": y, "z": z, "w": w,
                "episode": chunk.episode, "starts": torch.tensor(starts), "distinct": torch.tensor(distinct)}

    def _colour(self, batch: dict, back_to_uint8: bool) -> dict:
        for name in VIEWS:
            x = batch[name]
            floats = torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x).div_(255.0)
            y = self.photometric[name].batched(floats)
            if back_to_uint8:  # in place: x may live in shared memory already
                x.copy_(y.mul_(255.0).round_())
            else:
                batch[name] = y
        return batch

    def worker_batch(self, batch: dict) -> dict:
        return self._colour(batch, back_to_uint8=True) if self.augment and not self.on_device else batch

    def batch(self, batch: dict) -> dict:
        batch = dict(batch)
        if self.augment and self.on_device and batch["x"].dtype == torch.uint8:
            return self._colour(batch, back_to_uint8=False)
        for name in VIEWS:
            if batch[name].dtype == torch.uint8:
                batch[name] = batch[name].float().div_(255.0)
        return batch

    def __call__(self, ref: tuple[Chunk, int]) -> dict:
        one = self.worker_batch({k: v[None] if isinstance(v, torch.Tensor) else v for k, v in self.sample(ref).items()})
        return {k: v[0] if isinstance(v, torch.Tensor) else v for k, v in self.batch(one).items()}

    def stream_stages(self, skipped) -> tuple[Callable, Callable]:
        """(expand, decode) for selfsup.data.stream.make_stream."""
        return _Expand(skipped), _Decode(self, skipped)


class _Expand:
    def __init__(self, skipped):
        self.skipped = skipped

    def __call__(self, samples):
        return expand_chunks(samples, self.skipped)


class _Decode:
    def __init__(self, view: TemporalView, skipped):
        self.view, self.skipped = view, skipped

    def __call__(self, ref):
        try:
            return self.view.sample(ref)
        except Exception as err:
            _count(self.skipped)
            log.warning("skipping temporal sample %s@%s: %s", ref[0].key, ref[1], err)
            return None
