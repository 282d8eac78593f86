"""`Backbone`: the one face every registered network shows to the methods."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from selfsup.core.errors import UserError


class Backbone(nn.Module):
    """A timm network without classifier, held as `self.net` so that `net.state_dict()` keeps
    timm's key names (the export strips exactly the `backbone.net.` prefix).

    - `forward(x)` -> pooled embedding `[B, num_features]`
    - `forward_features(x)` -> last feature map `[B, C, h, w]` (convnet) or tokens `[B, N, D]` (vit)
    - convnets: `forward_stages(x)` -> list of stage outputs; `stage_channels`, `stage_strides`
    - `layer_names()`, `layer_modules()`, `forward_layers(x, positions)`: pooled features after chosen
      stages (convnets) or blocks (ViTs), for per-layer probes
    """

    def __init__(self, net: nn.Module, *, name: str, family: str, timm_name: str, timm_kwargs: dict[str, Any]):
        super().__init__()
        self.net = net
        self.name = name
        self.family = family
        self.timm_name = timm_name
        self.timm_kwargs = dict(timm_kwargs)
        self.in_chans = int(self.timm_kwargs.get("in_chans", 3))
        self.num_features = int(net.num_features)
        if family == "convnet":
            stages = [f for f in net.feature_info if f["module"].startswith(("layer", "stages"))]
            self.stage_indices = [net.feature_info.index(f) for f in stages]
            self.stage_channels = [int(f["num_chs"]) for f in stages]
            self.stage_strides = [int(f["reduction"]) for f in stages]
            self.total_stride = self.stage_strides[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(features, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.family != "convnet":
            raise TypeError(f"{self.name} is a {self.family}: only convnets have stages")
        return self.net.forward_intermediates(x, indices=self.stage_indices, intermediates_only=True)

    # ---- the layers a probe reads: convnet stages, ViT blocks ------------------------------------------
    def layer_names(self) -> list[str]:
        """The layers in depth order: `stage1`, `stage2`, ... (convnets) or `block1`, `block2`, ... (ViTs)."""
        if self.family == "convnet":
            return [f"stage{i + 1}" for i in range(len(self.stage_indices))]
        return [f"block{i + 1}" for i in range(len(self.net.blocks))]

    def layer_modules(self) -> list[str]:
        """timm's module name of each layer (`layer2`, `stages.1`, `blocks.5`), as in its state dict."""
        if self.family == "convnet":
            return [self.net.feature_info[i]["module"] for i in self.stage_indices]
        return [f"blocks.{i}" for i in range(len(self.net.blocks))]

    def forward_layers(self, x: torch.Tensor, positions: list[int]) -> list[torch.Tensor]:
        """Pooled features `[B, D]` after the layers at `positions` (0-based, ascending), in one pass
        through timm's `forward_intermediates`.

        Convnets: a stage's map, globally average-pooled. ViTs: the tokens after a block, through the
        final norm (`norm=True`) and the network's own pooling (`forward_head`: the class token, or the
        mean of the patch tokens for a ViT built with `global_pool='avg'`). The last layer goes through
        the network's own head either way, so its features are `forward(x)`'s."""
        last = len(self.layer_names()) - 1
        if self.family == "convnet":
            maps = self.net.forward_intermediates(x, indices=[self.stage_indices[p] for p in positions], norm=True,
                                                  intermediates_only=True)
            return [self.pool(m) if p == last else m.mean((-2, -1)) for p, m in zip(positions, maps)]
        outs = self.net.forward_intermediates(x, indices=list(positions), return_prefix_tokens=True, norm=True,
                                              output_fmt="NLC", intermediates_only=True)
        # with prefix tokens (class, registers) timm returns (patch tokens, prefix tokens): the head
        # pools the whole sequence, prefix first, as forward_features gives it
        return [self.pool(torch.cat([o[1], o[0]], dim=1) if isinstance(o, tuple) else o) for o in outs]

    # ---- which image sizes the network takes (cheap on a backbone built on the meta device) ----------
    def fixed_image_size(self) -> int | None:
        """The one input side a ViT or CCT is built for (position embeddings of a fixed token grid);
        None for convnets and for ViTs built with dynamic_img_size."""
        patch_embed = getattr(self.net, "patch_embed", None)
        if patch_embed is not None:
            built = tuple(patch_embed.img_size or ())
            return int(built[0]) if built and getattr(patch_embed, "strict_img_size", True) else None
        size = getattr(self.net, "img_size", None)
        return int(size) if isinstance(size, int) else None

    def patch_size(self) -> int | None:
        patch_embed = getattr(self.net, "patch_embed", None)
        return int(patch_embed.patch_size[0]) if patch_embed is not None else None

    def stage_sizes(self, image_size: int) -> list[tuple[int, int]] | None:
        """(h, w) of each convnet stage's output for a square `image_size` input, traced through the
        network (exact for any padding or pooling rule); None when a map shrinks to nothing."""
        param = next(self.parameters())
        # zeros in eval mode: tracing a network with real weights must leave its BatchNorm statistics
        # as they are (train mode would fold the probe input into the running mean and variance)
        x = torch.zeros(2, self.in_chans, image_size, image_size, device=param.device, dtype=param.dtype)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                stages = self.forward_stages(x)
        except RuntimeError:  # a convolution or pooling window larger than its input
            return None
        finally:
            self.train(was_training)
        sizes = [tuple(int(s) for s in stage.shape[-2:]) for stage in stages]
        return sizes if all(min(s) > 0 for s in sizes) else None

    def min_image_size(self, fits: Callable[[list[tuple[int, int]]], bool] = lambda sizes: True) -> int:
        """The smallest square input whose stage maps are all non-empty and pass `fits(stage sizes)`
        (a convnet's; maps grow with the input, so the sizes that fit are all those from it up)."""

        def ok(size: int) -> bool:
            sizes = self.stage_sizes(size)
            return sizes is not None and fits(sizes)

        high = 1
        while not ok(high) and high < 8192:
            high *= 2
        low = high // 2  # fails (or is 0); `high` passes: bisect between them
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if ok(mid) else (mid, high)
        return high

    def check_image_size(self, image_size: int) -> None:
        """A UserError when the network cannot take square images of `image_size` px."""
        if self.family == "vit":
            self._check_token_grid(image_size)
        elif self.stage_sizes(image_size) is None:
            raise UserError(f"data.image_size={image_size} is too small for {self.name}: its feature maps shrink to "
                            f"nothing; use image_size={self.min_image_size()} or more")

    def _check_token_grid(self, image_size: int) -> None:
        patch = self.patch_size()
        if patch is not None and image_size < patch:
            raise UserError(f"data.image_size={image_size} is smaller than {self.name}'s {patch} px patches: use "
                            f"image_size={patch} or more, or a smaller backbone.kwargs.patch_size")
        built = self.fixed_image_size()
        if built is not None and built != image_size:
            patch_hint = " (and a backbone.kwargs.patch_size that divides it)" if patch else ""
            raise UserError(f"{self.name} is built for {built} px images, not data.image_size={image_size}: pass "
                            f"backbone.kwargs.img_size={image_size}{patch_hint}, or image_size={built}")

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def extra_repr(self) -> str:
        return f"name={self.name}, family={self.family}, num_features={self.num_features}"
