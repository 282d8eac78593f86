"""SiT's building blocks (v1: rotation token, contrastive token, corruption + reconstruction, learned
uncertainty weighting): pure losses, batched rotations and corruptions, the token heads, the method."""

from selfsup.ssl.sit.corruption import (block_mask, blur_per_image, corrupt, gaussian_kernels, random_rectangles,
                                        random_rotations, rectangle_mask, rotate_v1)
from selfsup.ssl.sit.heads import ReconstructionHead, encode_tokens
from selfsup.ssl.sit.loss import (TASK_SCALES, TASKS, nt_xent, optimal_s, reconstruction_loss, rotation_loss, sit_loss,
                                  task_factors, uncertainty_weighted)

__all__ = [
    "TASKS",
    "TASK_SCALES",
    "ReconstructionHead",
    "block_mask",
    "blur_per_image",
    "corrupt",
    "encode_tokens",
    "gaussian_kernels",
    "nt_xent",
    "optimal_s",
    "random_rectangles",
    "random_rotations",
    "reconstruction_loss",
    "rectangle_mask",
    "rotate_v1",
    "rotation_loss",
    "sit_loss",
    "task_factors",
    "uncertainty_weighted",
]
