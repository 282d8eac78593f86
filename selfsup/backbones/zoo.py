"""Registered backbones. Builders import timm lazily so that listing names stays cheap.

ResNets are built with `zero_init_last=False`: timm's default zero-initialises the last norm of
every residual block, which makes a randomly initialised network's features nearly useless and a
random-init baseline unfair (docs/evaluation.md, "Baselines"). Pass `zero_init_last=True` to get timm's.
"""

from __future__ import annotations

from selfsup.backbones.registry import register_backbone


def _timm(model_name: str, **kwargs):
    import timm

    kwargs.setdefault("num_classes", 0)  # a fine-tuned network carries its classifier (num_classes=K)
    return timm.create_model(model_name, pretrained=False, **kwargs)


def _resnet(timm_name: str, kwargs: dict):
    kwargs.setdefault("zero_init_last", False)
    return _timm(timm_name, **kwargs)


@register_backbone("resnet18", family="convnet", timm_name="resnet18", description="ResNet-18 (timm)")
def resnet18(**kw):
    return _resnet("resnet18", kw)


@register_backbone("resnet50", family="convnet", timm_name="resnet50", description="ResNet-50 (timm)")
def resnet50(**kw):
    return _resnet("resnet50", kw)


for _name, _timm_name in [
    ("convnext_atto", "convnext_atto"),
    ("convnext_t", "convnext_tiny"),
    ("convnext_s", "convnext_small"),
    ("convnext_b", "convnext_base"),
]:
    register_backbone(_name, family="convnet", timm_name=_timm_name, description=f"{_timm_name} (timm)")(
        lambda _n=_timm_name, **kw: _timm(_n, **kw)
    )

for _name, _timm_name in [
    ("vit_t", "vit_tiny_patch16_224"),
    ("vit_s", "vit_small_patch16_224"),
    ("vit_b", "vit_base_patch16_224"),
]:
    register_backbone(
        _name, family="vit", timm_name=_timm_name, description=f"{_timm_name} (timm); img_size/patch_size overridable"
    )(lambda _n=_timm_name, **kw: _timm(_n, **kw))


def _small(timm_name: str, kwargs: dict):
    import selfsup.backbones.small  # noqa: F401  (registers the selfsup_* names in timm)

    return _timm(timm_name, **kwargs)


# Small networks for CPU work at 32 px: ResNets with a 3x3 stride-1 stem and no max-pool (the usual
# CIFAR stem), registered in timm's own registry too (selfsup.backbones.small) so that exported
# weights load with timm.create_model("selfsup_<name>") after `import selfsup.backbones.small`.
for _name, _desc in [
    ("resnet18_s1", "ResNet-18, 3x3 stride-1 stem (CIFAR-style)"),
    ("resnet10_s1", "ResNet-10 (1 block per stage), widths 64-128-256-512, 3x3 stride-1 stem"),
    ("resnet10_s1_w32", "ResNet-10 (1 block per stage), widths 32-64-128-256, 3x3 stride-1 stem"),
    ("resnet_tiny", "tests: ResNet, 1 block per stage, widths 8-16-32-64, stride-1 stem"),
    ("convnet4", "plain CPU convnet: 4 x (conv3x3-BN-ReLU-maxpool), widths 32-64-128-256"),
    ("nature_cnn", "Atari: the Nature DQN torso (3 convs, 32-64-64) and a 512-d linear layer, 84 px stacks"),
]:
    register_backbone(_name, family="convnet", timm_name=f"selfsup_{_name}", description=_desc)(
        lambda _n=_name, **kw: _small(f"selfsup_{_n}", kw)
    )

register_backbone(
    "convnext_tiny_test", family="convnet", timm_name="convnext_atto", description="tests: ConvNeXt, dims 16-32-64-128",
    depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
)(lambda **kw: _timm("convnext_atto", **kw))

register_backbone(
    "vit_tiny_test", family="vit", timm_name="vit_tiny_patch16_224", description="tests: ViT, dim 32, depth 2, 32 px patch 4",
    img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
)(lambda **kw: _timm("vit_tiny_patch16_224", **kw))


def _cct(timm_name: str, kwargs: dict):
    import selfsup.backbones.cct  # noqa: F401  (registers the selfsup_cct_* names in timm)

    return _timm(timm_name, **kwargs)


# ConTraCon's compact convolutional transformers (selfsup/backbones/cct.py), 32 px unless noted;
# the re-weighting of selfsup/continual works on these and on the ViTs above
for _name, _variant, _desc in [
    ("cct_6", "cct_6_3x1", "CCT-6 (ConTraCon, CIFAR): 1 tokenizer conv 3x3, 32 px -> 256 tokens, 256-d, 4 heads"),
    ("cct_6_3x1", "cct_6_3x1", "CCT-6, 1 tokenizer conv 3x3 (same as cct_6)"),
    ("cct_6_3x2", "cct_6_3x2", "CCT-6, 2 tokenizer convs 3x3: 32 px -> 64 tokens (CPU-sized)"),
    ("cct_7_3x1", "cct_7_3x1", "CCT-7 (ConTraCon, 5-datasets): 1 tokenizer conv 3x3, 32 px"),
    ("cct_7_3x2", "cct_7_3x2", "CCT-7, 2 tokenizer convs 3x3: 32 px -> 64 tokens"),
    ("cct_6_5x2", "cct_6_5x2", "CCT-6 (ConTraCon, TinyImageNet): 2 tokenizer convs 5x5, use img_size=64"),
    ("cct_6_3x3", "cct_6_3x3", "CCT-6 (ConTraCon, ImageNet-100): 3 tokenizer convs 3x3, use img_size=224"),
    ("cct_tiny_test", "cct_tiny_test", "tests: CCT, 2 layers, 32-d, 2 heads, 32 px"),
]:
    register_backbone(_name, family="vit", timm_name=f"selfsup_{_variant}", description=_desc)(
        lambda _n=_variant, **kw: _cct(f"selfsup_{_n}", kw)
    )
