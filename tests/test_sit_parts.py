"""SiT v1's pure parts against the July 2021 code's formulas (docs/methods/sit.md) and their properties: rotations,
the uncertainty weighting, NT-Xent, the reconstruction head and loss, and the batched corruptions."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from selfsup.ssl.sit.corruption import (block_mask, blur_per_image, corrupt, gaussian_kernels, random_rectangles,
                                        random_rotations, rotate_v1)
from selfsup.ssl.sit.heads import ReconstructionHead
from selfsup.ssl.sit.loss import (TASK_SCALES, nt_xent, optimal_s, reconstruction_loss, rotation_loss, sit_loss,
                                  task_factors, uncertainty_weighted)

# ---- 1. rotations ----------------------------------------------------------------------------


def test_rotation_labels_follow_v1_clockwise_convention():
    x = torch.arange(3 * 5 * 5, dtype=torch.float32).reshape(1, 3, 5, 5)
    one = torch.ones(1, dtype=torch.long)
    # label 1 is 90 degrees clockwise: the top-left pixel goes to the top-right, the bottom-left to the top-left
    assert rotate_v1(x, one)[0, 0, 0, -1] == x[0, 0, 0, 0] and rotate_v1(x, one)[0, 0, 0, 0] == x[0, 0, -1, 0]
    # label 3 is 90 degrees counter-clockwise: the top-right pixel goes to the top-left
    assert rotate_v1(x, 3 * one)[0, 0, 0, 0] == x[0, 0, 0, -1]
    for label, k in [(0, 0), (1, 3), (2, 2), (3, 1)]:  # v1's labels: label 1 = rot90(x, 3, (1, 2)) on CHW
        assert torch.equal(rotate_v1(x, label * one)[0], torch.rot90(x[0], k, (1, 2)))
    assert torch.equal(rotate_v1(rotate_v1(x, one), 3 * one), x)


def test_each_image_gets_its_own_rotation_and_labels_are_uniform():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40000, 1, 2, 2, generator=g)
    rotated, labels = random_rotations(x, generator=g)
    counts = torch.bincount(labels, minlength=4)
    assert counts.sum() == 40000 and (counts - 10000).abs().max() < 4 * math.sqrt(40000 * 0.25 * 0.75)
    for i in range(0, 40000, 997):
        assert torch.equal(rotated[i], rotate_v1(x[i:i + 1], labels[i:i + 1])[0])


def test_a_perfect_rotation_prediction_gives_zero_loss():
    labels = torch.tensor([0, 1, 2, 3, 3, 1])
    perfect = 100.0 * torch.nn.functional.one_hot(labels, 4).float()
    assert rotation_loss(perfect, labels).item() < 1e-6
    assert rotation_loss(torch.zeros(6, 4), labels).item() == pytest.approx(math.log(4), rel=1e-6)


# ---- 2. learned uncertainty weighting ---------------------------------------------------------


@pytest.mark.parametrize("task_loss,scale", [(0.7, 1.0), (2.3, 1.0), (0.15, 0.5), (1.6, 0.5)])
def test_uncertainty_optimum_is_ln_2aL_over_a(task_loss, scale):
    s_star = optimal_s(task_loss, scale)
    assert s_star == pytest.approx(math.log(2 * scale * task_loss) / scale)
    losses = torch.tensor([task_loss], dtype=torch.float64)
    s = torch.tensor([s_star], dtype=torch.float64, requires_grad=True)
    value = uncertainty_weighted(losses, s, (scale,))
    (grad,) = torch.autograd.grad(value, s)
    assert abs(grad.item()) < 1e-6
    grid = torch.linspace(s_star - 3, s_star + 3, 6001, dtype=torch.float64)
    values = torch.exp(-scale * grid) * task_loss + 0.5 * grid
    assert grid[values.argmin()].item() == pytest.approx(s_star, abs=2e-3)  # the minimum, not only a stationary point
    assert value.item() == pytest.approx(values.min().item(), abs=1e-6)  # the loss is computed in float32


def test_uncertainty_factors_at_initialisation_and_the_combined_loss():
    s = torch.ones(3)
    factors = task_factors(s)
    assert factors.tolist() == pytest.approx([math.exp(-1), math.exp(-1), math.exp(-0.5)])
    assert factors.tolist() == pytest.approx([0.3679, 0.3679, 0.6065], abs=1e-4)
    losses = torch.tensor([1.2, 3.4, 0.8])
    s = torch.tensor([0.3, -0.2, 1.5])
    terms = zip(TASK_SCALES, s.tolist(), losses.tolist(), strict=True)
    expected = sum(math.exp(-a * si) * li + 0.5 * si for a, si, li in terms)
    assert uncertainty_weighted(losses, s).item() == pytest.approx(expected, rel=1e-6)


# ---- 3. NT-Xent --------------------------------------------------------------------------------


def reference_nt_xent(z1, z2, tau):
    """NT-Xent as defined: -log(exp(s_ip / τ) / Σ_{j≠i} exp(s_ij / τ)) per anchor, averaged (float64)."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        positive = (i + b) % n
        denominator = sum(math.exp((z[i] @ z[j]).item() / tau) for j in range(n) if j != i)
        total += -math.log(math.exp((z[i] @ z[positive]).item() / tau) / denominator)
    return total / n


def test_nt_xent_orthogonal_embeddings_exact_value():
    for b in (8, 5, 3):  # from the tensors' own batch size: no fixed mask
        z = 3.0 * torch.eye(b, 16)  # mutually orthogonal, identical views
        expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2 * b - 2))
        assert nt_xent(z, z.clone(), temperature=0.5).item() == pytest.approx(expected, rel=1e-6)
    assert nt_xent(torch.eye(8, 16), torch.eye(8, 16), 0.5).item() == pytest.approx(1.0629, abs=1e-4)


def test_nt_xent_matches_the_written_out_formula_and_is_symmetric_in_the_views():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    value = nt_xent(z1, z2, 0.5).item()
    assert value == pytest.approx(reference_nt_xent(z1, z2, 0.5), rel=1e-5)
    assert nt_xent(z2, z1, 0.5).item() == pytest.approx(value, rel=1e-6)
    assert nt_xent(z1, z2, 0.2).item() == pytest.approx(reference_nt_xent(z1, z2, 0.2), rel=1e-5)
    # at random the loss is near ln(2B - 1); aligned views bring it down
    assert nt_xent(z1, z1 + 0.01 * z2, 0.5).item() < value


def test_nt_xent_is_float32_under_autocast():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(64, 512, generator=g), torch.randn(64, 512, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sit_loss(torch.randn(128, 4), torch.zeros(128, dtype=torch.long), z1, z2, torch.zeros(2, 3, 4, 4),
                       torch.ones(2, 3, 4, 4), torch.ones(3))
    assert all(v.dtype == torch.float32 for v in out.values())
    assert out["contrastive"].item() == pytest.approx(nt_xent(z1, z2, 0.5).item(), rel=1e-6)


# ---- 4. reconstruction ---------------------------------------------------------------------------


@pytest.mark.parametrize("size,patch", [((32, 32), 4), ((224, 224), 16), ((48, 64), 8)])
def test_reconstruction_head_returns_the_input_shape(size, patch):
    h, w = size
    head = ReconstructionHead(24, (patch, patch), channels=3)
    grid = (h // patch, w // patch)
    out = head(torch.randn(2, grid[0] * grid[1], 24), grid)
    assert out.shape == (2, 3, h, w)
    with pytest.raises(ValueError):
        head(torch.randn(2, grid[0] * grid[1] + 1, 24), grid)


def test_each_token_reconstructs_its_own_patch():
    head = ReconstructionHead(8, (4, 4))
    tokens = torch.zeros(1, 6, 8)
    tokens[0, 4] = torch.randn(8)  # row 1, column 1 of a 2 x 3 grid
    out = head(tokens, (2, 3)) - head(torch.zeros(1, 6, 8), (2, 3))
    changed = out.abs().sum((0, 1)) > 0
    assert changed[4:8, 4:8].all() and changed.sum() == 16


def test_reconstruction_loss_is_zero_for_the_clean_image_and_mean_l1_otherwise():
    clean = torch.randn(4, 3, 8, 8)
    assert reconstruction_loss(clean.clone(), clean).item() == 0.0
    assert reconstruction_loss(clean + 0.5, clean).item() == pytest.approx(0.5)
    noisy = clean.clone()
    noisy[0, 0, 0, 0] += 384.0  # one pixel of 768: the mean is over every pixel
    assert reconstruction_loss(noisy, clean).item() == pytest.approx(0.5)


# ---- 5. corruption -------------------------------------------------------------------------------


def test_corruption_never_touches_the_clean_target():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(8, 3, 32, 32, generator=g)
    kept = clean.clone()
    corrupted, masks = corrupt(clean, generator=g)
    assert torch.equal(clean, kept)
    assert corrupted.data_ptr() != clean.data_ptr() and not torch.equal(corrupted, clean)
    assert set(masks) == {"gray", "blur", "noise", "replace"}
    assert all(mask.shape == (8, 1, 32, 32) and mask.dtype == torch.bool for mask in masks.values())


def test_without_blocks_only_the_gray_and_blur_rectangles_change():
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(64, 3, 32, 32, generator=g)
    corrupted, masks = corrupt(clean, noise_budget=0.0, replace_budget=0.0, generator=g)
    assert not masks["noise"].any() and not masks["replace"].any()
    inside = masks["gray"] | masks["blur"]
    changed = (corrupted != clean).any(1, keepdim=True)
    assert not (changed & ~inside).any()
    assert changed.any()
    only_gray = masks["gray"] & ~masks["blur"]  # channels equal there: the mean of the three
    mean = clean.mean(1, keepdim=True).expand_as(clean)
    assert torch.allclose(corrupted[only_gray.expand_as(clean)], mean[only_gray.expand_as(clean)])


def test_blocks_copy_from_one_other_image_at_the_same_place():
    # constant images (value = index, equal channels): gray and blur leave them as they are
    b = 16
    clean = torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 3, 32, 32).contiguous()
    g = torch.Generator().manual_seed(2)
    corrupted, masks = corrupt(clean, noise_budget=0.0, replace_budget=0.3, generator=g)
    outside = ~masks["replace"].expand_as(clean)
    assert torch.allclose(corrupted[outside], clean[outside], atol=1e-5)  # blur weights sum to 1 up to rounding
    copied_any = 0
    for i in range(b):
        region = masks["replace"][i, 0]
        if region.any():
            values = corrupted[i][:, region].round().unique()
            assert len(values) == 1 and values.item() != i and 0 <= values.item() < b  # one other source image
            copied_any += 1
    assert copied_any >= b // 2  # an image copies with probability (B-1)/B and a budget > 0


def test_noise_blocks_spend_the_budget_and_no_more_than_one_block_over():
    g = torch.Generator().manual_seed(3)
    h = w = 64
    mask = block_mask(4000, h, w, 0.3, generator=g)[:, 0]
    coverage = mask.float().mean((1, 2))
    max_block = (int(0.25 * h) - 1) * (int(0.25 * w) - 1) / (h * w)
    assert coverage.max().item() <= 0.3 + max_block
    assert (coverage > 0).all()  # a budget > 0 always gets its first block
    assert 0.08 < coverage.mean().item() < 0.15  # overlaps make the union a bit smaller than U(0, 0.3)'s mean
    assert not block_mask(8, h, w, 0.0, generator=g).any()


def test_rectangles_follow_v1_bounds():
    g = torch.Generator().manual_seed(4)
    top, bottom, left, right = random_rectangles(20000, 40, 20, generator=g)
    assert top.min() == 0 and top.max() == 40 - 2 - 1  # origin leaves at least 5 % of the side
    assert left.max() == 20 - 1 - 1
    assert ((bottom - top) >= 1).all() and (bottom <= 40).all() and (right <= 20).all()
    assert (bottom - top).max() == 39  # up to the whole side, exclusive
    top, bottom, _, _ = random_rectangles(20000, 224, 224, (3,), max_frac=0.25, generator=g)
    assert top.shape == (20000, 3)
    side = bottom - top
    assert side.min() == 11 and side.max() == 55  # blocks: [5 %, 25 %) of the side


def test_batched_blur_matches_torchvision_per_image():
    g = torch.Generator().manual_seed(5)
    images = torch.randn(4, 3, 20, 24, generator=g)
    sizes = torch.tensor([3, 7, 11, 15])
    sigmas = torch.tensor([0.1, 1.3, 2.7, 5.1])
    out = blur_per_image(images, gaussian_kernels(sizes, sigmas))
    for i in range(4):
        k, s = int(sizes[i]), float(sigmas[i])
        expected = TF.gaussian_blur(images[i:i + 1], [k, k], [s, s])
        assert torch.allclose(out[i:i + 1], expected, atol=1e-5), i


def test_corruption_is_seeded_and_unaffected_by_autocast():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    plain, _ = corrupt(images, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp, _ = corrupt(images, generator=torch.Generator().manual_seed(7))
    assert under_amp.dtype == torch.float32 and torch.equal(plain, under_amp)
    other, _ = corrupt(images, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(plain, other)
