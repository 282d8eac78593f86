"""SiT v1 (Atito, Awais, Kittler, arXiv 2104.03602, code of July 2021) as a Lightning method.

One step, in the order of v1's code (Sara-Ahmed/SiT, July 2021; docs/methods/sit.md):
  3. two augmented views per image (the data layer), each rotated by its own random k (v1 labels)
  4. a corrupted copy of each rotated view; the clean rotated views are the reconstruction targets
  5. both corrupted views through the one ViT (no teacher), with the rotation and contrastive tokens
  6. rotation CE on 2B, NT-Xent between the views' contrastive outputs, L1 on all pixels
  7. Σ exp(-a_t s_t) L_t + s_t / 2 with learned s_t (a = 1, 1, 0.5)
Only the plain ViT is exported (`backbone.`); the extra token, the heads and the s_t stay behind.
"""

from __future__ import annotations

import torch
from torch import nn

from selfsup.data import views
from selfsup.core.errors import UserError, unknown_choice
from selfsup.ssl.base import PretextOutput, SSLMethod
from selfsup.ssl.pictures import captioned_grid, denormalize
from selfsup.ssl.sit.corruption import corrupt, random_rotations
from selfsup.ssl.sit.heads import EXTRA, ReconstructionHead, check_vit, encode_tokens, patch_grid, trunc_normal_linear
from selfsup.ssl.sit.loss import TASK_SCALES, TASKS, sit_loss, task_factors

VERSIONS = ("v1",)
EXPORT_TOKENS = ("contrastive", "rotation")
ROTATION_NAMES = ("0", "90cw", "180", "90ccw")


def check_settings(m) -> None:
    """SiT's own choices and ranges in `method`."""
    if m.version not in VERSIONS:
        raise unknown_choice("sit method.version", m.version, VERSIONS)
    if m.export_token not in EXPORT_TOKENS:
        raise unknown_choice("sit method.export_token", m.export_token, EXPORT_TOKENS)
    if not m.temperature > 0:
        raise UserError(f"sit: method.temperature={m.temperature} must be > 0")
    if m.views.interpolation not in views.INTERPOLATIONS:
        raise unknown_choice("sit method.views.interpolation", m.views.interpolation, views.INTERPOLATIONS)
    for key in ("noise_budget", "replace_budget"):
        if not 0.0 <= m.corruption[key] <= 1.0:
            raise UserError(f"sit: method.corruption.{key}={m.corruption[key]} must be in [0, 1]")


class SiT(SSLMethod):
    name = "sit"

    @classmethod
    def check_config(cls, cfg, backbone) -> None:
        """SiT's settings, a ViT with a class token, and an image of whole patches: the reconstruction
        head rebuilds patches, so pixels beyond the last one would have no prediction."""
        check_settings(cfg.method)
        check_vit(backbone.net, backbone.name, cfg.data.image_size)
        patch, size = backbone.patch_size(), int(cfg.data.image_size)
        if size % patch:
            whole = max(patch, size - size % patch)
            raise UserError(f"sit: data.image_size={size} is not a multiple of {backbone.name}'s {patch} px patches "
                            f"(SiT reconstructs whole patches): use image_size={whole} backbone.kwargs.img_size={whole}, "
                            f"or a backbone.kwargs.patch_size that divides {size}")

    def __init__(self, cfg, num_classes: int | None = None):
        super().__init__(cfg, num_classes)
        m = self.cfg.method
        check_settings(m)
        net = self.backbone.net
        check_vit(net, self.backbone.name, self.cfg.data.image_size)
        dim = self.backbone.num_features
        # the SiT token that is not timm's CLS token (position embedding folded in: heads.py)
        self.sit_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.sit_token, std=0.02)
        self.rotation_head = trunc_normal_linear(nn.Linear(dim, 4))
        self.contrastive_head = trunc_normal_linear(nn.Linear(dim, m.contrastive_dim))
        self.reconstruction_head = ReconstructionHead(dim, net.patch_embed.patch_size, net.patch_embed.proj.in_channels)
        self.uncertainty = nn.Parameter(torch.full((len(TASKS),), float(m.uncertainty_init)))
        cls = 1 + EXTRA  # timm's CLS token comes right after the method's token
        self.rotation_index, self.contrastive_index = (EXTRA, cls) if m.export_token == "contrastive" else (cls, EXTRA)
        self.num_prefix = 1 + int(net.num_prefix_tokens)

    def no_weight_decay(self) -> set[str]:
        """The method's own token (timm's ViT lists its CLS token and position embedding itself; the
        learned loss weights and every bias and norm are 1-D)."""
        return {"sit_token"}

    def train_view(self):
        d, v = self.cfg.data, self.cfg.method.views
        return views.two_views(d.image_size, d.mean, d.std, scale=tuple(v.crop_scale), color_jitter=v.color_jitter,
                               interpolation=v.interpolation)

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self.backbone.net
        tokens = encode_tokens(net, images, self.sit_token)
        patches = tokens[:, self.num_prefix:]
        return {
            "rotation_logits": self.rotation_head(tokens[:, self.rotation_index]),
            "contrastive": self.contrastive_head(tokens[:, self.contrastive_index]),
            "reconstruction": self.reconstruction_head(patches, patch_grid(net, images)),
            "exported_token": tokens[:, 1 + EXTRA],
        }

    def pretext_step(self, batch: dict) -> PretextOutput:
        m, c = self.cfg.method, self.cfg.method.corruption
        clean1, rot1 = random_rotations(batch["view1"])
        clean2, rot2 = random_rotations(batch["view2"])
        clean = torch.cat([clean1, clean2])
        with torch.no_grad():
            kw = {"noise_budget": c.noise_budget, "replace_budget": c.replace_budget, "min_frac": c.min_frac,
                  "max_block_frac": c.max_block_frac, "max_kernel": c.max_kernel, "sigma_range": tuple(c.sigma_range)}
            corrupted1, masks = corrupt(clean1, **kw)
            corrupted2, _ = corrupt(clean2, **kw)  # corrupted within its own view's batch
        out = self.encode(torch.cat([corrupted1, corrupted2]))
        labels = torch.cat([rot1, rot2])
        z1, z2 = out["contrastive"].chunk(2)
        terms = sit_loss(out["rotation_logits"], labels, z1, z2, out["reconstruction"], clean, self.uncertainty,
                         temperature=m.temperature)
        loss = terms.pop("loss")
        with torch.no_grad():
            terms["rotation_acc"] = (out["rotation_logits"].argmax(1) == labels).float().mean()
            factors = task_factors(self.uncertainty.detach(), TASK_SCALES)
            for i, task in enumerate(TASKS):
                terms[f"s_{task}"] = self.uncertainty[i].detach().clone()
                terms[f"factor_{task}"] = factors[i]
        n = len(clean1)
        return {
            "loss": loss,
            "terms": terms,
            # the token the exported ViT pools, seen on the first view (corrupted, rotated): the online probe's input
            "features": out["exported_token"][:n],
            "pictures": {"clean": clean1.detach(), "corrupted": corrupted1.detach(), "masks": masks,
                         "reconstruction": out["reconstruction"][:n].detach(),
                         "rotation_pred": out["rotation_logits"][:n].argmax(1), "rotation": rot1},
        }

    def log_pictures(self, batch: dict, out: PretextOutput) -> None:
        """Three rows: clean rotated views, their corrupted copies, the reconstructions; captions give the
        true and predicted rotation (frames green when the rotation head is right)."""
        p = out["pictures"]
        n = min(8, len(p["clean"]))
        d = self.cfg.data
        rows = [p["clean"][:n], p["corrupted"][:n], p["reconstruction"][:n].float()]
        tiles = denormalize(torch.cat(rows).float(), d.mean, d.std)
        truth, pred = p["rotation"][:n].tolist(), p["rotation_pred"][:n].tolist()
        captions = ([f"clean {ROTATION_NAMES[t]}" for t in truth] + [f"p {ROTATION_NAMES[p]}" for p in pred]
                    + ["reconstruction"] * n)
        ok = [True] * n + [p == t for p, t in zip(pred, truth, strict=True)] + [True] * n
        grid = captioned_grid(tiles, captions, ok=ok, columns=n, scale=max(1, 96 // tiles.shape[-1]))
        self.logger.experiment.add_image("sit/clean_corrupted_reconstructed", grid, self.global_step, dataformats="HWC")
