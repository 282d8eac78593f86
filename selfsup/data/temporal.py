"""Temporal samples from ordered episode shards (selfsup.data.atari), for TOV-VICReg.

The stream is: shard samples (episode chunks, shuffled a little) -> `expand` (decode a chunk, one
reference (chunk, t) per stack start it owns) -> shuffle buffer of references -> the view (assemble
o_t, o_{t-3}, o_{t+3} with the starts clamped to the episode's valid starts, then augment). A chunk
carries its episode's context frames, so no sample ever reads a frame of another episode.

Views (the official code's; docs/methods/tov_vicreg.md), torchvision.transforms.v2 on the uint8 [3, 84, 84] stacks whose
channels are the 3 frames (so colour transforms act across time, as in the original):
- A1 (x = o_t): RandomResizedCrop(84, scale 0.08-1), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
  RandomGrayscale p=0.2, GaussianBlur(7, sigma 0.1-0.2) p=1.0, then [0, 1] floats (no normalisation);
- A2 (y = o_t): the same with blur p=0.1 and RandomSolarize(threshold 120) p=0.2;
- A3 (z = o_{t-3}, w = o_{t+3}): ColorJitter p=0.8 + RandomGrayscale p=0.2 only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torchvision.transforms import v2

from selfsup.data.atari import Chunk, decode_chunk
from selfsup.data.contract import ViewDefaults

log = logging.getLogger(__name__)


def _count(skipped) -> None:
    if skipped is not None:
        with skipped.get_lock():
            skipped.value += 1


def expand_chunks(samples: Iterator[dict], skipped=None) -> Iterator[tuple[Chunk, int]]:
    """Raw shard samples -> (chunk, t) for every stack start t the chunk owns, in order. A chunk that
    cannot be decoded is skipped and counted."""
    for sample in samples:
        try:
            chunk = decode_chunk(sample)
        except Exception as err:  # a corrupt sample must not end a long run
            _count(skipped)
            log.warning("skipping chunk %s from %s: %s", sample.get("__key__", "?"), sample.get("__url__", "?"), err)
            continue
        for t in chunk.starts():
            yield chunk, t


def triplet(chunk: Chunk, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]:
    """(o_t, o_{t-3}, o_{t+3}) as uint8 [3, 84, 84] arrays, and their starts in the episode."""
    starts = chunk.triplet_starts(t)
    return (*(chunk.stack(s) for s in starts), starts)


def _jitter_gray() -> list:
    return [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]


def tov_transforms(image_size: int = 84, crop_scale=(0.08, 1.0), flip: float = 0.5) -> tuple[Callable, Callable, Callable]:
    """A1, A2, A3 on uint8 tensors [3, H, W] -> float [3, image_size, image_size] in [0, 1]."""
    to_float = v2.ToDtype(torch.float32, scale=True)
    crop = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
            *([v2.RandomHorizontalFlip(flip)] if flip else [])]
    blur = v2.GaussianBlur(7, sigma=(0.1, 0.2))
    a1 = v2.Compose([*crop, *_jitter_gray(), blur, to_float])
    a2 = v2.Compose([*crop, *_jitter_gray(), v2.RandomApply([blur], p=0.1), v2.RandomSolarize(120, p=0.2), to_float])
    a3 = v2.Compose([*_jitter_gray(), *([v2.Resize(image_size, antialias=True)] if image_size != 84 else []), to_float])
    return a1, a2, a3


class TemporalView(ViewDefaults):
    """The training view of TOV-VICReg: a (chunk, t) reference -> {x, y, z, w} (+ where they came
    from: episode, starts). `augment=False` gives the raw stacks as [0, 1] floats (tests, pictures).
    A one-stage `TrainView` (selfsup.data.contract) over stored episode chunks: the shard stream
    expands and decodes them through `stream_stages`."""

    def __init__(self, image_size: int = 84, crop_scale=(0.08, 1.0), augment: bool = True, flip: float = 0.5):
        self.augment = augment
        self.a1, self.a2, self.a3 = tov_transforms(image_size, crop_scale, flip)
        self.plain = v2.ToDtype(torch.float32, scale=True)

    def __call__(self, ref: tuple[Chunk, int]) -> dict:
        chunk, t = ref
        current, previous, following, starts = triplet(chunk, t)
        cur, prev, nxt = (torch.from_numpy(np.ascontiguousarray(a)) for a in (current, previous, following))
        if self.augment:
            x, y, z, w = self.a1(cur), self.a2(cur), self.a3(prev), self.a3(nxt)
        else:
            x, y, z, w = (self.plain(a) for a in (cur, cur, prev, nxt))
        return {"key": f"{chunk.key}@{t}", "label": -1, "x": x, "y": y, "z": z, "w": w,
                "episode": chunk.episode, "starts": torch.tensor(starts)}

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
            return self.view(ref)
        except Exception as err:
            _count(self.skipped)
            log.warning("skipping temporal sample %s@%s: %s", ref[0].key, ref[1], err)
            return None
