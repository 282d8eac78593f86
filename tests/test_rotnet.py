"""RotNet against the paper's definition: all 4 rotations per image, label k = rot90 by k, mean CE (ln 4 untrained)."""

import math

import torch

from selfsup.launch.config import compose
from selfsup.ssl.rotnet import RotNet, all_rotations, rotate, rotation_loss


def test_four_rotations_per_image_image_major():
    images = torch.randn(5, 3, 8, 8)
    inputs, labels = all_rotations(images)
    assert inputs.shape == (20, 3, 8, 8)
    assert labels.tolist() == [0, 1, 2, 3] * 5
    assert torch.bincount(labels).tolist() == [5, 5, 5, 5]
    for i in range(5):
        for k in range(4):
            assert torch.equal(inputs[4 * i + k], torch.rot90(images[i], k, (1, 2)))


def test_rotation_convention_and_exactness():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    assert torch.equal(rotate(x, 1), torch.rot90(x, 1, (-2, -1)))
    # label 1 is 90 degrees counter-clockwise: the top-right pixel goes to the top-left
    assert rotate(x, 1)[0, 0, 0, 0] == x[0, 0, 0, -1]
    assert torch.equal(rotate(rotate(rotate(rotate(x, 1), 1), 1), 1), x)
    assert rotate(x, 1).shape[-2:] == (6, 4) and rotate(x, 3).shape[-2:] == (6, 4)
    assert rotate(x, 2).shape[-2:] == (4, 6)


def test_untrained_loss_is_ln4():
    torch.manual_seed(0)
    cfg = compose("rotnet", "resnet_tiny", ["method.online_probe=false"])
    model = RotNet(cfg)
    out = model.pretext_step({"image": torch.randn(8, 3, 32, 32), "label": torch.full((8,), -1)})
    assert abs(out["loss"].item() - math.log(4)) < 0.02


def test_loss_is_mean_cross_entropy():
    logits = torch.randn(12, 4)
    labels = torch.arange(4).repeat(3)
    expected = -torch.log_softmax(logits, 1)[torch.arange(12), labels].mean()
    assert torch.allclose(rotation_loss(logits, labels), expected)


def test_pretext_never_reads_class_labels():
    cfg = compose("rotnet", "resnet_tiny", ["method.online_probe=false"])
    torch.manual_seed(0)
    model = RotNet(cfg).eval()
    images = torch.randn(4, 3, 32, 32)
    a = model.pretext_step({"image": images, "label": torch.tensor([0, 1, 2, 3])})
    b = model.pretext_step({"image": images, "label": torch.zeros(4, dtype=torch.long)})
    assert torch.equal(a["pictures"]["inputs"], b["pictures"]["inputs"])
    assert torch.equal(a["pictures"]["labels"], b["pictures"]["labels"])
    assert torch.equal(a["loss"], b["loss"])
