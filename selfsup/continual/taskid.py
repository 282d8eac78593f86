"""Task identification at inference (class-incremental mode).

`entropy` (ConTraCon's, as in CVIR/contracon): for each test image, 16 inputs (6 clean copies + 10
AutoAugment-CIFAR10 views); every learned task's network classifies all 16 in one batched pass; the
logits are averaged over the 16, softmaxed, and the task with the lowest entropy
`H = -sum p log(p + 1e-4)` wins (ties: the lowest task index).

`mahalanobis` (selfsup's addition): a 2-class head is as confident on another task's images as on its
own, so entropy picks tasks at about chance on split Fashion-MNIST. Instead each task keeps, when its
training ends, a Gaussian of its own network's pooled features (class means + one shared covariance,
shrunk towards a scaled identity; statistics, not images, so the method stays exemplar-free), and
the task whose network puts the clean image closest to one of its classes (Mahalanobis distance)
wins."""

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


def class_gaussian(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   shrinkage: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """features [N, D], labels [N] -> (class means [C, D], precision [D, D]) of a Gaussian per class
    with one shared covariance, `(1 - shrinkage) * S + shrinkage * mean(diag S) * I` (invertible even
    when N < D)."""
    features = features.double()
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        raise ValueError(f"class_gaussian: no features for classes {torch.nonzero(counts == 0).flatten().tolist()}")
    means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64).index_add_(0, labels, features) / counts[:, None]
    centred = features - means[labels]
    cov = centred.T @ centred / len(features)
    cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    return means.float(), torch.linalg.inv(cov).float()


def mahalanobis_distance(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """features [B, D] -> [B]: squared Mahalanobis distance to the nearest class mean."""
    diff = features[:, None, :] - means[None]  # [B, C, D]
    return torch.einsum("bcd,de,bce->bc", diff, precision, diff).min(dim=1).values


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
