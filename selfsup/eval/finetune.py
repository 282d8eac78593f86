"""Full fine-tuning of a backbone with a new classifier: the module that `submit finetune` trains
(selfsup/launch/finetune.py runs it).

It is a module on the methods' base (selfsup/ssl/base.py), so a fine-tuning run has what a
pretraining run has: the run folder, resume, TensorBoard, progress, DDP, DeepSpeed and Slurm. What it
adds:
- the classifier is timm's own (`num_classes` in the backbone's kwargs), so the fine-tuned network
  exports and loads in timm with its head;
- layer-wise LR decay: the LR of a parameter in layer i of L (stem 0, the stages or blocks 1..L, the
  final norm and classifier L+1) is scaled by `layer_decay ** (L + 1 - i)`;
- label smoothing, drop path (the backbone's `drop_path_rate`) and timm's mixup / cutmix;
- model selection: every `finetune.val_every_n_steps` steps and at the last step, top-1 on the
  validation split carved from train; the best weights are kept in `checkpoints/best.pt`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from selfsup.core.atomic import write_atomic, write_text_atomic
from selfsup.ssl.base import PretextOutput, SSLMethod

BEST_WEIGHTS = "best.pt"  # in the run's checkpoints/ folder
BEST_RECORD = "best.json"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """How many of the batch have their label among the top-k logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, :k].any(1).sum()) for k in ks]


@torch.no_grad()
def classify(net, batches, device) -> dict:
    """Top-1 / top-5 (%) of `net`'s logits over labelled batches."""
    correct1 = correct5 = seen = 0
    for batch in batches:
        logits = net(batch["image"].to(device)).float()
        labels = batch["label"].to(device)
        c1, c5 = topk_correct(logits, labels)
        correct1, correct5, seen = correct1 + c1, correct5 + c5, seen + len(labels)
    if not seen:
        return {"top1": float("nan"), "top5": float("nan"), "samples": 0}
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "samples": seen}


class FineTuner(SSLMethod):
    name = "finetune"

    def __init__(self, cfg: DictConfig | dict, num_classes: int | None = None):
        super().__init__(cfg, num_classes=None)  # no online probe: the classifier is the network's own
        self.num_classes = num_classes
        f = self.cfg.finetune
        self.mixup = None
        if f.mixup > 0 or f.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, label_smoothing=f.label_smoothing,
                               num_classes=num_classes)
        self.val_batches: list[dict] = []  # set by the launcher: the validation split, in memory
        self.best_dir: Path | None = None  # set by the launcher: where best.pt and best.json go
        self.best = {"val_top1": -1.0, "step": -1}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def pretext_step(self, batch: dict) -> PretextOutput:
        x, y = batch["image"], batch["label"]
        if self.mixup is not None and len(y) % 2 == 0:  # timm's mixup pairs the batch with its reverse
            mixed, soft = self.mixup(x, y)
            loss = torch.sum(-soft * F.log_softmax(self.logits(mixed), dim=-1), dim=-1).mean()
            return {"loss": loss}
        logits = self.logits(x)
        loss = F.cross_entropy(logits, y, label_smoothing=float(self.cfg.finetune.label_smoothing))
        return {"loss": loss, "terms": {"train_top1": (logits.argmax(1) == y).float().mean() * 100}}

    # ---- layer-wise LR decay -------------------------------------------------------------------
    def layer_ids(self) -> dict[str, int]:
        """Parameter name -> its layer: 0 before the first stage or block (the stem), i within the i-th,
        L + 1 after the last (final norm, classifier)."""
        modules = self.backbone.layer_modules()
        ids, seen_layer = {}, False
        for name, _ in self.named_parameters():
            inner = name.removeprefix("backbone.net.")
            layer = next((i + 1 for i, m in enumerate(modules) if inner == m or inner.startswith(m + ".")), None)
            seen_layer = seen_layer or layer is not None
            ids[name] = layer if layer is not None else (len(modules) + 1 if seen_layer else 0)
        return ids

    def parameter_groups(self) -> list[dict]:
        """The base's decay / no-decay split, each further split by layer with its decayed LR."""
        declared = self.declared_no_weight_decay()
        layers = self.layer_ids()
        depth = len(self.backbone.layer_modules()) + 1
        decay, peak = float(self.cfg.finetune.layer_decay), self.peak_lr()
        groups: dict[tuple[int, bool], dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            layer = layers[name]
            no_decay = self.skips_weight_decay(name, param, declared)
            group = groups.setdefault((layer, no_decay), {
                "params": [], "name": f"{'no_decay' if no_decay else 'decay'}.layer{layer}",
                "weight_decay": 0.0 if no_decay else self.cfg.optim.weight_decay,
                "lr": peak * decay ** (depth - layer)})
            group["params"].append(param)
        return [groups[k] for k in sorted(groups)]

    # ---- model selection -----------------------------------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = int(self.cfg.finetune.val_every_n_steps)
        step = int(self.global_step)
        if self.val_batches and (step % every == 0 or step >= self.total_steps):
            self.validate_now(step)

    def validate_now(self, step: int) -> float:
        """Top-1 on the validation split; the best weights so far are saved (rank 0)."""
        was_training = self.training
        self.eval()
        with self.trainer.precision_plugin.forward_context():
            val = classify(self, self.val_batches, self.device)
        self.train(was_training)
        self.log("val/top1", val["top1"], rank_zero_only=True)
        if val["top1"] > self.best["val_top1"]:
            self.best = {"val_top1": val["top1"], "val_top5": val["top5"], "step": step}
            if self.global_rank == 0 and self.best_dir is not None:
                self.save_best()
        return val["top1"]

    def save_best(self) -> None:
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        write_atomic(self.best_dir / BEST_WEIGHTS, lambda temporary: torch.save(state, temporary))
        write_text_atomic(self.best_dir / BEST_RECORD, json.dumps(self.best))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["selfsup"]["finetune_best"] = dict(self.best)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best = dict(checkpoint.get("selfsup", {}).get("finetune_best") or self.best)
