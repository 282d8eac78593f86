"""Linear probe, k-NN, and `submit probe`."""

import json

import pytest
import torch

from conftest import run_submit
from selfsup.eval.linear import knn_probe, linear_probe, select_hyperparameters


def blobs(n, d=16, k=4, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, k, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, d, generator=g), y


def test_linear_probe_and_knn_separate_blobs():
    x, y = blobs(2000)
    xt, yt = blobs(500, seed=1)
    assert linear_probe(x, y, xt, yt, 4)["top1"] > 97
    assert knn_probe(x, y, xt, yt, 4)["top1"] > 97


def test_chance_level_on_random_labels():
    x, _ = blobs(2000)
    y = torch.randint(0, 4, (2000,), generator=torch.Generator().manual_seed(5))
    xt, _ = blobs(1000, seed=1)
    yt = torch.randint(0, 4, (1000,), generator=torch.Generator().manual_seed(6))
    assert linear_probe(x, y, xt, yt, 4)["top1"] < 32


def test_hyperparameters_never_depend_on_the_test_split():
    x, y = blobs(1500, noise=4.0)
    xt, yt = blobs(500, seed=1, noise=4.0)
    a = linear_probe(x, y, xt, yt, 4)
    garbage_x, garbage_y = torch.randn_like(xt) * 100, torch.randint(0, 4, yt.shape)
    b = linear_probe(x, y, garbage_x, garbage_y, 4)
    assert a["chosen"] == b["chosen"] and a["sweep"] == b["sweep"]
    assert select_hyperparameters(x, y, 4)[0] == a["chosen"]  # the selection sees the train split only


def test_submit_probe_random_and_run_folder(tmp_path):
    proc = run_submit("probe", "random:resnet_tiny", "data=digits", check=True)
    assert "linear" in proc.stdout and "k-NN" in proc.stdout
    run_submit("pretrain", "rotnet", "resnet_tiny", "data=digits", "data.num_workers=0", "trainer.max_steps=3",
               f"run_dir={tmp_path}", "run_name=r", check=True)
    run = tmp_path / "r"
    run_submit("probe", run, check=True)
    result = json.loads((run / "probe.json").read_text())
    assert result["global_step"] == 3 and result["test_samples"] == 360
    assert 0 <= result["linear"]["top1"] <= 100 and result["knn"]["k"] == 20
    cached = list((run / "probe").glob("features-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run_submit("probe", run, check=True)
    assert cached[0].stat().st_mtime_ns == stamp  # features reused, not extracted again


@pytest.mark.parametrize("command", ["probe", "export"])
def test_bad_checkpoints_are_one_line_errors(tmp_path, command):
    truncated = tmp_path / "truncated.ckpt"
    good = {"state_dict": {"w": torch.zeros(1000)}, "selfsup": {}}
    torch.save(good, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    for bad in (truncated, text, tmp_path / "missing.ckpt"):
        args = [command, bad] + (["-o", tmp_path / "out.safetensors"] if command == "export" else [])
        proc = run_submit(*args)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
