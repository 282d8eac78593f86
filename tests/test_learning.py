"""RotNet learns: a short pretraining run beats the strongest baseline (the same backbone at random
init, and raw pixels) in a linear probe on held-out Fashion-MNIST.

The budget is short for CI; the margin asserted is smaller than the 15-minute one reported in the
README but far outside the noise of a probe on 10,000 test images (std of a top-1 difference there
is about 0.4 points). Measured here: 300 steps -> 85.3 vs random init 83.5 (probe on 10k train images).
"""

import pytest

from conftest import run_submit
from selfsup.data.shards import builtin_shards
from selfsup.eval.probe import run_probe

BACKBONE = "convnet4"  # the plain CPU convnet: ~300 RotNet steps are minutes on 2 cores
STEPS = 300
MARGIN = 1.0


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_rotnet_beats_random_init_and_pixels(tmp_path):
    train = builtin_shards("fashion_mnist", "train")
    probe_args = ["data=fashion_mnist", f"data.train={train}/train-{{000000..000001}}.tar"]  # 10k train images
    # fp32: the margin was calibrated in fp32 (85.3 vs 83.5); in bf16 one run of two fell below it
    run_submit("pretrain", "rotnet", BACKBONE, f"trainer.max_steps={STEPS}", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
               f"run_dir={tmp_path}", "run_name=r", timeout=1800, check=True)
    pretrained = run_probe(str(tmp_path / "r"), probe_args)
    random_init = run_probe(f"random:{BACKBONE}", probe_args)
    pixels = run_probe("pixels", probe_args)
    assert pretrained["test_samples"] == 10000 and pretrained["train_samples"] == 10000
    best = max(random_init["linear"]["top1"], pixels["linear"]["top1"])
    print(f"rotnet {pretrained['linear']['top1']:.2f}  random {random_init['linear']['top1']:.2f}  "
          f"pixels {pixels['linear']['top1']:.2f}")
    assert pretrained["linear"]["top1"] >= best + MARGIN
