import pytest
import torch

from selfsup.backbones import backbone_names, create_backbone, get_spec, register_backbone
from selfsup.core.errors import UserError

REQUIRED = ["resnet18", "resnet50", "convnext_atto", "convnext_t", "convnext_s", "convnext_b", "vit_t", "vit_s", "vit_b"]


def small_kwargs(name):
    # ViTs take the image size and patch size as overrides; 32 px inputs keep the test fast
    return {"img_size": 32, "patch_size": 4} if get_spec(name).family == "vit" and name != "vit_tiny_test" else {}


def test_required_names_are_registered():
    assert set(REQUIRED) <= set(backbone_names())


@pytest.mark.parametrize("name", backbone_names())
def test_common_face(name):
    torch.manual_seed(0)
    backbone = create_backbone(name, **small_kwargs(name)).eval()
    size = 32 if backbone.family == "vit" else max(32, backbone.min_image_size())  # the Nature DQN needs 36
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        pooled = backbone(x)
        features = backbone.forward_features(x)
    assert pooled.shape == (2, backbone.num_features)
    assert torch.isfinite(pooled).all()
    assert backbone.family == get_spec(name).family
    if backbone.family == "convnet":
        assert features.shape[1] == backbone.stage_channels[-1]
        stages = backbone.forward_stages(x)
        assert [s.shape[1] for s in stages] == backbone.stage_channels
        assert [tuple(s.shape[-2:]) for s in stages] == backbone.stage_sizes(size)
        # padded convolutions divide the size by the stride; unpadded ones (the Nature DQN's) shrink it more
        assert all(s.shape[-1] <= -(-size // stride) for s, stride in zip(stages, backbone.stage_strides, strict=True))
        assert backbone.stage_strides == sorted(backbone.stage_strides)
        if name != "nature_cnn":
            assert [size // s.shape[-1] for s in stages] == backbone.stage_strides
    else:
        assert features.shape[-1] == backbone.num_features
        with pytest.raises(TypeError):
            backbone.forward_stages(x)


def test_weights_keep_timm_key_names():
    backbone = create_backbone("resnet18")
    keys = list(backbone.timm_state_dict())
    assert "conv1.weight" in keys and "layer4.1.bn2.running_var" in keys
    assert not any(k.startswith(("backbone.", "net.", "module.")) for k in keys)
    assert not any(k.startswith("fc.") for k in keys)


def test_vit_image_and_patch_size_are_overridable():
    vit = create_backbone("vit_t", img_size=84, patch_size=8)
    tokens = vit.forward_features(torch.randn(1, 3, 84, 84))
    assert tokens.shape == (1, 1 + (84 // 8) ** 2, 192)


def test_resnets_are_built_without_zero_init_last():
    # timm's default zero-initialises each block's last BN, which cripples random-init baselines
    block = create_backbone("resnet18").net.layer1[0]
    assert torch.all(block.bn2.weight == 1)
    block = create_backbone("resnet18", zero_init_last=True).net.layer1[0]
    assert torch.all(block.bn2.weight == 0)


def test_stride1_stem_keeps_full_resolution():
    backbone = create_backbone("resnet10_s1_w32")
    assert backbone.stage_strides == [1, 2, 4, 8]
    assert backbone.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4


def test_unknown_name_names_the_closest():
    with pytest.raises(UserError, match="did you mean 'resnet50'"):
        create_backbone("resnet5")
    with pytest.raises(UserError) as err:
        create_backbone("nosuchnet")
    assert "did you mean" in str(err.value) and "\n" not in str(err.value)


def test_registering_twice_is_refused():
    with pytest.raises(ValueError):
        register_backbone("resnet18", family="convnet", timm_name="resnet18")(lambda **kw: None)


def test_checking_the_image_size_leaves_the_weights_and_statistics_as_they_are():
    """The size check traces a real network (the probe checks a loaded backbone): its BatchNorm
    running statistics and its weights must not move."""
    import torch

    from selfsup.backbones import create_backbone

    backbone = create_backbone("resnet_tiny").train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.check_image_size(32)
    assert backbone.training
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
