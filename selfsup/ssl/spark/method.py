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
from selfsup.ssl.base import PretextOutput, SSLMethod
from selfsup.ssl.pictures import captioned_grid, denormalize
from selfsup.ssl.spark.decoder import Densify, LightDecoder, densify_norm_for
from selfsup.ssl.spark.loss import reconstruction_picture, spark_loss
from selfsup.ssl.spark.masking import mask_image, random_visible_mask, upsample_mask
from selfsup.ssl.spark.sparse_encoder import SparseEncoder


def visible_average(fmap: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Global average pool over visible positions only (masked ones are zero, not absent)."""
    mask = upsample_mask(active, fmap.shape[-2:]).to(fmap.dtype)
    return (fmap * mask).sum((-2, -1)) / mask.sum((-2, -1)).clamp_min(1)


class SparK(SSLMethod):
    name = "spark"

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
