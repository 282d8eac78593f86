"""ConTraCon (docs/methods/contracon.md): the re-weighting's properties, task identification, task streams,
the continual job end to end on split digits, and a SIGKILL during task 3 followed by a rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import image_tags, run_submit
from selfsup.backbones import create_backbone
from selfsup.continual.data import is_validation, split_classes
from selfsup.continual.model import ContinualTransformer
from selfsup.continual.reweight import HeadConvReweight, reweight
from selfsup.continual.taskid import class_gaussian, identify_task, mahalanobis_distance, view_entropy
from selfsup.core.errors import UserError


# ---- the re-weighting: per-head, no mixing, identity limit W_t -> W_0 -----------------------------
def _random_reweight(heads=4, k=15, seed=0):
    torch.manual_seed(seed)
    return HeadConvReweight(heads, k)


def test_reweight_shape_and_no_cross_head_mixing():
    rw = _random_reweight()
    w0 = torch.randn(256, 256)
    w = rw(w0)
    assert w.shape == w0.shape
    for h in range(4):
        bumped = w0.clone()
        bumped[h * 64:(h + 1) * 64] += torch.randn(64, 256)
        changed = (rw(bumped) - w).abs().amax(dim=1) > 0
        rows = torch.zeros(256, dtype=torch.bool)
        rows[h * 64:(h + 1) * 64] = True
        assert changed[rows].all() and not changed[~rows].any(), f"head {h} leaked into other heads' rows"


def test_reweight_matches_per_head_convolutions_and_identity_limit():
    rw = _random_reweight(seed=1)
    w0 = torch.randn(256, 128)
    expected = []
    for h in range(4):  # an independent computation: one Conv2d(1 -> 1, 15 x 15, padding 7) per head
        conv = nn.Conv2d(1, 1, 15, padding=7)
        conv.weight.data.copy_(rw.kernels[h:h + 1])
        conv.bias.data.copy_(rw.bias[h:h + 1])
        block = w0[h * 64:(h + 1) * 64][None, None]
        expected.append((conv(block) + torch.sigmoid(torch.tensor(1.0)) * block)[0, 0])
    torch.testing.assert_close(rw(w0), torch.cat(expected), rtol=1e-5, atol=1e-5)
    assert torch.all(rw.gate == 1)  # shipped init: W = Conv(W0) + 0.731 W0
    with torch.no_grad():
        rw.kernels.zero_(), rw.bias.zero_(), rw.gate.fill_(30.0)
    torch.testing.assert_close(rw(w0), w0, rtol=0, atol=1e-6)  # identity limit
    assert not torch.equal(reweight(w0, rw.kernels, rw.bias, torch.zeros(4, 1, 1)), w0)


# ---- parameters per task: 25,315 for cct_6, kernel 15, 10 classes ----------------------------------
def test_parameters_per_task_cct6():
    with torch.device("meta"):
        model = ContinualTransformer(create_backbone("cct_6"), kernel_size=15)
        model.add_task(10)
        model.add_task(10)
        model.add_task(20)
    assert sum(p.numel() for p in model.backbone.parameters()) + model.task_parameters(0) - 257 == 3_166_219
    assert model.task_parameters(1) == 25_315
    assert model.task_parameters(2) == 27_885
    per_layer = sum(p.numel() for k, p in model.tasks[1].named_parameters() if "blocks__0__" in k)
    assert per_layer == 3_748


# ---- the task network on CCT and on a timm ViT ---------------------------------------------------------
@pytest.mark.parametrize("name", ["cct_tiny_test", "vit_tiny_test"])
def test_task_network_identity_limit_and_trainable_set(name):
    torch.manual_seed(0)
    model = ContinualTransformer(create_backbone(name), kernel_size=5).eval()
    model.add_task(3)
    model.add_task(4)
    x = torch.randn(5, 3, 32, 32)
    assert model(x, 0).shape == (5, 3) and model(x, 1).shape == (5, 4)
    trained = model.train_only(1)
    assert {id(p) for p in trained} == {id(p) for p in model.tasks[1].parameters()}
    assert not any(p.requires_grad for p in model.backbone.parameters())
    # zero kernels, huge gates, task-0 norms, pool and a 3-class head: task 1 becomes task 0
    with torch.no_grad():
        for module in model.tasks[1].reweights.modules():
            if isinstance(module, HeadConvReweight):
                module.kernels.zero_(), module.bias.zero_(), module.gate.fill_(30.0)
        for name_ in model.norm_names:
            model.tasks[1].norms[name_.replace(".", "__")].load_state_dict(model.backbone.net.get_submodule(name_).state_dict())
        model.tasks[1].pool.load_state_dict(model.tasks[0].pool.state_dict())
        model.tasks[1].head = nn.Linear(model.dim, 3)
        model.tasks[1].head.load_state_dict(model.tasks[0].head.state_dict())
    torch.testing.assert_close(model(x, 1), model(x, 0), rtol=1e-4, atol=1e-5)


def test_refuses_convnets():
    with pytest.raises(UserError, match="transformer"):
        ContinualTransformer(create_backbone("convnet4"))


# ---- earlier tasks bit-identical after a new task ----------------------------------------------------
def test_training_a_task_leaves_earlier_tasks_bit_identical(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from omegaconf import OmegaConf

    from selfsup.continual.config import compose
    from selfsup.continual.data import TaskArrays
    from selfsup.continual.train import train_task

    cfg = compose("contracon", "cct_tiny_test", ["data=split_digits", "epochs=1", "kernel_size=5", "batch_size=16",
                                                  "continual.first_task_epochs=null", "continual.warmup_steps=0",
                                                  "continual.train_minutes=null",
                                                  "data.num_workers=0", "trainer.enable_progress_bar=false",
                                                  "trainer.accelerator=cpu"])
    OmegaConf.resolve(cfg)
    torch.manual_seed(0)

    def arrays(n, classes):
        return TaskArrays(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, classes, (n,)), [str(i) for i in range(n)])

    model = ContinualTransformer(create_backbone("cct_tiny_test"), kernel_size=5)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    model.add_task(2)
    train_task(model, 0, arrays(48, 2), arrays(16, 2), cfg, logger)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    out0 = model(x, 0)
    for task in (1, 2):
        model.add_task(2)
        new = {k: v.clone() for k, v in model.tasks[task].state_dict().items()}
        train_task(model, task, arrays(48, 2), arrays(16, 2), cfg, logger)
        assert any(not torch.equal(v, model.tasks[task].state_dict()[k]) for k, v in new.items()), "the new task did not train"
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed while later tasks trained"
    model.eval()
    assert torch.equal(model(x, 0), out0)


# ---- entropic task identification: lowest entropy of the view-averaged softmax -------------------------
def test_task_identification_picks_lowest_entropy_and_ties_go_low():
    b, v = 3, 16
    flat = torch.zeros(b, v, 2)  # uniform: entropy log 2
    confident = torch.zeros(b, v, 3)
    confident[..., 1] = 20.0  # one-hot after the view average
    ids, entropies = identify_task([flat, confident, flat])
    assert ids.tolist() == [1, 1, 1]
    p = torch.tensor([0.5, 0.5])
    torch.testing.assert_close(entropies[0], (-(p * torch.log(p + 1e-4)).sum()).expand(b))
    ids, _ = identify_task([flat, flat.clone()])
    assert ids.tolist() == [0, 0, 0]
    # logits (not probabilities) are averaged over the views
    views = torch.tensor([[[4.0, 0.0], [-4.0, 0.0]]])
    assert view_entropy(views).item() == pytest.approx(float(-(torch.tensor([.5, .5]) * torch.log(torch.tensor([.5, .5]) + 1e-4)).sum()))


# ---- task identification by each task's feature Gaussian (selfsup's rule) ----------------------------
def test_class_gaussian_recovers_means_and_covariance():
    torch.manual_seed(0)
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]])
    chol = torch.linalg.cholesky(cov)
    means = torch.tensor([[5.0, 0.0], [-5.0, 1.0], [0.0, 8.0]])
    labels = torch.arange(3).repeat_interleave(20000)
    x = means[labels] + torch.randn(len(labels), 2) @ chol.T
    mu, precision = class_gaussian(x, labels, 3, shrinkage=0.0)
    torch.testing.assert_close(mu, means, atol=0.03, rtol=0)
    torch.testing.assert_close(precision, torch.linalg.inv(cov), atol=0.03, rtol=0.02)
    # full shrinkage: a scaled identity with the mean variance
    _, iso = class_gaussian(x, labels, 3, shrinkage=1.0)
    torch.testing.assert_close(iso, torch.eye(2) / 1.25, atol=0.02, rtol=0)
    # fewer samples than dimensions still gives a finite precision
    _, few = class_gaussian(torch.randn(4, 16), torch.tensor([0, 0, 1, 1]), 2, shrinkage=0.1)
    assert torch.isfinite(few).all()
    with pytest.raises(ValueError, match=r"classes \[1, 2\]"):
        class_gaussian(x[:10], torch.zeros(10, dtype=torch.long), 3)


def test_mahalanobis_distance_is_to_the_nearest_class_under_the_precision():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    precision = torch.diag(torch.tensor([1.0, 0.25]))  # variance 1 along x, 4 along y
    z = torch.tensor([[0.0, 2.0], [9.0, 0.0], [3.0, 0.0]])
    torch.testing.assert_close(mahalanobis_distance(z, means, precision), torch.tensor([1.0, 1.0, 9.0]))
    # task identification: the task whose Gaussian is nearest wins
    far = mahalanobis_distance(z, means + 100.0, precision)
    assert torch.stack([far, mahalanobis_distance(z, means, precision)]).argmin(0).tolist() == [1, 1, 1]


# ---- task streams -------------------------------------------------------------------------------------
def test_class_splits_and_validation_carve():
    assert split_classes(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    seeded = split_classes(10, 5, "seeded", seed=3)
    assert seeded == split_classes(10, 5, "seeded", seed=3) and sorted(sum(seeded, [])) == list(range(10))
    assert seeded != split_classes(10, 5)
    with pytest.raises(UserError, match="equal tasks"):
        split_classes(10, 3)
    keys = [f"train{i:07d}" for i in range(20000)]
    chosen = [k for k in keys if is_validation(k, 0.1)]
    assert 0.09 < len(chosen) / len(keys) < 0.11
    assert chosen == [k for k in reversed(keys) if is_validation(k, 0.1)][::-1]  # order-independent


def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    for args, needle in [
        (["continual", "contracon", "resnet18"], "transformer"),
        (["continual", "contrakon", "cct_6"], "did you mean 'contracon'"),
        (["continual", "contracon", "cct_6", "continual.kernal_size=3"], "continual.kernel_size"),
        (["continual", "contracon", "cct_6", "data=split_fashion"], "split_fashion_mnist"),
        (["continual", "contracon", "cct_6", "eval.task_id=[entropy,mahalonobis]"], "'mahalanobis'"),
    ]:
        proc = run_submit(*args, f"run_dir={tmp_path}", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
    proc = run_submit("continual", "contracon", "vit_t", "data=split_digits", "tasks=2", "--dry-run", cwd=tmp_path, check=True)
    assert "tasks: 2" in proc.stdout and "patch_size: 4" in proc.stdout and "name: digits" in proc.stdout


def test_init_from_an_export(tmp_path):
    from omegaconf import OmegaConf

    from selfsup.continual.config import compose
    from selfsup.continual.train import build_model
    from selfsup.export import _write_safetensors_atomically

    torch.manual_seed(5)
    source = create_backbone("cct_tiny_test")
    meta = {"method": "rotnet", "backbone": "cct_tiny_test", "backbone_kwargs": "{}", "timm_name": source.timm_name,
            "timm_kwargs": "{}", "global_step": "7", "config_hash": "x", "format": "timm"}
    _write_safetensors_atomically(source.net.state_dict(), tmp_path / "b.safetensors", meta)
    cfg = compose("contracon", "cct_tiny_test", [f"init={tmp_path / 'b.safetensors'}"])
    model = build_model(OmegaConf.create(OmegaConf.to_container(cfg)))
    for key, value in source.net.state_dict().items():
        assert torch.equal(model.backbone.net.state_dict()[key], value), key
    cfg = compose("contracon", "vit_tiny_test", [f"init={tmp_path / 'b.safetensors'}"])
    with pytest.raises(UserError, match="cannot start"):
        build_model(cfg)


# ---- the job: end to end on split digits, killed during task 3 and resumed ----------------------------
# 16 px (the digits are 8 px): 64 tokens instead of 32 px's 256, so a step costs a fraction of the CPU;
# task 1 gets 6 epochs there to learn its task as well as 3 epochs did at 32 px
RUN_ARGS = ["continual", "contracon", "cct_tiny_test", "data=split_digits", "tasks=5", "epochs=3", "kernel_size=5",
            "image_size=16", "backbone.kwargs.img_size=16",
            "batch_size=32", "continual.first_task_epochs=6", "continual.first_task_lr=2e-3", "continual.warmup_steps=0", "continual.train_minutes=null",
            "continual.val_fraction=0.15", "eval.cil_samples_per_task=12", "data.num_workers=0",
            "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "run_name=split-digits"]


def model_dim(ckpt) -> int:
    return ckpt["state_dict"]["tasks.0.head.weight"].shape[1]


def _checkpoint(run):
    return torch.load(run / "checkpoints" / "continual.pt", map_location="cpu", weights_only=True)


# two job processes: 40-90 s, measured on 2026-12-03 on a 2-core Xeon shared with other work
@pytest.mark.timeout(1800)
@pytest.mark.long
def test_sigkill_during_task_3_then_rerun_continues_at_task_3(tmp_path):
    run = tmp_path / "split-digits"
    cmd = [sys.executable, "-m", "selfsup.launch.cli", *RUN_ARGS, f"run_dir={tmp_path}"]
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    deadline = time.time() + 1500
    while time.time() < deadline and proc.poll() is None:
        progress = run / "progress.json"
        if progress.exists() and json.loads(progress.read_text())["task"] == 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before task 3:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    first_out = (tmp_path / "first.log").read_text()
    assert "task 2 done" in first_out and "task 3 done" not in first_out
    saved = _checkpoint(run)
    assert saved["tasks_done"] == 2
    kept = {k: v for k, v in saved["state_dict"].items() if k.startswith(("backbone.", "tasks.0.", "tasks.1."))}

    second = run_submit(*RUN_ARGS, f"run_dir={tmp_path}", cwd=tmp_path, timeout=1500, check=True, in_process=True)
    assert "resuming at task 3/5" in second.stdout
    assert "task 1/5" not in second.stdout and "task 2/5" not in second.stdout and "task 3/5: classes 4 (4), 5 (5)" in second.stdout
    final = _checkpoint(run)
    assert final["tasks_done"] == 5 and final["results"][:2] == saved["results"]
    for key, value in kept.items():
        assert torch.equal(final["state_dict"][key], value), f"{key} changed after the rerun"

    metrics = json.loads((run / "metrics.json").read_text())
    til = metrics["til"]
    for j in range(5):  # zero forgetting in task-incremental mode
        assert len({til[t][j] for t in range(j, 5)}) == 1
    # 2-class digit tasks, chance 0.5: task 1 (the whole tiny CCT) learns; the later tasks train only
    # their re-weighting, norms, pool and head for 21 steps here, which learns little on this tiny model
    assert til[0][0] > 0.9 and metrics["average_til"][-1] > 0.6, metrics["til"]
    assert metrics["forgetting_til"][-1] == 0.0
    assert all(0.0 <= v <= 1.0 for v in metrics["task_id"][-1]) and len(metrics["cil"][-1]) == 5
    assert len(metrics["task_id_mahalanobis"][-1]) == len(metrics["cil_mahalanobis"][-1]) == 5
    for t in range(5):  # every task's feature Gaussian was fitted when its training ended
        assert final["state_dict"][f"tasks.{t}.feature_precision"].abs().sum() > 0
        assert final["state_dict"][f"tasks.{t}.class_means"].shape == (2, model_dim(final))
    assert metrics["params_added"][1] == metrics["params_added"][2] > 0
    assert "continual/til_matrix" in image_tags(run / "tb")
    assert "class-incremental accuracy, task by entropy" in second.stdout and "task-incremental accuracy" in second.stdout
    assert "task identification by Mahalanobis" in second.stdout

    # the frozen task-1 backbone exports like a pretraining run's and loads into timm strictly
    from selfsup.export import create_timm_model_from_export, export_backbone

    out = export_backbone(run / "checkpoints" / "continual.pt", tmp_path / "cct.safetensors")
    net = create_timm_model_from_export(out)
    assert torch.equal(net.state_dict()["blocks.0.attn.q.weight"], final["state_dict"]["backbone.net.blocks.0.attn.q.weight"])
