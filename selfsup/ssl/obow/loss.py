"""OBoW's maths as pure functions (docs/methods/obow.md, steps 4-8 and the loss).

Teacher side: squared L2 distances of every feature-map location to every visual word, soft codes
`softmax(-(inv_delta / mu) d)`, max-pooled over locations and L1-normalised into a bag of words.
Student side: KL(target || softmax(logits)) with "batchmean" reduction, averaged over levels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.ssl.ema import cosine_momentum as teacher_momentum  # noqa: F401  (α(i), OBoW's teacher schedule)


def squared_distances(fmap: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """`||F[b,:,u]||^2 + ||V_k||^2 - 2 <F[b,:,u], V_k>` for fmap [B, C, h, w], words [K, C] -> [B, K, h, w].
    The cross term is a 1x1 convolution (weight -2V, bias ||V||^2): no [B, K, C, h, w] intermediate."""
    words = words.to(fmap.dtype)
    cross = F.conv2d(fmap, (-2.0 * words)[:, :, None, None], bias=words.pow(2).sum(1))
    return cross + fmap.pow(2).sum(1, keepdim=True)


def soft_codes(distances: torch.Tensor, inv_delta: float, scale: torch.Tensor | float) -> torch.Tensor:
    """Soft assignment of every location to the words: softmax over K of `-(inv_delta / scale) d`."""
    return F.softmax(distances * (-inv_delta / scale), dim=1)


def bag_of_words(codes: torch.Tensor) -> torch.Tensor:
    """Codes [B, K, h, w] -> BoW [B, K]: max over locations, then each row L1-normalised (sums to 1)."""
    bow = codes.flatten(2).amax(2)
    return bow / bow.sum(1, keepdim=True).clamp_min(1e-12)


def mean_min_distance(distances: torch.Tensor) -> torch.Tensor:
    """The batch statistic the running scale `mu` tracks: mean over images and locations of min_k d."""
    return distances.amin(1).mean()


def update_scale(scale: torch.Tensor, batch_mean_min: torch.Tensor, momentum: float = 0.99) -> torch.Tensor:
    """`mu <- momentum mu + (1 - momentum) batch_mean_min` (in place on the buffer; returned)."""
    return scale.mul_(momentum).add_(batch_mean_min.to(scale.dtype), alpha=1.0 - momentum)


def local_average(fmap: torch.Tensor, kernel: int) -> torch.Tensor:
    """The queue's local averaging: `kernel` x `kernel` average pool, stride 1, no padding (the kernel
    shrinks to the map when the map is smaller, as for the last stage of a small net at 32 px)."""
    k = max(1, min(kernel, fmap.shape[-2], fmap.shape[-1]))
    return F.avg_pool2d(fmap, kernel_size=k, stride=1) if k > 1 else fmap


def crop_border(fmap: torch.Tensor, border: int) -> torch.Tensor:
    return fmap[:, :, border:-border, border:-border] if border > 0 else fmap


def bow_targets(fmap: torch.Tensor, words: torch.Tensor, inv_delta: float, scale: torch.Tensor | float,
                border: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(BoW [B, K], codes [B, K, h', w']) of a teacher map against `words` at running scale `scale`."""
    codes = soft_codes(squared_distances(crop_border(fmap, border), words), inv_delta, scale)
    return bag_of_words(codes), codes


def bow_kl(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(targets || softmax(logits)), summed over words and averaged over rows ("batchmean").
    0 log 0 counts as 0 (targets may have exact zeros)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    t = targets.float()
    return (torch.xlogy(t, t) - t * log_p).sum(1).mean()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def entropy(targets: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(targets, targets).sum(1).mean()


def repeat_per_crop(targets: torch.Tensor, crops_per_image: int) -> torch.Tensor:
    """[B, K] -> [B * n, K] image-major (img0 crop0, img0 crop1, img1 crop0, ...), the order in which
    a [B, n, C, H, W] crop tensor is flattened."""
    return targets.repeat_interleave(crops_per_image, dim=0)


def obow_loss(logits_per_group: list[list[torch.Tensor]], targets_per_level: list[torch.Tensor],
              crops_per_group: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Σ_groups mean_levels KL(t_l || softmax(z_{g,l})). `logits_per_group[g][l]` is [B * n_g, K_l].
    Returns (total, per-level loss summed over groups)."""
    levels = len(targets_per_level)
    per_level = [targets_per_level[0].new_zeros(()) for _ in range(levels)]
    for logits, n in zip(logits_per_group, crops_per_group, strict=True):
        for l in range(levels):
            per_level[l] = per_level[l] + bow_kl(logits[l], repeat_per_crop(targets_per_level[l], n))
    return sum(per_level) / levels, per_level


def code_statistics(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, usage) of a batch of codes [B, K, h, w]: perplexity = exp(entropy) of the mean soft
    assignment (K when all words are used evenly, 1 when one word takes everything); usage = fraction
    of words that are the nearest word of at least one location."""
    k = codes.shape[1]
    mean = codes.transpose(0, 1).flatten(1).mean(1)
    perplexity = torch.exp(-torch.xlogy(mean, mean).sum())
    nearest = codes.argmax(1).flatten()
    usage = torch.zeros(k, device=codes.device).index_fill_(0, nearest, 1.0).mean()
    return perplexity, usage
