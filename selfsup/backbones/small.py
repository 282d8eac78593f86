"""CPU-sized ResNets with a 3x3 stride-1 stem, registered in timm's registry as `selfsup_<name>`.

Their weights keep timm's ResNet key names; only the stem is different (3x3 instead of 7x7, no
max-pool), so `timm.create_model("selfsup_resnet18_s1")` rebuilds the exact network.

Every network here is built through timm's `build_model_with_cfg` with a default pretrained config,
as timm's own are: `timm.create_model("local-dir:FOLDER", pretrained=True)` then loads the weights of
a `submit export --format hf` folder (selfsup/export.py).
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn


def _cfg(**kwargs) -> dict:
    # the eval view of selfsup at the 32 px these networks are made for (a resize and centre crop of the
    # whole image); an export's config.json carries its run's own size and normalisation instead
    return {"num_classes": 1000, "input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear",
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, **kwargs}


# read by timm's register_model, so it comes before the decorated functions
default_cfgs = generate_default_cfgs({
    "selfsup_resnet18_s1": _cfg(first_conv="conv1", classifier="fc"),
    "selfsup_resnet10_s1": _cfg(first_conv="conv1", classifier="fc"),
    "selfsup_resnet10_s1_w32": _cfg(first_conv="conv1", classifier="fc"),
    "selfsup_resnet_tiny": _cfg(first_conv="conv1", classifier="fc"),
    "selfsup_convnet4": _cfg(num_classes=0, first_conv="stages.0.0", classifier="head"),
})


def _stride1_resnet(variant: str, pretrained: bool, layers, channels, **kwargs):
    return build_model_with_cfg(_build_stride1_resnet, variant, pretrained, layers=layers, channels=channels, **kwargs)


def _build_stride1_resnet(layers, channels, **kwargs):
    kwargs.setdefault("zero_init_last", False)
    in_chans = kwargs.get("in_chans", 3)
    # a "deep" stem makes timm size bn1 and layer1's input as channels[0]; its 3-conv stem is then
    # replaced by one 3x3 stride-1 conv, keeping the standard key names (conv1, bn1)
    net = ResNet(block=BasicBlock, layers=layers, channels=channels, stem_type="deep", stem_width=channels[0] // 2, **kwargs)
    net.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    for info in net.feature_info:  # the stem no longer downsamples by 4
        info["reduction"] = max(1, info["reduction"] // 4) if info["module"] != "act1" else 1
    return net


@register_model
def selfsup_resnet18_s1(pretrained: bool = False, **kwargs):
    return _stride1_resnet("selfsup_resnet18_s1", pretrained, (2, 2, 2, 2), (64, 128, 256, 512), **kwargs)


@register_model
def selfsup_resnet10_s1(pretrained: bool = False, **kwargs):
    return _stride1_resnet("selfsup_resnet10_s1", pretrained, (1, 1, 1, 1), (64, 128, 256, 512), **kwargs)


@register_model
def selfsup_resnet10_s1_w32(pretrained: bool = False, **kwargs):
    return _stride1_resnet("selfsup_resnet10_s1_w32", pretrained, (1, 1, 1, 1), (32, 64, 128, 256), **kwargs)


@register_model
def selfsup_resnet_tiny(pretrained: bool = False, **kwargs):
    return _stride1_resnet("selfsup_resnet_tiny", pretrained, (1, 1, 1, 1), (8, 16, 32, 64), **kwargs)


class _StagedNet(nn.Module):
    """A plain sequence of stages (`self.stages`) with timm's face: features, per-stage outputs, forward."""

    def forward_features(self, x):
        return self.stages(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, intermediates_only: bool = True):
        # `norm` as in timm's convnets (a norm after the last stage): these networks have none
        outs = []
        for block in self.stages:
            x = block(x)
            outs.append(x)
        return [outs[i] for i in (indices if indices is not None else range(len(outs)))]

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class ConvNet4(_StagedNet):
    """Four conv3x3-BN-ReLU-maxpool blocks and global average pooling: the plain CPU convnet of the
    calibration runs (docs/evaluation.md). Its stages are exposed like a timm model's (`feature_info`,
    `forward_intermediates`) so it has the registry's face."""

    def __init__(self, in_chans: int = 3, widths=(32, 64, 128, 256), num_classes: int = 0, **_):
        super().__init__()
        blocks, prev = [], in_chans
        for width in widths:
            blocks.append(nn.Sequential(
                nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ))
            prev = width
        self.stages = nn.Sequential(*blocks)
        self.num_features = prev
        self.num_classes = num_classes
        self.feature_info = [dict(num_chs=w, reduction=2 ** (i + 1), module=f"stages.{i}") for i, w in enumerate(widths)]
        self.head = nn.Linear(prev, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((-2, -1))
        return x if pre_logits else self.head(x)


@register_model
def selfsup_convnet4(pretrained: bool = False, **kwargs):
    return build_model_with_cfg(ConvNet4, "selfsup_convnet4", pretrained, **kwargs)


class NatureCNN(_StagedNet):
    """The Nature DQN torso (Mnih et al. 2015), the standard encoder of Atari representation work:
    conv 8x8/4 (32) - conv 4x4/2 (64) - conv 3x3/1 (64), ReLUs, then one linear layer of 512 on the
    flattened 7x7 map of an 84 px frame stack. The features are that layer's output (no ReLU after it,
    as in the Atari RAM-probing literature, so a linear probe sees the whole space). Other input sizes
    are pooled to the 7x7 grid first, so the weights fit any size from 36 px up."""

    def __init__(self, in_chans: int = 3, widths=(32, 64, 64), hidden: int = 512, grid: int = 7, num_classes: int = 0,
                 **_):
        super().__init__()
        kernels, strides = (8, 4, 3), (4, 2, 1)
        blocks, prev = [], in_chans
        for width, kernel, stride in zip(widths, kernels, strides, strict=True):
            blocks.append(nn.Sequential(nn.Conv2d(prev, width, kernel, stride=stride), nn.ReLU(inplace=True)))
            prev = width
        self.stages = nn.Sequential(*blocks)
        self.grid = nn.AdaptiveAvgPool2d(grid)
        self.fc = nn.Linear(prev * grid * grid, hidden)
        self.num_features = hidden
        self.num_classes = num_classes
        self.feature_info = [dict(num_chs=w, reduction=r, module=f"stages.{i}")
                             for i, (w, r) in enumerate(zip(widths, (4, 8, 8), strict=True))]
        self.head = nn.Linear(hidden, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x, pre_logits: bool = False):
        x = self.fc(self.grid(x).flatten(1))
        return x if pre_logits else self.head(x)


default_cfgs.update(generate_default_cfgs({
    "selfsup_nature_cnn": _cfg(num_classes=0, input_size=(3, 84, 84), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                               first_conv="stages.0.0", classifier="head"),
}))


@register_model
def selfsup_nature_cnn(pretrained: bool = False, **kwargs):
    return build_model_with_cfg(NatureCNN, "selfsup_nature_cnn", pretrained, **kwargs)
