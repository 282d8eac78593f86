"""RotNet (Gidaris, Singh, Komodakis, ICLR 2018): predict which of four rotations was applied.

Every image of the batch is fed in all four rotations (image-major: img0 r0..r3, img1 r0..r3, ...),
all made from the same augmented crop; label k is `torch.rot90(x, k, (-2, -1))`, i.e. k x 90 degrees
counter-clockwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.ssl.base import PretextOutput, SSLMethod
from selfsup.ssl.pictures import captioned_grid, denormalize

ROTATIONS = 4
DEGREES = ("0", "90", "180", "270")


def rotate(images: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(images, k, dims=(-2, -1))


def all_rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] -> ([4B, C, H, W], labels [4B]) in image-major order."""
    rotated = torch.stack([rotate(images, k) for k in range(ROTATIONS)], dim=1).flatten(0, 1)
    labels = torch.arange(ROTATIONS, device=images.device).repeat(images.shape[0])
    return rotated, labels


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the 4B rotated samples."""
    return F.cross_entropy(logits, labels)


class RotNet(SSLMethod):
    name = "rotnet"

    def __init__(self, cfg, num_classes: int | None = None):
        super().__init__(cfg, num_classes)
        self.head = nn.Linear(self.backbone.num_features, ROTATIONS)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def pretext_step(self, batch: dict) -> PretextOutput:
        images = batch["image"]
        inputs, labels = all_rotations(images)
        features = self.backbone(inputs)
        logits = self.head(features)
        loss = rotation_loss(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        # the upright copies (every 4th row) are the probe's view of the batch
        return {"loss": loss, "terms": {"rotation_acc": accuracy}, "features": features[::ROTATIONS],
                "pictures": {"logits": logits.detach(), "inputs": inputs, "labels": labels}}

    def log_pictures(self, batch: dict, out: PretextOutput) -> None:
        pictures = out["pictures"]
        n = min(32, len(pictures["labels"]))
        predicted = pictures["logits"][:n].argmax(1)
        truth = pictures["labels"][:n]
        captions = [f"p{DEGREES[p]} t{DEGREES[t]}" for p, t in zip(predicted.tolist(), truth.tolist(), strict=True)]
        images = denormalize(pictures["inputs"][:n], self.cfg.data.mean, self.cfg.data.std)
        grid = captioned_grid(images, captions, ok=(predicted == truth).tolist(), columns=ROTATIONS * 2)
        self.logger.experiment.add_image("rotnet/predicted_vs_true", grid, self.global_step, dataformats="HWC")
