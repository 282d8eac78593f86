"""SiT v1's three losses and their learned uncertainty weighting (docs/methods/sit.md), as pure
functions. Every term is computed in float32: under bf16 autocast a 2B x 2B cosine-similarity
matrix divided by τ = 0.5 and a mean over millions of pixel differences lose digits that matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TASKS = ("rotation", "contrastive", "reconstruction")
# a_t in exp(-a_t s_t) L_t + s_t / 2 (the July 2021 form): 1 for the two token losses, 0.5 for L1
TASK_SCALES = (1.0, 1.0, 0.5)


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the 2B rotated views."""
    return F.cross_entropy(logits.float(), labels)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent between row i of `z1` and row i of `z2` (two views of image i), over the 2B rows of
    the actual batch: cosine similarities / τ, each anchor's denominator summing over the 2B - 1
    other rows (its positive included), averaged over the 2B anchors. The masks come from the
    tensors' own size, so a short last batch is handled (v1 sized them from the configured batch)."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent needs two [B, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    self_pairs = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, positives)


def reconstruction_loss(reconstruction: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over every pixel of every view (corrupted or not), against the clean
    rotated views in normalised space."""
    if reconstruction.shape != clean.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} does not match the target {tuple(clean.shape)}")
    return F.l1_loss(reconstruction.float(), clean.float())


def task_factors(s: torch.Tensor, scales=TASK_SCALES) -> torch.Tensor:
    """exp(-a_t s_t): the weight each task loss gets (e^-1 and e^-0.5 at s = 1)."""
    return torch.exp(-torch.as_tensor(scales, dtype=torch.float32, device=s.device) * s.float())


def uncertainty_weighted(losses: torch.Tensor, s: torch.Tensor, scales=TASK_SCALES) -> torch.Tensor:
    """Σ_t exp(-a_t s_t) L_t + s_t / 2, for task losses `losses` [T] and learned scalars `s` [T].
    For a fixed L_t the minimum over s_t is at s_t* = ln(2 a_t L_t) / a_t."""
    if losses.shape != s.shape:
        raise ValueError(f"{losses.shape[0]} task losses but {s.shape[0]} learned weights")
    return (task_factors(s, scales) * losses.float() + 0.5 * s.float()).sum()


def optimal_s(loss: float, scale: float) -> float:
    """Where d/ds [exp(-a s) L + s/2] = 0."""
    import math

    return math.log(2 * scale * loss) / scale


def sit_loss(rotation_logits: torch.Tensor, rotation_labels: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
             reconstruction: torch.Tensor, clean: torch.Tensor, s: torch.Tensor, *, temperature: float = 0.5,
             scales=TASK_SCALES) -> dict[str, torch.Tensor]:
    """The v1 objective and its terms: rotation CE over both views, NT-Xent between the views'
    contrastive outputs, L1 reconstruction of both clean views, weighted by the learned `s`."""
    with torch.autocast(device_type=clean.device.type, enabled=False):
        terms = torch.stack([
            rotation_loss(rotation_logits, rotation_labels),
            nt_xent(z1, z2, temperature),
            reconstruction_loss(reconstruction, clean),
        ])
        loss = uncertainty_weighted(terms, s, scales)
    return {"loss": loss, **{name: terms[i] for i, name in enumerate(TASKS)}}
