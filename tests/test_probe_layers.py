"""Per-layer probes (`probe.layers`): one linear probe and one k-NN per convnet stage or ViT block,
all layers extracted in one pass, the last layer's row the default probe's own numbers."""

import json
import re

import pytest
import torch

from conftest import read_scalars
from selfsup.backbones import create_backbone
from selfsup.core.errors import UserError
from selfsup.eval.probe import check_layers, probe_config, run_probe
from selfsup.eval.targets import get_target
from selfsup.launch.cli import main

# small and quick: 16 px digits, a 300-image probe, one penalty, a short L-BFGS fit
FAST = ["data=digits", "data.num_workers=0", "data.image_size=16", "probe.train_samples=300", "probe.max_iter=30",
        "probe.weight_decays=[0.001]"]
VIT16 = ["backbone.kwargs.img_size=16"]  # vit_tiny_test is built for 32 px


@pytest.mark.parametrize("name, dims, modules", [
    ("convnet4", [32, 64, 128, 256], ["stages.0", "stages.1", "stages.2", "stages.3"]),
    ("resnet_tiny", [8, 16, 32, 64], ["layer1", "layer2", "layer3", "layer4"]),
    ("convnext_tiny_test", [16, 32, 64, 128], ["stages.0", "stages.1", "stages.2", "stages.3"]),
    ("vit_tiny_test", [32, 32], ["blocks.0", "blocks.1"]),
    ("cct_tiny_test", [32, 32], ["blocks.0", "blocks.1"]),
])
def test_the_last_layer_is_the_final_pooled_feature(name, dims, modules):
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        layers = backbone.forward_layers(x, list(range(len(dims))))
        final = backbone(x)
        middle = backbone.forward_layers(x, [len(dims) - 2])[0]
    assert backbone.layer_modules() == modules
    assert backbone.layer_names()[-1] == (f"stage{len(dims)}" if backbone.family == "convnet" else f"block{len(dims)}")
    assert [f.shape for f in layers] == [(3, d) for d in dims]
    assert torch.equal(layers[-1], final)  # bit for bit: the last row is the default probe's
    assert torch.equal(middle, layers[-2]) and not torch.equal(layers[-2], layers[-1])


def test_vit_rows_of_a_random_init_baseline():
    result = run_probe("random:vit_tiny_test", [*FAST, *VIT16, "probe.layers=[blocks.0]"])
    assert [(r["layer"], r["module"], r["feature_dim"]) for r in result["layers"]] == [("block1", "blocks.0", 32)]
    assert result["feature_dim"] == 32 and 0 <= result["layers"][0]["linear_top1"] <= 100
    table = result.table("random:vit_tiny_test").splitlines()
    assert table[-1].split()[:3] == ["block1", "blocks.0", "32"]


@pytest.mark.parametrize("layers, needle", [
    ("5", "probe.layers=5: convnet4 has no layer 5; use 1..4 (stage1..stage4, or timm's stages.0..stages.3)"),
    ("0", "has no layer 0"),
    ("[stage1,stage9]", "probe.layers=[stage1,stage9]: convnet4 has no layer 'stage9'"),
    ("block1", "has no layer 'block1'"),
    ("[]", "probe.layers=[]: name at least one layer of convnet4"),
])
def test_bad_layers_are_refused_before_any_feature(layers, needle, tmp_path):
    # shards that do not exist: extraction would fail on them, so the refusal comes before it
    missing = [f"data.train={tmp_path}/none-000000.tar", f"data.test={tmp_path}/none-000000.tar"]
    with pytest.raises(UserError) as error:
        run_probe("random:convnet4", [*FAST, *missing, f"probe.layers={layers}"])
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_vit_range_and_the_atari_target_refusal():
    with pytest.raises(UserError, match=r"vit_tiny_test has no layer 3; use 1\.\.2 \(block1\.\.block2"):
        run_probe("random:vit_tiny_test", [*FAST, *VIT16, "probe.layers=3"])
    with pytest.raises(UserError, match="probe.layers=all: the atari_ram eval target probes the final pooled features only"):
        run_probe("random:convnet4", ["data=atari_ram", "probe.layers=all"])


def test_pixels_ignore_layers_with_a_note(capsys):
    cfg = probe_config([*FAST, "probe.layers=all"], None)
    assert check_layers(cfg, None, get_target("classification")) is None
    assert "selfsup: pixels has no layers: probe.layers=all ignored" in capsys.readouterr().err
    assert cfg.probe.layers is None  # the saved record says what was probed


def test_a_run_folder_gets_the_rows_in_its_json_table_and_tensorboard(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("_SELFSUP_LAUNCHED_RUN_DIR", raising=False)  # `submit pretrain` sets it for its local ranks
    assert main(["pretrain", "rotnet", "resnet_tiny", "data=digits", "data.image_size=16", "data.batch_size=16",
                 "data.num_workers=0", "trainer.max_steps=2", "trainer.precision=32-true", "images_every_n_steps=0",
                 f"run_dir={tmp_path}", "run_name=r"]) == 0
    run = tmp_path / "r"
    assert main(["probe", str(run), *FAST[1:]]) == 0
    default = json.loads((run / "probe.json").read_text())
    capsys.readouterr()
    assert main(["probe", str(run), *FAST[1:], "probe.layers=[1,layer4]"]) == 0
    table = capsys.readouterr().out.splitlines()
    layered = json.loads((run / "probe.json").read_text())
    # the default record as it always was: the final pooled features, no per-layer table
    assert set(default) == {"linear", "knn", "train_samples", "test_samples", "feature_dim", "eval_target", "target",
                            "global_step", "precision", "data", "probe"}
    assert set(layered) == set(default) | {"layers"}
    # the headline numbers stay the final pooled features', and the last stage's row is the same fit
    assert layered["linear"] == default["linear"] and layered["knn"] == default["knn"]
    rows = layered["layers"]
    assert [(r["layer"], r["module"], r["feature_dim"]) for r in rows] == [("stage1", "layer1", 8), ("stage4", "layer4", 64)]
    assert (rows[1]["linear_top1"], rows[1]["linear_top5"], rows[1]["knn_top1"]) == (
        default["linear"]["top1"], default["linear"]["top5"], default["knn"]["top1"])
    assert rows[0]["linear_top1"] != rows[1]["linear_top1"] or rows[0]["knn_top1"] != rows[1]["knn_top1"]
    assert layered["probe"]["layers"] == [1, "layer4"]
    assert [line.split()[:3] for line in table[-2:]] == [["stage1", "layer1", "8"], ["stage4", "layer4", "64"]]
    scalars = read_scalars(run / "tb")
    assert scalars["probe/stage1/linear_top1"] == [(2, pytest.approx(rows[0]["linear_top1"]))]
    assert scalars["probe/stage4/knn_top1"] == [(2, pytest.approx(default["knn"]["top1"]))]
    assert "probe/stage2/linear_top1" not in scalars and "probe/linear_top1" in scalars


def test_baselines_are_the_random_init_and_pixel_probes_with_the_same_settings(tmp_path, monkeypatch, capsys):
    """`probe.baselines=true` records what `submit probe random:<backbone>` and `submit probe pixels` give
    with the same data and settings, per layer for the random init, and the margin over the best."""
    monkeypatch.delenv("_SELFSUP_LAUNCHED_RUN_DIR", raising=False)
    assert main(["pretrain", "rotnet", "resnet_tiny", "data=digits", "data.image_size=16", "data.batch_size=16",
                 "data.num_workers=0", "trainer.max_steps=2", "trainer.precision=32-true", "images_every_n_steps=0",
                 f"run_dir={tmp_path}", "run_name=r"]) == 0
    run = tmp_path / "r"
    layers = ["probe.layers=[1,layer4]"]
    assert main(["probe", str(run), *FAST[1:], *layers, "probe.baselines=true"]) == 0
    table = capsys.readouterr().out
    record = json.loads((run / "probe.json").read_text())
    random_init = run_probe("random:resnet_tiny", [*FAST, *layers]).record
    pixels = run_probe("pixels", FAST).record
    baselines = record["baselines"]
    assert set(baselines) == {"random_init", "pixels"}
    for key in ("linear", "knn", "layers"):
        assert baselines["random_init"][key] == random_init[key]
    assert baselines["pixels"]["linear"] == pixels["linear"] and baselines["pixels"]["knn"] == pixels["knn"]
    assert "layers" not in baselines["pixels"]
    # the random init's features are cached beside the run's; the pixels are not
    assert len(list((run / "probe").glob("features-*"))) == 2
    best = max(random_init["linear"]["top1"], pixels["linear"]["top1"])
    margin = record["linear"]["top1"] - best
    assert re.search(rf"raw pixels\s+{pixels['linear']['top1']:.2f}\s+{pixels['knn']['top1']:.2f}", table)
    assert re.search(rf"margin over the best baseline\s+{'+' if margin >= 0 else ''}{margin:.2f}", table)
    stage1 = next(line for line in table.splitlines() if line.split()[:2] == ["stage1", "layer1"])
    assert stage1.split()[-1] == f"{random_init['layers'][0]['linear_top1']:.2f}"
    # a baseline itself gets no baselines
    assert "baselines" not in run_probe("random:resnet_tiny", [*FAST, "probe.baselines=true"]).record
