"""SparK's densify layers and light UNet decoder (docs/methods/spark.md, steps 3-4).

`Densify` turns the encoder's sparse stage outputs into dense decoder inputs (smallest map first);
`LightDecoder` upsamples them back to the input resolution. With a total stride s = 2^n the decoder
has n upsampling blocks; a stride-1 first stage (the CPU-sized ResNets, total stride 8) gives a
full-resolution level, added after the last block.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from selfsup.ssl.spark.masking import upsample_mask
from selfsup.ssl.spark.sparse_encoder import SiteGrid, batch_norm_rows

NORMS = ("bn", "ln")


def densify_norm_for(backbone: nn.Module) -> str:
    """The official code's densify norm of a backbone: channels-first LayerNorm for ConvNeXts, BN otherwise."""
    from timm.models.convnext import ConvNeXt

    return "ln" if isinstance(getattr(backbone, "net", backbone), ConvNeXt) else "bn"


def level_widths(width: int, levels: int) -> list[int]:
    """Decoder widths, halved per level: 768 -> [768, 384, 192, 96, 48, 24] for 6 levels."""
    if width % 2 ** (levels - 1):
        raise ValueError(f"decoder width {width} cannot be halved {levels - 1} times")
    return [width // 2**i for i in range(levels)]


class Densify(nn.Module):
    """Per level (smallest map first): norm over the visible sites, mask token at the masked sites,
    projection to the decoder's width of that level (1x1 conv on the smallest map, identity when
    the widths already match; 3x3 conv on the others)."""

    def __init__(self, stage_channels: list[int], width: int = 768, norm: str = "bn"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"densify norm must be one of {NORMS}, got {norm!r}")
        channels = list(reversed(stage_channels))  # smallest map first
        widths = level_widths(width, len(channels))
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(c) if norm == "bn" else _ChannelsFirstLayerNorm(c) for c in channels
        )
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in channels)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)
        self.projections = nn.ModuleList(
            _projection(c, w, kernel_size=1 if level == 0 else 3) for level, (c, w) in enumerate(zip(channels, widths))
        )

    def no_weight_decay(self) -> set[str]:
        """The mask tokens get no weight decay (timm's convention: names relative to this module)."""
        return {"mask_tokens.*"}

    def forward(self, stages: list[torch.Tensor], active: torch.Tensor) -> list[torch.Tensor]:
        """stages: the encoder's outputs (largest map first), zero where masked; active: [B,1,h,w]
        of the total-stride grid. Returns the decoder inputs, smallest map first."""
        dense_levels = []
        for fmap, norm, token, projection in zip(reversed(stages), self.norms, self.mask_tokens, self.projections):
            mask = upsample_mask(active.bool(), fmap.shape[-2:])
            fmap = self._norm_visible(norm, fmap, mask)
            fmap = torch.where(mask, fmap, token.to(fmap.dtype))
            dense_levels.append(projection(fmap))
        return dense_levels

    @staticmethod
    def _norm_visible(norm: nn.Module, fmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # BatchNorm2d, or the SyncBatchNorm a distributed run converts it to: visible-site statistics
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            sites = SiteGrid(mask)
            return sites.scatter(batch_norm_rows(norm, sites.gather(fmap)))
        return norm(fmap)  # LayerNorm: per site; the masked sites are replaced by the token next


class _ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of `[B, C, H, W]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _projection(channels: int, width: int, kernel_size: int) -> nn.Module:
    if kernel_size == 1 and channels == width:
        return nn.Identity()
    return nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2, bias=True)


class UpBlock(nn.Module):
    """x2 upsampling: ConvTranspose 4/2/1 -> conv3x3 -> BN -> ReLU6 -> conv3x3 (halves the width) -> BN."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU6(inplace=True),
            nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.upsample(x))


class LightDecoder(nn.Module):
    """Sum of the dense levels, upsampled log2(total_stride) times to the input resolution, then a
    1x1 conv to `out_channels`."""

    def __init__(self, total_stride: int = 32, width: int = 768, out_channels: int = 3):
        super().__init__()
        num_blocks = round(math.log2(total_stride))
        if 2**num_blocks != total_stride:
            raise ValueError(f"the total stride must be a power of two, got {total_stride}")
        widths = level_widths(width, num_blocks + 1)
        self.width = width
        self.blocks = nn.ModuleList(UpBlock(c, c_out) for c, c_out in zip(widths[:-1], widths[1:]))
        self.head = nn.Conv2d(widths[-1], out_channels, kernel_size=1, bias=True)
        self.reset_parameters()

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """levels: smallest map first, level i with `width / 2^i` channels at `2^i` x the smallest."""
        if len(levels) > len(self.blocks) + 1:
            raise ValueError(f"{len(levels)} levels for a decoder of {len(self.blocks)} upsampling blocks")
        x = levels[0]
        for i, block in enumerate(self.blocks):
            if 0 < i < len(levels):
                x = x + levels[i]
            x = block(x)
        if len(levels) == len(self.blocks) + 1:  # a full-resolution level (stride-1 first stage)
            x = x + levels[-1]
        return self.head(x)

    def reset_parameters(self) -> None:
        """The official code's init: convs trunc-normal(0.02) with zero bias, transposed convs Kaiming-normal
        fan-out, norms weight 1 and bias 0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
            elif isinstance(module, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                nn.init.ones_(module.weight)
            else:
                continue
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def extra_repr(self) -> str:
        return f"width={self.width}"
