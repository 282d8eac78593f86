"""Methods learn: a short pretraining run beats the strongest baseline (the same backbone at random
init, and raw pixels) in a linear probe on held-out Fashion-MNIST.

The budgets are short for CI; the margins asserted are smaller than the 15-minute ones reported in
the README but far outside the noise of a probe top-1 difference (std about 0.4 points on 10,000 test
images).
"""

import pytest

from conftest import run_submit
from selfsup.data.shards import builtin_shards
from selfsup.eval.probe import run_probe


# with 10k train images: the 150 L-BFGS iterations the margins were calibrated with (the converged
# default, 1000, costs minutes more per probe)
CALIBRATED_PROBE = "probe.max_iter=150"


def pretrain_and_probe(tmp_path, method: str, backbone: str, overrides: list[str], probe_args: list[str]) -> dict:
    """Linear-probe top-1 of the pretrained run, the same backbone at random init, and raw pixels."""
    run_submit("pretrain", method, backbone, *overrides, "trainer.enable_progress_bar=false",
               f"run_dir={tmp_path}", "run_name=r", timeout=1800, check=True)
    pretrained = run_probe(str(tmp_path / "r"), probe_args)
    random_init = run_probe(f"random:{backbone}", probe_args)
    pixels = run_probe("pixels", probe_args)
    top1 = {"pretrained": pretrained["linear"]["top1"], "random": random_init["linear"]["top1"],
            "pixels": pixels["linear"]["top1"], "samples": (pretrained["train_samples"], pretrained["test_samples"])}
    print(f"{method} {backbone}: " + "  ".join(f"{k} {v:.2f}" for k, v in top1.items() if k != "samples"))
    return top1


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_rotnet_beats_random_init_and_pixels(tmp_path):
    """300 RotNet steps of the plain convnet4. Measured: 85.3 vs random init 83.5 (probe on 10k train images)."""
    train = builtin_shards("fashion_mnist", "train")
    probe_args = ["data=fashion_mnist", f"data.train={train}/train-{{000000..000001}}.tar", CALIBRATED_PROBE]
    # fp32: the margin was calibrated in fp32 (85.3 vs 83.5); in bf16 one run of two fell below it
    top1 = pretrain_and_probe(tmp_path, "rotnet", "convnet4", ["trainer.max_steps=300", "trainer.precision=32-true"], probe_args)
    assert top1["samples"] == (10000, 10000)
    assert top1["pretrained"] >= max(top1["random"], top1["pixels"]) + 1.0


SPARK_STEPS = 300
SPARK_MARGIN = 1.0


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_spark_beats_random_init_and_pixels(tmp_path):
    """SPARK_STEPS steps of the resnet18_s1 CPU recipe. Measured: 85.92 vs pixels 83.49 and random init 80.32.
    A probe fitted on 5,000 images favours raw pixels over the 512-d features (300 steps: +1.08 only)."""
    train = builtin_shards("fashion_mnist", "train")
    probe_args = ["data=fashion_mnist", f"data.train={train}/train-{{000000..000001}}.tar", CALIBRATED_PROBE]
    top1 = pretrain_and_probe(tmp_path, "spark", "resnet18_s1", ["data=fashion_mnist", f"trainer.max_steps={SPARK_STEPS}"], probe_args)
    assert top1["samples"] == (10000, 10000)
    assert top1["pretrained"] >= max(top1["random"], top1["pixels"]) + SPARK_MARGIN
