"""SiT's two task tokens on a registry ViT, its token heads and the reconstruction head
(SiT v1; docs/methods/sit.md).

The backbone stays timm's plain ViT. SiT's two tokens are timm's `cls_token` (with its entry of
`pos_embed`) and one extra token owned by the method, prepended in front of the CLS token. Which SiT
token sits in timm's CLS slot is `method.export_token`: that one is what the exported ViT's pooled
output is trained as; the other one, and every head, stays behind in the checkpoint. Order in the
sequence carries no meaning (learned position embeddings, attention is permutation-equivariant): the
default, `contrastive`, gives v1's layout, rotation token first, contrastive token second. The extra
token's position embedding would be a second learned vector added to a learned vector, so it is
folded into the token.
"""

from __future__ import annotations

import torch
from torch import nn

from selfsup.core.errors import UserError

EXTRA = 0  # index of the method's own token in the sequence; timm's CLS token follows it


def check_vit(net: nn.Module, backbone_name: str, image_size: int) -> None:
    if getattr(net, "cls_token", None) is None or not hasattr(net, "patch_embed"):
        raise UserError(f"sit needs a timm ViT with a class token; {backbone_name} has none "
                        "(do not pass backbone.kwargs.class_token=false)")
    built = tuple(net.patch_embed.img_size or ())
    if built and not getattr(net.patch_embed, "dynamic_img_size", False) and built != (image_size, image_size):
        raise UserError(f"sit: data.image_size={image_size} but {backbone_name} is built for {built[0]} px: "
                        f"pass image_size={built[0]} or backbone.kwargs.img_size={image_size}")


def encode_tokens(net: nn.Module, images: torch.Tensor, extra_token: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> final-LayerNorm tokens [B, 1 + prefix + N, D]: the method's token, timm's
    prefix tokens (CLS first), then the N patch tokens. Runs the ViT's own modules in its own order;
    timm's `_pos_embed` adds the position embeddings to CLS and patches (any image size timm allows)."""
    x = net._pos_embed(net.patch_embed(images))
    x = torch.cat([extra_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    x = net.norm_pre(x)
    x = net.blocks(x)
    return net.norm(x)


def patch_grid(net: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    ph, pw = net.patch_embed.patch_size
    return images.shape[-2] // ph, images.shape[-1] // pw


class ReconstructionHead(nn.Module):
    """Patch tokens [B, N, D] -> image [B, C, h·p, w·p]: one transposed convolution with kernel and
    stride equal to the patch size, i.e. a linear map of each token to its own patch of pixels."""

    def __init__(self, dim: int, patch_size: tuple[int, int], channels: int = 3):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(dim, channels, kernel_size=tuple(patch_size), stride=tuple(patch_size))

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, d = patch_tokens.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"{n} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
        return self.deconv(patch_tokens.transpose(1, 2).reshape(b, d, *grid))


def trunc_normal_linear(layer: nn.Linear) -> nn.Linear:
    """timm's ViT init for a head (v1 applies it to every Linear)."""
    nn.init.trunc_normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer
