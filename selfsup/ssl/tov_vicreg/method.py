"""TOV-VICReg as a Lightning method (docs/methods/tov_vicreg.md).

Per step: the backbone encodes x = A1(o_t), y = A2(o_t), z = A3(o_{t-3}), w = A3(o_{t+3}) into pooled
representations (a ViT's final-LayerNorm CLS token); the expander projects r_x and r_y for VICReg;
the temporal head sees one of the 6 permutations of (r_x, r_z, r_w) per sample and says whether it is
the canonical order (current, previous, next). Only the backbone is exported.

Parameter groups as the official LARS: weight decay and trust ratio for every tensor of more than one
dimension (a ViT's `pos_embed` and `cls_token` included: timm's `no_weight_decay()` does not apply
here), neither for biases and norm weights (plain momentum SGD).
"""

from __future__ import annotations


import torch

from selfsup.data.temporal import TemporalView
from selfsup.core.errors import UserError
from selfsup.ssl.base import PretextOutput, SSLMethod
from selfsup.ssl.pictures import captioned_grid
from selfsup.ssl.tov_vicreg.heads import TemporalOrderHead, expander
from selfsup.ssl.tov_vicreg.loss import (BCE_BEST_CONSTANT, BCE_X_SLOT_KNOWN, describe_temporal_bce,
                                         sample_permutations, tov_vicreg_loss)


def holds_episodes(spec) -> bool | None:
    """Whether the shards at `spec` are ordered episodes written by `submit shards atari` (their
    index.json says so); None when they cannot be read from here."""
    from selfsup.data.remote import shard_folder
    from selfsup.data.shards import read_index
    from selfsup.data.stream import expand_urls

    try:
        folder, _ = shard_folder(expand_urls(spec)[0])
        index = read_index(folder) if folder is not None else None
    except UserError:  # not here (a dry run, paths of a cluster's nodes, a server out of reach): checked elsewhere
        return None
    return None if index is None else "atari" in index


class TOVVICReg(SSLMethod):
    name = "tov_vicreg"

    @classmethod
    def check_config(cls, cfg, backbone) -> None:
        """The temporal views are 3-frame stacks of ordered episodes, which image shards do not hold."""
        d = cfg.data
        episodes = True if d.name == "atari" else holds_episodes(d.train) if d.get("train") else False
        if episodes is False:
            source = f"data.train={d.train!r}" if d.get("train") else f"data={d.name}"
            raise UserError(f"tov_vicreg needs ordered episode shards, and {source} holds single images: write them with "
                            "`submit shards atari OUT` and pass data=OUT/train (or leave data out for the built-in frames)")

    def __init__(self, cfg, num_classes: int | None = None):
        super().__init__(cfg, num_classes)
        m = self.cfg.method
        dim = self.backbone.num_features
        self.projector = expander(dim, list(m.expander))
        self.temporal_head = TemporalOrderHead(dim)

    def skips_weight_decay(self, name, param, declared) -> bool:
        """The official LARS rule, by shape alone (see the module's docstring)."""
        return param.ndim <= 1

    def train_view(self):
        m = self.cfg.method
        return TemporalView(self.cfg.data.image_size, tuple(m.crop_scale), flip=m.flip)

    def encode(self, *views: torch.Tensor) -> list[torch.Tensor]:
        """Pooled representations of each view. A ViT (no batch statistics) encodes them in one
        pass; a convnet one view at a time, so its BatchNorm sees each view alone, as in the original."""
        if self.backbone.family == "vit":
            return list(self.backbone(torch.cat(views)).split([len(v) for v in views]))
        return [self.backbone(v) for v in views]

    def pretext_step(self, batch: dict) -> PretextOutput:
        m = self.cfg.method
        r_x, r_y, r_z, r_w = self.encode(batch["x"], batch["y"], batch["z"], batch["w"])
        p_x, p_y = self.projector(r_x), self.projector(r_y)
        perms, labels = sample_permutations(len(r_x), device=r_x.device)  # global RNG, on the CPU: device-agnostic
        logits = self.temporal_head(r_x, r_z, r_w, perms)
        # equal previous and next stacks (a still screen) have no order to tell: out of the temporal term
        distinct = batch.get("distinct")
        keep = distinct.to(r_x.device, torch.bool) if distinct is not None else torch.ones_like(labels, dtype=torch.bool)
        terms = tov_vicreg_loss(p_x, p_y, logits[keep], labels[keep], sim=m.sim_weight, std=m.std_weight,
                                cov=m.cov_weight, temporal=m.temporal_weight, gamma=m.gamma, eps=m.eps)
        loss = terms.pop("loss")
        with torch.no_grad():
            terms["temporal_acc"] = ((logits[keep] > 0).float() == labels[keep]).float().sum() / keep.sum().clamp(min=1)
            terms["temporal_kept"] = keep.float().mean()
            terms["temporal_bce_constant"] = BCE_BEST_CONSTANT
            terms["temporal_bce_x_slot"] = BCE_X_SLOT_KNOWN
            terms["repr_std"] = r_x.float().std(0).mean()  # collapse monitor
            terms["proj_std"] = p_x.float().std(0).mean()
        return {"loss": loss, "terms": terms, "features": r_x,
                "pictures": {"logits": logits.detach(), "labels": labels, "bce": terms["temporal"].detach()}}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # the temporal BCE on one chart with its two landmarks (TensorBoard's Custom Scalars tab)
        experiment = getattr(self.logger, "experiment", None) if self.logger else None
        if experiment is not None and hasattr(experiment, "add_custom_scalars") and self.global_rank == 0:
            experiment.add_custom_scalars({"tov_vicreg": {"temporal BCE vs its landmarks": [
                "Multiline", ["train/temporal", "train/temporal_bce_constant", "train/temporal_bce_x_slot"]]}})

    def log_pictures(self, batch: dict, out: PretextOutput) -> None:
        """Columns x, y, z (previous), w (next) of a few samples; the 3 frames of a stack are the RGB
        channels (motion shows as colour fringes). Caption: the head's P(shuffled) on its sampled order."""
        n = min(6, len(batch["x"]))
        tiles = torch.stack([batch[k][:n] for k in ("x", "y", "z", "w")], dim=1).flatten(0, 1).clamp(0, 1).float()
        prob = torch.sigmoid(out["pictures"]["logits"][:n]).tolist()
        truth = out["pictures"]["labels"][:n].tolist()
        captions, ok = [], []
        for p, t in zip(prob, truth, strict=True):
            captions += [f"x p={p:.2f}", f"y {'shuf' if t else 'order'}", "z (t-3)", "w (t+3)"]
            ok += [(p > 0.5) == bool(t)] * 4
        title = describe_temporal_bce(float(out["pictures"]["bce"]))
        grid = captioned_grid(tiles.cpu(), captions, ok=ok, columns=8, title=title)
        self.logger.experiment.add_image("tov_vicreg/x_y_prev_next", grid, self.global_step, dataformats="HWC")
