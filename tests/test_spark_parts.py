"""SparK's parts: masks, the sparse encoder's two backends, densify + decoder, loss (docs/methods/spark.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selfsup.backbones import create_backbone
from selfsup.ssl.spark import sparse_encoder
from selfsup.ssl.spark.decoder import Densify, LightDecoder, densify_norm_for, level_widths
from selfsup.ssl.spark.loss import (
    patch_statistics,
    patchify,
    reconstruction_picture,
    spark_loss,
    unpatchify,
)
from selfsup.ssl.spark.masking import num_visible, random_visible_mask, upsample_mask
from selfsup.ssl.spark.sparse_encoder import SparseEncoder, batch_norm_rows

needs_spconv = pytest.mark.skipif(  # spconv is optional: the gather engine needs nothing
    sparse_encoder.spconv_or_reason()[0] is None, reason="spconv cannot be imported here"
)


def _mask_for(backbone, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    grid = images.shape[-1] // backbone.total_stride
    return random_visible_mask(images.shape[0], grid, grid, 0.6, generator=torch.Generator().manual_seed(seed))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------- masks


def test_224_px_at_ratio_06_keeps_exactly_20_of_49_cells():
    assert num_visible(7, 7, 0.6) == 20
    active = random_visible_mask(64, 7, 7, 0.6, generator=torch.Generator().manual_seed(0))
    assert active.shape == (64, 1, 7, 7) and active.dtype == torch.bool
    assert (active.flatten(1).sum(1) == 20).all()
    # uniform choice: every cell is visible about 20/49 of the time, and images differ
    assert len({tuple(a.flatten().tolist()) for a in active}) == 64
    frequency = random_visible_mask(4000, 7, 7, 0.6, generator=torch.Generator().manual_seed(1)).float().mean(0)
    assert (frequency - 20 / 49).abs().max() < 0.04


def test_masks_are_reproducible_from_a_generator():
    first = random_visible_mask(8, 4, 4, 0.75, generator=torch.Generator().manual_seed(3))
    again = random_visible_mask(8, 4, 4, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and (first.flatten(1).sum(1) == 4).all()


def test_upsample_mask_repeats_each_cell():
    active = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)
    up = upsample_mask(active, (6, 6))
    assert torch.equal(up, nn.functional.interpolate(active.float(), size=(6, 6), mode="nearest").bool())
    assert up[0, 0, :3, :3].all() and not up[0, 0, :3, 3:].any()
    with pytest.raises(ValueError):
        upsample_mask(active, (5, 6))


# -------------------------------------------------------------------------------- sparse encoder


# (backend, conv engine) pairs
VARIANTS = [("masked", "gather"), ("sparse", "gather"), pytest.param("sparse", "spconv", marks=needs_spconv)]
SPARSE_ENGINES = ["gather"] + (["spconv"] if sparse_encoder.spconv_or_reason()[0] is not None else [])


@pytest.mark.parametrize("backend, engine", VARIANTS)
@pytest.mark.parametrize("name, pixels", [("resnet18", 64), ("convnext_atto", 64), ("resnet_tiny", 32)])
def test_masked_input_pixels_cannot_reach_visible_outputs(name, pixels, backend, engine):
    torch.manual_seed(0)
    backbone = create_backbone(name)
    encoder = SparseEncoder(backbone, backend, engine)
    images = torch.randn(2, 3, pixels, pixels)
    active = _mask_for(backbone, images)
    pixel_mask = upsample_mask(active, images.shape[-2:])
    garbage = torch.where(pixel_mask, images, 1e3 * torch.randn_like(images))
    with torch.no_grad():
        clean, dirty = encoder(images, active), encoder(garbage, active)
    for stage, (a, b) in enumerate(zip(clean, dirty)):
        mask = upsample_mask(active, a.shape[-2:]).expand_as(a)
        assert torch.equal(a, b), f"stage {stage} changed"
        assert (a[~mask] == 0).all(), f"stage {stage} is not zero where masked"
        assert (a[mask] != 0).float().mean() > 0.25  # the visible sites computed something (ReLU zeros half)


def _stages_and_gradients(encoder: SparseEncoder, images, active):
    backbone = encoder.backbone
    backbone.zero_grad(set_to_none=True)
    stages = encoder(images, active)
    # a random linear read-out of every stage, the same for both backends
    readout = torch.Generator().manual_seed(7)
    loss = sum((s * torch.randn(s.shape, generator=readout, dtype=s.dtype)).sum() for s in stages)
    loss.backward()
    gradients = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
    return [s.detach() for s in stages], gradients


# float64 for ResNet-50: with random weights its backward amplifies float32 rounding (the backends
# sum in different orders) to ~1% relative error in the gradients, while in float64 the two
# backends agree to 1e-12 -- the same function, with float32 too chaotic to show it at 1e-3.
EQUIVALENCE_CASES = [
    ("resnet18", 64, torch.float32),
    ("resnet50", 64, torch.float64),
    ("convnext_atto", 64, torch.float32),
    ("convnext_b", 64, torch.float32),
    ("resnet_tiny", 32, torch.float32),  # stride-1 stem, total stride 8
]


@pytest.mark.parametrize("name, pixels, dtype", EQUIVALENCE_CASES)
def test_sparse_and_masked_backends_agree(name, pixels, dtype):
    torch.manual_seed(0)
    backbone = create_backbone(name).to(dtype)
    images = torch.randn(2, 3, pixels, pixels, dtype=dtype)
    active = _mask_for(backbone, images, seed=1)
    running = {n: b.clone() for n, b in backbone.named_buffers()}

    masked_stages, masked_grads = _stages_and_gradients(SparseEncoder(backbone, "masked"), images, active)
    masked_running = {n: b.clone() for n, b in backbone.named_buffers()}
    assert len(masked_grads) > 10
    for engine in SPARSE_ENGINES:
        for n, b in backbone.named_buffers():
            b.copy_(running[n])
        sparse = SparseEncoder(backbone, "sparse", engine)
        assert sparse.conv_engine_for(images.device) == engine
        sparse_stages, sparse_grads = _stages_and_gradients(sparse, images, active)

        assert [s.shape[1] for s in sparse_stages] == backbone.stage_channels
        for stage, (m, s) in enumerate(zip(masked_stages, sparse_stages)):
            mask = upsample_mask(active, s.shape[-2:]).expand_as(s)
            assert (s[~mask] == 0).all() and (m[~mask] == 0).all(), f"{engine}: stage {stage} not zero where masked"
            assert _relative_error(s[mask], m[mask]) < 1e-4, f"{engine}: stage {stage}"
        assert masked_grads.keys() == sparse_grads.keys()
        worst = max(masked_grads, key=lambda n: _relative_error(sparse_grads[n], masked_grads[n]))
        assert _relative_error(sparse_grads[worst], masked_grads[worst]) < 1e-3, f"{engine}: {worst}"
        for n, b in backbone.named_buffers():  # BatchNorm running statistics too
            if b.is_floating_point():
                assert _relative_error(b, masked_running[n]) < 1e-4, f"{engine}: {n}"


@pytest.mark.parametrize("engine", SPARSE_ENGINES)
def test_sparse_backend_is_deterministic_with_two_threads(engine):
    # spconv 2.3's CPU scatter-add races between OpenMP threads (spconv_compat patches it): without
    # the patch the spconv engine fails this in most runs
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        backbone = create_backbone("resnet18")
        encoder = SparseEncoder(backbone, "sparse", engine)
        images = torch.randn(2, 3, 128, 128)
        active = _mask_for(backbone, images)
        with torch.no_grad():
            reference = encoder(images, active)[-1]
            for _ in range(6):
                assert torch.equal(encoder(images, active)[-1], reference)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend, engine", VARIANTS)
def test_encoder_uses_the_backbones_parameters_and_changes_no_keys(backend, engine):
    backbone = create_backbone("convnext_atto")
    keys = list(backbone.net.state_dict())
    encoder = SparseEncoder(backbone, backend, engine)
    assert [id(p) for p in encoder.parameters()] == [id(p) for p in backbone.parameters()]
    assert [n for n, _ in encoder.named_parameters()] == [f"backbone.{n}" for n, _ in backbone.named_parameters()]
    images = torch.randn(2, 3, 64, 64)
    encoder(images, _mask_for(backbone, images))
    assert list(backbone.net.state_dict()) == keys


def _bn_with_stats(channels: int, momentum) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    return bn


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_rows_equals_batch_norm_1d(momentum):
    rows = torch.randn(37, 5) * 3 + 1
    bn2d = _bn_with_stats(5, momentum)
    bn1d = nn.BatchNorm1d(5, momentum=momentum)
    bn1d.load_state_dict(bn2d.state_dict())
    for _ in range(2):
        assert torch.allclose(batch_norm_rows(bn2d, rows), bn1d(rows), atol=1e-6)
    for key, value in bn1d.state_dict().items():
        assert torch.allclose(bn2d.state_dict()[key], value), key
    bn2d.eval(), bn1d.eval()
    assert torch.allclose(batch_norm_rows(bn2d, rows), bn1d(rows), atol=1e-6)


@pytest.mark.parametrize("backend, engine", VARIANTS)
def test_running_stats_come_from_visible_positions_only(backend, engine):
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny")
    net = backbone.net
    images = torch.randn(4, 3, 32, 32)
    active = _mask_for(backbone, images)
    expected = nn.BatchNorm1d(net.bn1.num_features)
    expected.load_state_dict(net.bn1.state_dict())
    with torch.no_grad():  # BN1d on the stem conv's features at the visible pixels
        stem = net.conv1(images * upsample_mask(active, images.shape[-2:]))
        expected(stem.permute(0, 2, 3, 1)[upsample_mask(active, stem.shape[-2:])[:, 0]])
        SparseEncoder(backbone, backend, engine)(images, active)
    assert torch.allclose(net.bn1.running_mean, expected.running_mean, atol=1e-6)
    assert torch.allclose(net.bn1.running_var, expected.running_var, atol=1e-5)
    dense = nn.BatchNorm2d(net.bn1.num_features)  # all positions would give other statistics
    dense(stem)
    assert not torch.allclose(net.bn1.running_var, dense.running_var, atol=1e-3)


def test_spconv_engine_without_spconv_warns_and_gathers(monkeypatch):
    monkeypatch.setattr(sparse_encoder, "spconv_or_reason", lambda: (None, "spconv missing in this test"))
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny")
    images = torch.randn(2, 3, 32, 32)
    active = _mask_for(backbone, images)
    encoder = SparseEncoder(backbone, "sparse", "spconv")
    with pytest.warns(RuntimeWarning, match="spconv missing in this test"):
        assert encoder.conv_engine_for(images.device) == "gather"
    with torch.no_grad():
        sparse, masked = encoder(images, active), SparseEncoder(backbone, "masked")(images, active)
    for a, b in zip(sparse, masked):
        assert torch.allclose(a, b, atol=1e-5)


def test_encoder_rejects_mismatched_sizes_and_vits():
    backbone = create_backbone("resnet_tiny")
    with pytest.raises(ValueError, match="does not match"):
        SparseEncoder(backbone)(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="convnet"):
        SparseEncoder(create_backbone("vit_tiny_test"))


# ------------------------------------------------------------------------------ densify + decoder


@pytest.mark.parametrize("name, pixels", [("resnet18", 64), ("convnext_atto", 64), ("resnet_tiny", 32)])
def test_decoder_output_has_the_input_shape(name, pixels):
    torch.manual_seed(0)
    backbone = create_backbone(name)
    images = torch.randn(2, 3, pixels, pixels)
    active = _mask_for(backbone, images)
    densify = Densify(backbone.stage_channels, width=64, norm=densify_norm_for(backbone))
    decoder = LightDecoder(backbone.total_stride, width=64)
    assert len(decoder.blocks) == round(math.log2(backbone.total_stride))
    levels = densify(SparseEncoder(backbone, "masked")(images, active), active)
    assert [lv.shape[1] for lv in levels] == level_widths(64, 4)
    reconstruction = decoder(levels)
    assert reconstruction.shape == images.shape
    spark_loss(reconstruction, images, active, backbone.total_stride).backward()
    assert all(p.grad is not None for p in [*densify.parameters(), *decoder.parameters()])


def test_decoder_shapes_at_224_follow_the_spec():
    decoder = LightDecoder(32, width=768)
    assert [b.upsample.in_channels for b in decoder.blocks] == [768, 384, 192, 96, 48]
    assert decoder.head.in_channels == 24 and decoder.head.out_channels == 3
    densify = Densify([128, 256, 512, 768], width=768, norm="ln")
    assert isinstance(densify.projections[0], nn.Identity)  # widths match: no projection
    assert [p.kernel_size for p in densify.projections[1:]] == [(3, 3)] * 3
    assert [p.out_channels for p in densify.projections[1:]] == [384, 192, 96]
    assert Densify([8, 16, 32, 64], width=768).projections[0].kernel_size == (1, 1)


def test_decoder_and_mask_token_initialisation():
    torch.manual_seed(0)
    decoder = LightDecoder(32, width=256)
    conv = decoder.blocks[0].conv[0]
    assert abs(conv.weight.std().item() - 0.02) < 0.002 and (conv.weight.mean().abs() < 0.002)
    transposed = decoder.blocks[0].upsample  # Kaiming normal, fan-out: std sqrt(2 / (out * 4 * 4))
    assert abs(transposed.weight.std().item() - math.sqrt(2 / (256 * 16))) < 0.003
    assert (transposed.bias == 0).all() and (decoder.head.bias == 0).all()
    bn = decoder.blocks[0].conv[1]
    assert (bn.weight == 1).all() and (bn.bias == 0).all()
    tokens = torch.cat([t.flatten() for t in Densify([64, 128, 256, 512], width=256).mask_tokens])
    assert tokens.abs().max() <= 0.02 and tokens.std() > 0.005


@pytest.mark.parametrize("sync_bn", [False, True], ids=["bn", "syncbn"])
def test_densify_norms_visible_sites_and_fills_mask_tokens(sync_bn):
    torch.manual_seed(0)
    densify = Densify([6], width=6, norm="bn")  # one level, identity projection
    if sync_bn:  # what a distributed run does to every BatchNorm
        densify = nn.SyncBatchNorm.convert_sync_batchnorm(densify)
    active = random_visible_mask(3, 4, 4, 0.5, generator=torch.Generator().manual_seed(0))
    fmap = torch.randn(3, 6, 4, 4) * upsample_mask(active, (4, 4))
    out = densify([fmap], active)[0]
    mask = active.expand_as(out)
    expected = nn.BatchNorm1d(6)(fmap.permute(0, 2, 3, 1)[active[:, 0]])
    assert torch.allclose(out.permute(0, 2, 3, 1)[active[:, 0]], expected, atol=1e-5)
    token = densify.mask_tokens[0].expand_as(out)
    assert torch.equal(out[~mask], token[~mask])


# --------------------------------------------------------------------------------------------- loss


def test_patchify_order_is_row_column_channel_and_unpatchify_inverts_it():
    images = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # patch 4 = row 1, column 1; its value 5 = pixel (0, 1) in the patch, channel 2
    assert patches[1, 4, (0 * 4 + 1) * 3 + 2] == images[1, 2, 4, 5]
    assert torch.equal(unpatchify(patches, 4, (2, 3)), images)


def _spec_loss(pred, target, active, patch):
    """Mean over masked patches of mean((pred - (y - mean y) / sqrt(var y + 1e-6))^2), patch by patch."""
    b, _, h, w = target.shape
    total, count = 0.0, 0
    for i in range(b):
        for r in range(h // patch):
            for c in range(w // patch):
                if active[i, 0, r, c]:
                    continue
                y = target[i, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch].permute(1, 2, 0).flatten()
                p = pred[i, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch].permute(1, 2, 0).flatten()
                normalised = (y - y.mean()) / torch.sqrt(y.var(unbiased=True) + 1e-6)
                total, count = total + ((p - normalised) ** 2).mean(), count + 1
    return total / count


def test_loss_matches_the_spec_formula():
    torch.manual_seed(0)
    target, pred = torch.randn(2, 3, 16, 16) * 2 + 1, torch.randn(2, 3, 16, 16)
    active = random_visible_mask(2, 4, 4, 0.6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(spark_loss(pred, target, active, 4), _spec_loss(pred, target, active, 4), atol=1e-6)


def test_loss_ignores_visible_patches_and_is_zero_at_the_normalised_target():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 64, 64)
    active = random_visible_mask(2, 2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    pred = torch.randn(2, 3, 64, 64)
    visible = upsample_mask(active, (64, 64))
    loss = spark_loss(pred, target, active, 32)
    assert loss > 0.5
    altered = torch.where(visible, 100 * torch.randn_like(pred), pred)
    assert torch.allclose(spark_loss(altered, target, active, 32), loss)
    mean, std = patch_statistics(patchify(target, 32))
    normalised_target = unpatchify((patchify(target, 32) - mean) / std, 32, (2, 2))
    perfect_on_masked = torch.where(visible, pred, normalised_target)
    assert spark_loss(perfect_on_masked, target, active, 32).abs() < 1e-10
    # and the picture shows the input everywhere when the prediction is perfect
    assert torch.allclose(reconstruction_picture(perfect_on_masked, target, active, 32), target, atol=1e-4)
