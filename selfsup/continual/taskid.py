"""Entropic task identification (specs §6(a), inference): for each test image, 16 inputs (6 clean
copies + 10 AutoAugment-CIFAR10 views); every learned task's network classifies all 16 in one batched
pass; the logits are averaged over the 16, softmaxed, and the task with the lowest entropy
`H = -sum p log(p + 1e-4)` wins (ties: the lowest task index)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

CLEAN_VIEWS = 6
AUGMENTED_VIEWS = 10
ENTROPY_EPS = 1e-4


def view_entropy(logits: torch.Tensor) -> torch.Tensor:
    """`logits` [B, V, C] -> [B]: entropy of the softmax of the view-averaged logits."""
    p = torch.softmax(logits.mean(dim=1), dim=-1)
    return -(p * torch.log(p + ENTROPY_EPS)).sum(dim=-1)


def identify_task(per_task_logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task τ, logits [B, V, C_τ] (class counts may differ) -> (task ids [B], entropies [T, B])."""
    entropies = torch.stack([view_entropy(z) for z in per_task_logits])
    return entropies.argmin(dim=0), entropies  # argmin returns the first minimum: ties -> lowest index


def make_views(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
               clean: int = CLEAN_VIEWS, augmented: int = AUGMENTED_VIEWS, generator_seed: int | None = None) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> normalised float views [B, clean + augmented, 3, H, W]: `clean`
    copies of the image, then `augmented` independent AutoAugment (CIFAR-10 policy) draws."""
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    out = []
    for img in images:
        views = [img] * clean + [policy(img) for _ in range(augmented)]
        out.append(normalise(torch.stack(views)))
    return torch.stack(out)


@torch.no_grad()
def classify_all_tasks(model, views: torch.Tensor, tasks: int, clean: int = CLEAN_VIEWS):
    """`views` [B, V, 3, H, W] -> (task ids [B], within-task class of the predicted task on the clean
    image [B], per-task clean-image predictions [T, B], entropies [T, B]). One forward of B*V inputs
    per task (batched), not T*V sequential passes."""
    b, v = views.shape[:2]
    flat = views.flatten(0, 1)
    logits = [model(flat, t).view(b, v, -1) for t in range(tasks)]
    task_ids, entropies = identify_task(logits)
    clean_pred = torch.stack([z[:, 0].argmax(-1) if clean else z.mean(1).argmax(-1) for z in logits])
    chosen = clean_pred.gather(0, task_ids[None]).squeeze(0)
    return task_ids, chosen, clean_pred, entropies
