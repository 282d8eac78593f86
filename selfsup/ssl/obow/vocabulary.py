"""One level's visual-word vocabulary: a queue of teacher feature vectors, kept as registered buffers
(words, write pointer, running distance scale) so that checkpoints save and restore it exactly."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.core.errors import UserError
from selfsup.ssl.obow.loss import bow_targets, crop_border, local_average, mean_min_distance, update_scale


def sample_locations(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """One random location index (row-major over height x width) per image, drawn from `generator`."""
    return torch.randint(height * width, (batch,), generator=generator)


def pick_locations(fmap: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """fmap [B, C, h, w], index [B] (flattened h x w) -> [B, C]: the vector at each image's location."""
    flat = fmap.flatten(2)
    return flat[torch.arange(flat.shape[0], device=flat.device), :, index.to(flat.device)]


class Vocabulary(nn.Module):
    """`words` [K, C] (init randn clamped at 0), `pointer` (next row to overwrite), `scale` (μ, init 0.5)."""

    def __init__(self, num_words: int, channels: int, inv_delta: float, border: int = 1, local_kernel: int = 3,
                 scale_momentum: float = 0.99):
        super().__init__()
        self.num_words, self.channels = num_words, channels
        self.inv_delta, self.border, self.local_kernel, self.scale_momentum = inv_delta, border, local_kernel, scale_momentum
        self.register_buffer("words", torch.randn(num_words, channels).clamp(min=0))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.full((), 0.5))

    def targets(self, fmap: torch.Tensor, words: torch.Tensor | None = None, *, update_scale_with=None):
        """(BoW [B, K], codes, distances scale used). In training, μ is first updated with this batch's
        mean minimum distance (`update_scale_with` reduces it across ranks, e.g. a mean of all-gathered
        values), then the codes are computed with the updated μ."""
        from selfsup.ssl.obow.loss import squared_distances

        words = self.words if words is None else words
        if self.training:
            with torch.no_grad():
                batch_min = mean_min_distance(squared_distances(crop_border(fmap, self.border), words))
                if update_scale_with is not None:
                    batch_min = update_scale_with(batch_min)
                update_scale(self.scale, batch_min, self.scale_momentum)
        bow, codes = bow_targets(fmap, words, self.inv_delta, self.scale, self.border)
        return bow, codes

    def local_vectors(self, fmap: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One locally averaged vector per image, at a random location of the border-cropped map."""
        pooled = local_average(crop_border(fmap, self.border), self.local_kernel)
        index = sample_locations(pooled.shape[0], pooled.shape[-2], pooled.shape[-1], generator)
        return pick_locations(pooled, index)

    @torch.no_grad()
    def enqueue(self, vectors: torch.Tensor) -> None:
        """Write `vectors` [N, C] (the global batch, gathered across ranks) at the pointer; advance it mod K."""
        n = vectors.shape[0]
        if self.num_words % n != 0:
            raise UserError(f"obow: the vocabulary size ({self.num_words}) must be a multiple of the global batch "
                            f"({n}): set method.num_words or data.batch_size")
        start = int(self.pointer)
        self.words[start:start + n] = vectors.to(self.words.dtype)
        self.pointer.fill_((start + n) % self.num_words)

    def extra_repr(self) -> str:
        return f"num_words={self.num_words}, channels={self.channels}, inv_delta={self.inv_delta}, border={self.border}"
