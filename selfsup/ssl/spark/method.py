"""SparK (Tian et al., ICLR 2023): sparse masked modelling for convnets, as a Lightning method.

Per step: a random mask on the encoder's total-stride grid (exactly round(cells x (1 - ratio))
visible cells per image), the masked image through the sparse encoder (the registry backbone, run on
visible positions only), densify + light UNet decoder, and the per-patch-normalised MSE on masked
patches. Only the backbone is exported; decoder, densify layers and mask tokens are discarded.

Optimisation as the official recipe: LAMB, no weight decay and no trust ratio for parameters of at
most one dimension (biases, norms, ConvNeXt's layer scales) and for the mask tokens (declared by
`Densify.no_weight_decay`), and one gradient clipping, at `optim.clip_grad` (5), by the base.
"""

from __future__ import annotations

import torch

from selfsup.data import views
from selfsup.core.errors import UserError, unknown_choice
from selfsup.ssl.base import PretextOutput, SSLMethod
from selfsup.ssl.pictures import captioned_grid, denormalize
from selfsup.ssl.spark.decoder import Densify, LightDecoder, densify_norm_for
from selfsup.ssl.spark.loss import reconstruction_picture, spark_loss
from selfsup.ssl.spark.masking import mask_image, num_visible, random_visible_mask, upsample_mask
from selfsup.ssl.spark.sparse_encoder import BACKENDS, SparseEncoder


def grid_is_maskable(side: int, ratio: float) -> bool:
    """A side x side mask grid keeps at least one cell visible (the encoder's input) and one masked
    (the loss's target) at this mask ratio."""
    visible = num_visible(side, side, ratio)
    return 1 <= visible < side * side


def smallest_maskable_side(ratio: float) -> int:
    side = 1
    while not grid_is_maskable(side, ratio):
        side += 1
    return side


def visible_average(fmap: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Global average pool over visible positions only (masked ones are zero, not absent)."""
    mask = upsample_mask(active, fmap.shape[-2:]).to(fmap.dtype)
    return (fmap * mask).sum((-2, -1)) / mask.sum((-2, -1)).clamp_min(1)


class SparK(SSLMethod):
    name = "spark"

    @classmethod
    def check_config(cls, cfg, backbone) -> None:
        """The mask grid is the image in cells of the backbone's total stride: the image side must be a
        whole number of cells, and the grid large enough to keep cells both visible and masked."""
        m, size, stride = cfg.method, int(cfg.data.image_size), backbone.total_stride
        if m.sparse_backend not in BACKENDS:
            raise unknown_choice("spark method.sparse_backend", m.sparse_backend, BACKENDS)
        if not 0.0 < m.mask_ratio < 1.0:
            raise UserError(f"spark: method.mask_ratio={m.mask_ratio}: must be in (0, 1), e.g. 0.6")
        smallest = smallest_maskable_side(m.mask_ratio) * stride
        works = f"use image_size={smallest} or a larger multiple of {stride}"
        if size % stride:
            raise UserError(f"spark: data.image_size={size} is not a multiple of {backbone.name}'s total stride {stride} "
                            f"(SparK masks cells of {stride}x{stride} px): {works}")
        side = size // stride
        if not grid_is_maskable(side, m.mask_ratio):
            visible = num_visible(side, side, m.mask_ratio)
            raise UserError(f"spark: data.image_size={size} gives {backbone.name} (total stride {stride}) a {side}x{side} mask "
                            f"grid, of which method.mask_ratio={m.mask_ratio} keeps {visible} of {side * side} cells visible "
                            f"(SparK needs at least one visible and one masked cell): {works}")

    def __init__(self, cfg, num_classes: int | None = None):
        super().__init__(cfg, num_classes)
        m = self.cfg.method
        # the encoder drives the backbone's own modules; it is kept out of the module tree so that the
        # backbone's weights are registered (and checkpointed) once, under `backbone.`
        object.__setattr__(self, "encoder", SparseEncoder(self.backbone, backend=m.sparse_backend))
        self.densify = Densify(self.backbone.stage_channels, width=m.decoder_width, norm=densify_norm_for(self.backbone))
        self.decoder = LightDecoder(self.backbone.total_stride, width=m.decoder_width)
        self.patch = self.backbone.total_stride

    def train_view(self):
        d = self.cfg.data
        return views.resized_crop_view(d.image_size, d.mean, d.std, scale=tuple(self.cfg.method.crop_scale))

    def pretext_step(self, batch: dict) -> PretextOutput:
        image = batch["image"]
        grid = (image.shape[-2] // self.patch, image.shape[-1] // self.patch)
        active = random_visible_mask(image.shape[0], *grid, self.cfg.method.mask_ratio, device=image.device)
        stages = self.encoder(image, active)
        pred = self.decoder(self.densify(stages, active))
        loss = spark_loss(pred, image, active, self.patch)
        return {"loss": loss, "features": visible_average(stages[-1], active),
                "pictures": {"pred": pred.detach(), "active": active}}

    def log_pictures(self, batch: dict, out: PretextOutput) -> None:
        n = min(8, batch["image"].shape[0])
        image, active = batch["image"][:n], out["pictures"]["active"][:n]
        pred = out["pictures"]["pred"][:n]
        rows = [image, mask_image(image, active), reconstruction_picture(pred, image, active, self.patch)]
        tiles = denormalize(torch.cat(rows), self.cfg.data.mean, self.cfg.data.std)
        captions = [c for c in ("original", "masked", "reconstruction") for _ in range(n)]
        grid = captioned_grid(tiles, captions, columns=n)
        self.logger.experiment.add_image("spark/original_masked_reconstruction", grid, self.global_step, dataformats="HWC")
