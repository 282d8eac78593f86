"""`submit finetune`: the labelled subset, layer-wise LR decay, a real fine-tuning run end to end
(model selection, test scores, the result files, the timm export with its classifier, resume), and
one-line errors for bad input."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_submit
from selfsup.core.errors import UserError
from selfsup.eval.label_subset import draw_subset


def test_the_label_subset_is_class_balanced_seeded_and_apart_from_validation():
    keys = [f"k{i:05d}" for i in range(3000)]
    labels = [i % 3 if i < 2400 else 0 for i in range(3000)]  # class 0: 1400, classes 1 and 2: 800 each
    subset = draw_subset(keys, labels, fraction=0.05, val_samples=300, seed=7)
    label_of = dict(zip(keys, labels))
    train = Counter(label_of[k] for k in subset.train)
    val = Counter(label_of[k] for k in subset.val)
    assert train == {0: 70, 1: 40, 2: 40}  # 5% of each class's count
    assert val == {0: 140, 1: 80, 2: 80}  # the validation split in proportion to the classes
    assert not set(subset.train) & set(subset.val)
    assert draw_subset(keys, labels, fraction=0.05, val_samples=300, seed=7) == subset
    assert draw_subset(keys, labels, fraction=0.05, val_samples=300, seed=8).train != subset.train
    # the same seed draws a larger fraction as a superset's worth of the same order
    assert set(subset.train) <= set(draw_subset(keys, labels, fraction=0.1, val_samples=300, seed=7).train)


def test_layer_wise_lr_decay_scales_each_layer_and_keeps_the_head_at_the_peak():
    from selfsup.eval.finetune import FineTuner

    cfg = OmegaConf.merge(OmegaConf.load("configs/defaults.yaml"), OmegaConf.load("configs/finetune.yaml"))
    cfg.backbone.name = "resnet_tiny"
    cfg.backbone.kwargs = {"num_classes": 10}
    cfg.finetune.layer_decay = 0.5
    module = FineTuner(cfg, num_classes=10)
    groups = module.parameter_groups()
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    peak = cfg.optim.lr
    named = dict(module.named_parameters())
    assert lr_of[id(named["backbone.net.fc.weight"])] == pytest.approx(peak)  # the new classifier: L + 1
    assert lr_of[id(named["backbone.net.layer4.0.conv1.weight"])] == pytest.approx(peak * 0.5)
    assert lr_of[id(named["backbone.net.layer1.0.conv1.weight"])] == pytest.approx(peak * 0.5 ** 4)
    assert lr_of[id(named["backbone.net.conv1.weight"])] == pytest.approx(peak * 0.5 ** 5)  # the stem
    assert sum(len(g["params"]) for g in groups) == len(named)  # a partition: every parameter once
    no_decay = [g for g in groups if g["name"].startswith("no_decay")]
    assert all(g["weight_decay"] == 0 and all(p.ndim <= 1 for p in g["params"]) for g in no_decay)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """8 steps of resnet_tiny from random init on 10% of the digits' labels."""
    runs = tmp_path_factory.mktemp("finetune")
    proc = run_submit("finetune", "random:resnet_tiny", "data=digits", "finetune.label_fraction=0.1",
                      "finetune.val_samples=100", "finetune.val_every_n_steps=3", "trainer.max_steps=8",
                      "data.batch_size=32", "optim.warmup_steps=2", "trainer.enable_progress_bar=false",
                      f"run_dir={runs}", "run_name=ft", check=True, in_process=True)
    return runs / "ft", proc


def test_a_finetuning_run_scores_its_best_validation_step_on_test(finetuned):
    run, proc = finetuned
    result = json.loads((run / "finetune.json").read_text())
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert result["best_step"] == best["step"] and best["step"] in (3, 6, 8)
    assert result["val_top1"] == pytest.approx(best["val_top1"])
    assert result["test_samples"] > 0 and 0 <= result["top1"] <= result["top5"] <= 100
    labels = json.loads((run / "labels.json").read_text())
    assert result["labelled_samples"] == len(labels["train"]) and result["val_samples"] == len(labels["val"]) == 100
    # 10% of each class's count: the digits' train split holds about 140 of each of 10 classes
    assert set(labels["per_class"]) == {str(c) for c in range(10)}
    assert all(10 <= n <= 20 for n in labels["per_class"].values())
    assert f"test top-1 {result['top1']:.2f}" in proc.stdout


def test_the_finetuned_network_loads_in_timm_with_its_classifier(finetuned):
    from safetensors.torch import load_file

    from selfsup.data.stream import eval_loader, resolve_split
    from selfsup.data.views import eval_view
    from selfsup.eval.finetune import classify
    from selfsup.export import create_timm_model_from_export

    run, _ = finetuned
    net = create_timm_model_from_export(run / "model.safetensors").eval()  # timm.create_model + a strict load
    assert net.num_classes == 10 and "fc.weight" in load_file(run / "model.safetensors")
    cfg = OmegaConf.load(run / "config.yaml")
    batches = eval_loader(resolve_split(cfg.data, "test"), eval_view(cfg.data.image_size, cfg.data.mean, cfg.data.std))
    result = json.loads((run / "finetune.json").read_text())
    # the exported network is the one scored: the best validation step's
    assert classify(net, batches, "cpu")["top1"] == pytest.approx(result["top1"], abs=0.01)


def test_finetuning_a_run_starts_from_its_weights_and_files_the_result_there(tmp_path, finetuned):
    from safetensors.torch import load_file

    from selfsup.export import load_checkpoint

    source, _ = finetuned  # a fine-tuned network is a run folder with checkpoints like any other
    run_submit("finetune", str(source), "finetune.label_fraction=0.1", "finetune.val_samples=100",
               "trainer.max_steps=1", "optim.lr=1e-12", "optim.warmup_steps=0", "data.batch_size=32",
               "trainer.enable_progress_bar=false", f"run_dir={tmp_path}", "run_name=again", check=True, in_process=True)
    filed = json.loads((source / "finetune" / "again.json").read_text())
    assert filed["source"] == str(source) and filed["run"] == str(tmp_path / "again")
    # at an LR of 1e-12 a step moves a weight by about 1e-12: every weight is still the source's last one
    start = load_checkpoint(source / "checkpoints" / "last.ckpt")["state_dict"]  # weights_only=True
    after = load_file(tmp_path / "again" / "model.safetensors")
    for key in ("conv1.weight", "layer3.0.conv2.weight", "fc.weight", "fc.bias"):
        assert torch.allclose(after[key], start[f"backbone.net.{key}"], atol=1e-8), key
    # resumed with a longer budget, the run continues from its checkpoint and its drawn labels
    labels = (tmp_path / "again" / "labels.json").read_text()
    proc = run_submit("finetune", str(source), f"resume={tmp_path / 'again'}", "trainer.max_steps=3", check=True,
                      in_process=True)
    assert "resuming from" in proc.stdout and "(1 steps in this run)" not in proc.stdout
    assert json.loads((tmp_path / "again" / "finetune.json").read_text())["steps"] == 3
    assert (tmp_path / "again" / "labels.json").read_text() == labels


@pytest.mark.parametrize("override, message", [
    ("finetune.label_fraction=0", "finetune.label_fraction=0"),
    ("finetune.label_fraction=1.5", "finetune.label_fraction=1.5"),
    ("finetune.recipe=spark_vit", "spark_vit"),
    ("finetune.layer_decay=0", "finetune.layer_decay=0"),
    ("finetune.mixup=-1", "finetune.mixup=-1"),
])
def test_bad_finetuning_settings_are_one_line_errors(tmp_path, override, message):
    proc = run_submit("finetune", "random:resnet_tiny", "data=digits", override, f"run_dir={tmp_path}", "--dry-run")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_a_missing_source_is_a_one_line_error(tmp_path):
    proc = run_submit("finetune", str(tmp_path / "nope"), "--dry-run")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_slurm_dry_run_prints_the_sbatch_script(tmp_path):
    proc = run_submit("finetune", "random:resnet_tiny", "data=digits", "cluster=slurm", "nodes=2", f"run_dir={tmp_path}",
                      "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2" in proc.stdout and "method:\n  name: finetune" in proc.stdout


def test_dry_run_composes_the_recipe_and_the_source_backbone(tmp_path):
    proc = run_submit("finetune", "random:convnext_atto", "finetune.recipe=spark_convnext", "data=digits",
                      "data.image_size=64", f"run_dir={tmp_path}", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout.split("\n", 1)[1])
    assert cfg.backbone.name == "convnext_atto" and cfg.optim.name == "adamw" and cfg.finetune.layer_decay == 0.7
    assert cfg.finetune.mixup == 0.8 and cfg.backbone.kwargs.drop_path_rate == 0.4
    assert cfg.backbone.kwargs.num_classes == 10
    assert not any(Path(tmp_path).iterdir())


def test_a_source_classifier_for_other_classes_is_left_out(finetuned):
    from types import SimpleNamespace

    from selfsup.backbones.registry import create_backbone
    from selfsup.launch.finetune import load_source_weights

    from safetensors.torch import load_file

    source, _ = finetuned  # its classifier has 10 classes
    weights = load_file(source / "model.safetensors")
    for classes in (3, 10):
        backbone = create_backbone("resnet_tiny", num_classes=classes)
        load_source_weights(SimpleNamespace(backbone=backbone), str(source))
        assert torch.equal(backbone.net.state_dict()["layer4.0.conv2.weight"], weights["layer4.0.conv2.weight"])
        assert torch.equal(backbone.net.fc.weight, weights["fc.weight"]) == (classes == 10)
    wider = create_backbone("resnet10_s1_w32", num_classes=3)
    with pytest.raises(UserError, match="do not fit resnet10_s1_w32"):
        load_source_weights(SimpleNamespace(backbone=wider), str(source))
