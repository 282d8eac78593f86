"""TOV-VICReg's loss terms as pure functions (docs/methods/tov_vicreg.md), always computed in float32
(under AMP the 1024x1024 covariance would otherwise be half precision)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def invariance_loss(p_x: torch.Tensor, p_y: torch.Tensor) -> torch.Tensor:
    """I = mean((p_x - p_y)^2) over batch and dimensions."""
    return F.mse_loss(p_x.float(), p_y.float())


def _std_hinge(p: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    p = p.float()
    p = p - p.mean(0)
    std = torch.sqrt(p.var(0, unbiased=True) + eps)
    return F.relu(gamma - std).mean()


def variance_loss(p_x: torch.Tensor, p_y: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """V = 1/2 mean_d ReLU(gamma - sqrt(Var(p_x[:, d]) + eps)) + the same for p_y (unbiased variance)."""
    return 0.5 * _std_hinge(p_x, gamma, eps) + 0.5 * _std_hinge(p_y, gamma, eps)


def _off_diagonal_sq(p: torch.Tensor) -> torch.Tensor:
    p = p.float()
    n, d = p.shape
    p = p - p.mean(0)
    cov = p.T @ p / (n - 1)
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d


def covariance_loss(p_x: torch.Tensor, p_y: torch.Tensor) -> torch.Tensor:
    """Cv = sum_{i != j} Cov(p_x)[i, j]^2 / D + the same for p_y (Cov with divisor B - 1; the actual
    batch size is used, so a partial last batch is handled)."""
    return _off_diagonal_sq(p_x) + _off_diagonal_sq(p_y)


PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def sample_permutations(batch: int, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """One of the 6 permutations of (current, previous, next) per sample, uniformly: returns
    (permutations [B, 3] long, labels [B] float: 0 for the identity, 1 otherwise)."""
    index = torch.randint(0, len(PERMUTATIONS), (batch,), generator=generator)
    perms = PERMUTATIONS[index]
    labels = (index != 0).float()
    return perms.to(device), labels.to(device)


def permute_triplets(stack: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """stack [B, 3, D] (current, previous, next), perms [B, 3] -> [B, 3, D] with row b in the order
    perms[b] (position k holds element perms[b, k])."""
    return torch.gather(stack, 1, perms[:, :, None].expand(-1, -1, stack.shape[-1]))


def temporal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """T = BCE-with-logits, mean over the batch (label 0: the canonical order (t, t-3, t+3)); 0 for an
    empty batch (every sample left out)."""
    if logits.numel() == 0:
        return logits.float().sum()
    return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), labels.float().reshape(-1))


# Landmarks of the temporal BCE. 1 in 6 samples is in order, so the best constant answer, P(shuffled) =
# 5/6, scores the entropy H(1/6). A head that knows which slot holds x but nothing of time is sure for
# the 4 permutations that move x and at 1/2 for the 2 that keep it first: (2/6) ln 2. Below that,
# the head tells previous from next.
BCE_BEST_CONSTANT = -(math.log(1 / 6) / 6 + 5 * math.log(5 / 6) / 6)  # 0.4506
BCE_X_SLOT_KNOWN = math.log(2) / 3  # 0.2310


def describe_temporal_bce(bce: float) -> str:
    """Where a temporal BCE stands against its landmarks, in words."""
    if bce >= BCE_BEST_CONSTANT:
        verdict = "no better than the constant answer"
    elif bce > BCE_X_SLOT_KNOWN:
        verdict = "learning which slot holds x"
    else:
        verdict = "telling previous from next"
    return (f"temporal BCE {bce:.3f}: {verdict} (constant {BCE_BEST_CONSTANT:.3f}, x slot known "
            f"{BCE_X_SLOT_KNOWN:.3f})")


def tov_vicreg_loss(p_x, p_y, logits, labels, *, sim: float = 10.0, std: float = 10.0, cov: float = 10.0,
                    temporal: float = 0.1, gamma: float = 1.0, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """L = sim * I + std * V + cov * Cv + temporal * T, with every term (for logging). Autocast is
    switched off here: under it the covariance matmul would run in bf16/fp16 even on float32 inputs."""
    with torch.autocast(device_type=p_x.device.type, enabled=False):
        terms = {
            "invariance": invariance_loss(p_x, p_y),
            "variance": variance_loss(p_x, p_y, gamma, eps),
            "covariance": covariance_loss(p_x, p_y),
            "temporal": temporal_loss(logits, labels),
        }
    loss = sim * terms["invariance"] + std * terms["variance"] + cov * terms["covariance"] + temporal * terms["temporal"]
    return {"loss": loss, **terms}
