"""Methods learn: a short pretraining run beats the strongest baseline (the same backbone at random
init, and raw pixels) in a linear probe on held-out Fashion-MNIST.

The budgets are short for CI, so the margins asserted are smaller than the 15-minute ones reported in
docs/results/. A run is reproducible from its seed on one machine, but another CPU may round differently
and then draws another run, so each margin is calibrated on several runs (docs/testing.md) and sits below the
lowest of them.
"""

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_submit
from selfsup.data.shards import builtin_shards
from selfsup.eval.probe import run_probe


# with 10k train images: the 150 L-BFGS iterations the margins were calibrated with (the converged
# default, 1000, costs minutes more per probe)
CALIBRATED_PROBE = "probe.max_iter=150"


@pytest.fixture(scope="session")
def baseline_probe(shard_cache):
    """The baselines (raw pixels, a backbone at random init) are probed once per run of the suite, in
    the cache that every pytest-xdist worker shares, and reused by every learning test that asks for
    the same probe."""

    def probe(target: str, probe_args: list[str]) -> dict:
        key = hashlib.sha256(json.dumps([target, probe_args]).encode()).hexdigest()[:16]
        path = shard_cache / "baselines" / f"{key}.json"
        path.parent.mkdir(exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits for the first one's probe
            if not path.exists():
                path.write_text(json.dumps(run_probe(target, list(probe_args)).record))
        return json.loads(path.read_text())

    return probe


@pytest.fixture(scope="session")
def shared_run(shard_cache):
    """A pretraining run made once per run of the suite, in the cache every pytest-xdist worker shares:
    the tests that read it (its probe, its fine-tuning) are one xdist group, so they follow each other
    on one worker and the second does not wait."""

    def pretrain(method: str, backbone: str, overrides: list[str]) -> Path:
        key = hashlib.sha256(json.dumps([method, backbone, overrides]).encode()).hexdigest()[:16]
        run = shard_cache / "runs" / f"{method}-{backbone}-{key}"
        run.parent.mkdir(exist_ok=True)
        with open(run.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (run / "checkpoints" / "last.ckpt").exists():
                shutil.rmtree(run, ignore_errors=True)
                run_submit("pretrain", method, backbone, *overrides, "trainer.enable_progress_bar=false",
                           f"run_dir={run.parent}", f"run_name={run.name}", timeout=1800, check=True)
        return run

    return pretrain


def pretrain_and_probe(run: Path, baseline_probe, backbone: str, probe_args: list[str],
                       random_init_build: list[str] = ()) -> dict:
    """Linear-probe top-1 of the pretrained run, the same backbone at random init (built with
    `random_init_build`, the run's backbone.kwargs where they differ from the registry's), and raw pixels."""
    pretrained = run_probe(str(run), probe_args)
    random_init = baseline_probe(f"random:{backbone}", [*probe_args, *random_init_build])
    pixels = baseline_probe("pixels", probe_args)
    top1 = {"pretrained": pretrained["linear"]["top1"], "random": random_init["linear"]["top1"],
            "pixels": pixels["linear"]["top1"], "samples": (pretrained["train_samples"], pretrained["test_samples"])}
    print(f"{run.name}: " + "  ".join(f"{k} {v:.2f}" for k, v in top1.items() if k != "samples"))
    return top1


# Seeds 0-4, one thread each as on a pytest-xdist worker of a 2-core machine, measured on 2026-12-03
# on a 2-core Intel Xeon with AVX512-BF16/AMX (pretraining in fp32, bf16 probe): 84.93 / 84.44 / 84.73 /
# 84.57 / 85.14 against pixels 83.58 and random init 83.42, margins +0.86 to +1.56 (mean +1.18, sd 0.28).
ROTNET_MARGIN = 0.5  # 2.4 sd under the mean margin, 0.36 under the lowest seed


# 300 RotNet steps of the plain convnet4, in fp32: the margins were calibrated in fp32
ROTNET_RUN = ("rotnet", "convnet4", ["trainer.max_steps=300", "trainer.precision=32-true"])


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.xdist_group("rotnet")
def test_rotnet_beats_random_init_and_pixels(shared_run, baseline_probe):
    """300 RotNet steps of the plain convnet4 in fp32 (margins above; an earlier CPU without bf16 gave
    +0.98 to +1.68 over its five seeds)."""
    train = builtin_shards("fashion_mnist", "train")
    probe_args = ["data=fashion_mnist", f"data.train={train}/train-{{000000..000001}}.tar", CALIBRATED_PROBE]
    top1 = pretrain_and_probe(shared_run(*ROTNET_RUN), baseline_probe, "convnet4", probe_args)
    assert top1["samples"] == (10000, 10000)
    assert top1["pretrained"] >= max(top1["random"], top1["pixels"]) + ROTNET_MARGIN


SPARK_STEPS = 200
# 200 steps of the resnet10_s1 CPU recipe (the resnet18_s1 recipe with decoder width 128; configs/method/
# spark.yaml) at twice its LR (2e-3, cosine over 200; one loader worker), in fp32. Seeds 0-4, one thread
# each, two side by side, measured on 2026-12-04 on a 2-core AMD EPYC without AVX-512: 84.69 / 85.28 /
# 85.79 / 85.49 / 84.75 against pixels 83.57 and random init 81.98, so +1.12 to +2.22 over pixels (mean
# +1.63, sd 0.47) and +2.71 to +3.81 over the random init (mean +3.22, sd 0.47). A SparK that learns
# nothing keeps the random init's features and fails both. The 3-point margin over pixels is the
# 15-minute resnet18_s1 curve of docs/results/spark.md, not this test's.
SPARK_RUN = ["data=fashion_mnist", f"trainer.max_steps={SPARK_STEPS}", "optim.lr=2e-3", "data.num_workers=1",
             "trainer.precision=32-true"]  # calibrated in fp32: a CPU with bf16 would otherwise draw other runs
SPARK_MARGIN_OVER_PIXELS = 0.5  # 2.4 sd under the mean margin, 0.62 under the lowest seed
SPARK_MARGIN_OVER_RANDOM = 2.0  # 2.6 sd under the mean margin, 0.71 under the lowest seed


@pytest.mark.slow
@pytest.mark.long  # started first (tests/conftest.py), RotNet's after the long ones
@pytest.mark.timeout(2400)
def test_spark_beats_random_init_and_pixels(tmp_path, baseline_probe):
    """SPARK_RUN: SPARK_STEPS steps of the resnet10_s1 CPU recipe. A probe fitted on 5,000 images
    favours raw pixels over the 512-d features, so it is fitted on 10,000."""
    train = builtin_shards("fashion_mnist", "train")
    probe_args = ["data=fashion_mnist", f"data.train={train}/train-{{000000..000001}}.tar", CALIBRATED_PROBE]
    run_submit("pretrain", "spark", "resnet10_s1", *SPARK_RUN, "trainer.enable_progress_bar=false",
               f"run_dir={tmp_path}", "run_name=r", timeout=1800, check=True)
    top1 = pretrain_and_probe(tmp_path / "r", baseline_probe, "resnet10_s1", probe_args)
    assert top1["samples"] == (10000, 10000)
    assert top1["pretrained"] >= top1["pixels"] + SPARK_MARGIN_OVER_PIXELS
    assert top1["pretrained"] >= top1["random"] + SPARK_MARGIN_OVER_RANDOM


# Fine-tuning the RotNet run above on 1% of Fashion-MNIST's labels (600 images) with the CPU recipe
# (configs/finetune/cpu.yaml: 150 steps), against the same convnet4 from its random init with the same
# recipe and seed. Fine-tuning seeds 0-4 (seed and finetune.subset_seed: the labelled images, the
# head, the batches), one thread each, measured on 2026-12-03 on a 2-core Intel Xeon with
# AVX512-BF16/AMX: pretrained 80.27 / 79.87 / 79.92 / 80.03 / 80.97 against scratch 77.61 / 79.05 /
# 78.49 / 77.50 / 78.85, margins +2.66 / +0.82 / +1.43 / +2.53 / +2.12 (mean +1.91, sd 0.78).
FINETUNE_MARGIN = 0.4  # 1.9 sd under the mean margin, 0.42 under the lowest seed


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.xdist_group("rotnet")
def test_finetuning_rotnet_on_1_percent_of_the_labels_beats_finetuning_from_scratch(tmp_path, shared_run):
    top1 = {}
    for name, source in (("pretrained", shared_run(*ROTNET_RUN)), ("scratch", "random:convnet4")):
        run_submit("finetune", str(source), "data=fashion_mnist", "finetune.label_fraction=0.01",
                   "trainer.enable_progress_bar=false", f"run_dir={tmp_path}", f"run_name={name}", timeout=1200, check=True)
        result = json.loads((tmp_path / name / "finetune.json").read_text())
        assert result["labelled_samples"] == 600 and result["test_samples"] == 10000
        top1[name] = result["top1"]
    print(f"fine-tuned on 1% of the labels: pretrained {top1['pretrained']:.2f}  scratch {top1['scratch']:.2f}")
    assert top1["pretrained"] >= top1["scratch"] + FINETUNE_MARGIN


SIT_STEPS = 600
# 600 steps of the vit_t CPU recipe with 8x8-pixel patches (16 tokens instead of the recipe's 64) and 6
# blocks instead of 12 (cosine over 600), against the same ViT at random init. Seeds 0-4, one thread each,
# two side by side, fp32, measured on 2026-12-04 on a 2-core AMD EPYC without AVX-512: 74.33 / 74.96 /
# 76.03 / 74.61 / 76.31 against 72.36 for the random init, margins +1.97 / +2.60 / +3.67 / +2.25 / +3.95
# (mean +2.89, sd 0.88). It stays far under raw pixels (83.57) at this budget: the test is about
# learning, not about pixels.
SIT_SHAPE = ["backbone.kwargs.patch_size=8", "backbone.kwargs.depth=6"]
SIT_RUN = ["data=fashion_mnist", *SIT_SHAPE, f"trainer.max_steps={SIT_STEPS}",
           "trainer.precision=32-true"]  # calibrated in fp32: a CPU with bf16 would otherwise draw other runs
SIT_RANDOM_INIT = ["backbone.kwargs.img_size=32", *SIT_SHAPE, "backbone.kwargs.drop_path_rate=0.0"]
SIT_MARGIN_OVER_RANDOM = 1.0  # 2.2 sd under the mean margin, 0.97 under the lowest seed


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_sit_beats_its_random_init(tmp_path, baseline_probe):
    """SIT_RUN: a 6-block, patch-8 vit_t. SiT stays under raw pixels at CPU budgets
    (docs/results/sit.md), so the assertion is the margin over the same ViT at random init."""
    train = builtin_shards("fashion_mnist", "train")
    probe_args = ["data=fashion_mnist", f"data.train={train}/train-{{000000..000001}}.tar", CALIBRATED_PROBE]
    run_submit("pretrain", "sit", "vit_t", *SIT_RUN, "trainer.enable_progress_bar=false",
               f"run_dir={tmp_path}", "run_name=r", timeout=1800, check=True)
    top1 = pretrain_and_probe(tmp_path / "r", baseline_probe, "vit_t", probe_args, SIT_RANDOM_INIT)
    assert top1["samples"] == (10000, 10000)
    assert top1["pretrained"] >= top1["random"] + SIT_MARGIN_OVER_RANDOM
