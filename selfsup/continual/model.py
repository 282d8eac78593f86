"""A registry transformer learning tasks one after another, ConTraCon-style (docs/methods/contracon.md).

Task 0 trains the whole backbone (plus its own sequence pool and classifier); the backbone is then
frozen for good. Every later task t owns a `TaskState`: for each attention layer a per-head
convolutional re-weighting of the frozen task-0 Q, K and V weights, fresh LayerNorms in place of every
LayerNorm of the encoder, a sequence-pooling Linear(D, 1) and a classifier. The task-t network is the
frozen backbone run with those tensors substituted (`torch.func.functional_call`), so nothing of the
backbone or of an earlier task is ever written again.

Works on any registered transformer whose attention modules have `num_heads` and either separate
`q`, `k`, `v` Linears (selfsup's CCT) or timm's fused `qkv` Linear (the ViTs: vit_t, vit_s, ...);
a fused bias stays the frozen task-0 bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from selfsup.continual.reweight import HeadConvReweight
from selfsup.core.errors import UserError

TOKENIZER_PREFIXES = ("tokenizer", "patch_embed")  # shared by all tasks, never re-normalised


@dataclass(frozen=True)
class AttnTarget:
    weight: str  # parameter name inside the timm network, e.g. "blocks.0.attn.q.weight"
    chunks: int  # 1: one of separate Q/K/V; 3: timm's fused qkv ([3D, D], rows Q then K then V)
    heads: int

    @property
    def key(self) -> str:  # a ModuleDict key (no dots)
        return self.weight.removesuffix(".weight").replace(".", "__")


def find_targets(net: nn.Module) -> tuple[list[AttnTarget], list[str]]:
    """The attention projections to re-weight and the LayerNorms to replace per task."""
    targets: list[AttnTarget] = []
    for name, module in net.named_modules():
        heads = getattr(module, "num_heads", None)
        if not isinstance(heads, int) or name == "":
            continue
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in "qkv"):
            targets += [AttnTarget(f"{name}.{p}.weight", 1, heads) for p in "qkv"]
        elif isinstance(getattr(module, "qkv", None), nn.Linear):
            targets.append(AttnTarget(f"{name}.qkv.weight", 3, heads))
    norms = [name for name, m in net.named_modules()
             if isinstance(m, nn.LayerNorm) and not name.startswith(TOKENIZER_PREFIXES)]
    return targets, norms


class _Features(nn.Module):
    """`forward` = the network's `forward_features`, so functional_call can run it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_features(x)


def sequence_pool(tokens: torch.Tensor, pool: nn.Linear) -> torch.Tensor:
    """CCT's sequence pooling: softmax over tokens of Linear(D, 1), then the weighted token sum."""
    weights = torch.softmax(pool(tokens), dim=1)  # [B, N, 1]
    return (weights.transpose(1, 2) @ tokens).squeeze(1)


class TaskState(nn.Module):
    def __init__(self, dim: int, num_classes: int, reweights: dict[str, nn.Module] | None = None,
                 norms: dict[str, nn.LayerNorm] | None = None):
        super().__init__()
        self.reweights = nn.ModuleDict(reweights or {})
        self.norms = nn.ModuleDict(norms or {})
        self.pool = nn.Linear(dim, 1)
        self.head = nn.Linear(dim, num_classes)
        self.num_classes = num_classes
        # the Gaussian of this task's pooled features, fitted once its training ends (task identification)
        self.register_buffer("class_means", torch.zeros(num_classes, dim))
        self.register_buffer("feature_precision", torch.zeros(dim, dim))


class ContinualTransformer(nn.Module):
    def __init__(self, backbone: nn.Module, kernel_size: int = 15):
        super().__init__()
        if backbone.family != "vit":
            raise UserError(f"ConTraCon re-weights attention: it needs a transformer (cct_*, vit_*), not {backbone.name} (a {backbone.family})")
        self.backbone = backbone
        self.kernel_size = kernel_size
        self.targets, self.norm_names = find_targets(backbone.net)
        if not self.targets:
            raise UserError(f"{backbone.name}: no attention module with q/k/v or qkv Linears and num_heads found")
        self.tasks = nn.ModuleList()
        object.__setattr__(self, "_features", _Features(backbone.net))  # not a sub-module: no duplicate keys

    # ---- building tasks -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.backbone.num_features

    def add_task(self, num_classes: int) -> TaskState:
        """Task 0: the backbone's own norms, a pool (CCT: a copy of its own) and a classifier.
        Later tasks: re-weighting kernels and gates, fresh LayerNorms (weight 1, bias 0), pool, classifier."""
        net = self.backbone.net
        if not self.tasks:
            state = TaskState(self.dim, num_classes)
            if isinstance(getattr(net, "attention_pool", None), nn.Linear):
                state.pool.load_state_dict(net.attention_pool.state_dict())
        else:
            reweights: dict[str, nn.Module] = {}
            for t in self.targets:
                if t.chunks == 1:
                    reweights[t.key] = HeadConvReweight(t.heads, self.kernel_size)
                else:
                    reweights[t.key] = nn.ModuleList(HeadConvReweight(t.heads, self.kernel_size) for _ in range(t.chunks))
            norms = {}
            for name in self.norm_names:
                old = net.get_submodule(name)
                norms[name.replace(".", "__")] = nn.LayerNorm(old.normalized_shape, eps=old.eps)
            state = TaskState(self.dim, num_classes, reweights, norms)
        device = next(self.backbone.parameters()).device
        self.tasks.append(state.to(device))
        return state

    def finish_first_task(self) -> None:
        """After task 0: its pool is written back into a CCT (so an export is the whole task-0 CCT)."""
        net = self.backbone.net
        if isinstance(getattr(net, "attention_pool", None), nn.Linear):
            with torch.no_grad():
                net.attention_pool.load_state_dict(self.tasks[0].pool.state_dict())

    def train_only(self, task: int) -> list[nn.Parameter]:
        """Freeze everything but what task `task` trains (task 0: the backbone too); returns those."""
        for p in self.parameters():
            p.requires_grad_(False)
        modules = [self.tasks[task]] + ([self.backbone] if task == 0 else [])
        params = [p for m in modules for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def task_parameters(self, task: int) -> int:
        return sum(p.numel() for p in self.tasks[task].parameters())

    # ---- the task-t network -------------------------------------------------------------
    def task_weights(self, task: int) -> dict[str, torch.Tensor]:
        """The tensors substituted into the frozen backbone for task `task` (empty for task 0)."""
        if task == 0:
            return {}
        state = self.tasks[task]
        params = dict(self.backbone.net.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for t in self.targets:
            w0 = params[t.weight]
            module = state.reweights[t.key]
            if t.chunks == 1:
                out[t.weight] = module(w0)
            else:
                out[t.weight] = torch.cat([m(w) for m, w in zip(module, w0.chunk(t.chunks, dim=0), strict=True)], dim=0)
        for name in self.norm_names:
            norm = state.norms[name.replace(".", "__")]
            out[f"{name}.weight"], out[f"{name}.bias"] = norm.weight, norm.bias
        return out

    def features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        weights = self.task_weights(task)
        if not weights:
            return self.backbone.net.forward_features(x)
        return functional_call(self._features, {f"net.{k}": v for k, v in weights.items()}, (x,), strict=False)

    def pooled(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return sequence_pool(self.features(x, task), self.tasks[task].pool)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.tasks[task].head(self.pooled(x, task))


def clone_task_state(state: TaskState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.state_dict().items()}


__all__ = ["AttnTarget", "ContinualTransformer", "TaskState", "clone_task_state", "find_targets", "sequence_pool"]
