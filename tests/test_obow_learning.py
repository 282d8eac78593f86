"""OBoW learns: a short pretraining run of the CPU recipe (convnet4, 32 px Fashion-MNIST) beats the
strongest baseline (the same backbone at random init, and raw pixels) in a linear probe on the
held-out test split. Same protocol as tests/test_learning.py (probe fitted on 10,000 train images;
the std of a top-1 difference on 10,000 test images is about 0.4 points, so the margin below cannot
pass by chance)."""

import pytest

from conftest import run_submit
from selfsup.data.shards import builtin_shards
from selfsup.eval.probe import run_probe

BACKBONE = "convnet4"
STEPS = STEPS_PLACEHOLDER
MARGIN = MARGIN_PLACEHOLDER


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_obow_beats_random_init_and_pixels(tmp_path):
    train = builtin_shards("fashion_mnist", "train")
    probe_args = ["data=fashion_mnist", f"data.train={train}/train-{{000000..000001}}.tar"]  # 10k train images
    run_submit("pretrain", "obow", BACKBONE, "data=fashion_mnist", f"trainer.max_steps={STEPS}",
               "trainer.enable_progress_bar=false", f"run_dir={tmp_path}", "run_name=r", timeout=1800, check=True)
    pretrained = run_probe(str(tmp_path / "r"), probe_args)
    random_init = run_probe(f"random:{BACKBONE}", probe_args)
    pixels = run_probe("pixels", probe_args)
    assert pretrained["test_samples"] == 10000 and pretrained["train_samples"] == 10000
    best = max(random_init["linear"]["top1"], pixels["linear"]["top1"])
    print(f"obow {pretrained['linear']['top1']:.2f}  random {random_init['linear']['top1']:.2f}  "
          f"pixels {pixels['linear']['top1']:.2f}")
    assert pretrained["linear"]["top1"] >= best + MARGIN
