"""`submit pretrain` end to end: run folder, TensorBoard, checkpoints, resume after kill and Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

from conftest import image_tags, read_scalars, run_submit
from selfsup.core.config_hash import config_hash

TINY = ["rotnet", "resnet_tiny", "data=digits", "data.batch_size=16", "data.num_workers=0"]


def test_run_folder_config_checkpoint_and_tensorboard(tmp_path):
    proc = run_submit("pretrain", *TINY, "trainer.max_steps=12", "checkpoint_every_n_steps=5",
                      "images_every_n_steps=5", f"run_dir={tmp_path}", "run_name=r", check=True)
    run = tmp_path / "r"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"]["name"] == "rotnet" and cfg["backbone"]["name"] == "resnet_tiny"
    assert cfg["data"]["name"] == "digits" and cfg["trainer"]["max_steps"] == 12
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12
    assert ckpt["selfsup"]["backbone"] == "resnet_tiny"
    assert any(k.startswith("backbone.net.layer1.") for k in ckpt["state_dict"])
    scalars = read_scalars(run / "tb")
    for tag in ("train/loss", "train/rotation_acc", "train/images_per_sec", "online_probe/top1"):
        assert tag in scalars, (tag, sorted(scalars))
    assert any(t.startswith("lr-") for t in scalars)
    assert "rotnet/predicted_vs_true" in image_tags(run / "tb")
    assert "run folder" in proc.stdout
    # the RotNet recipe: NHWC weights, precision chosen for this machine and said in one line;
    # config.yaml holds the chosen one (and that `auto` was asked for), the config the checkpoint's hash describes
    assert cfg["backbone"]["channels_last"] is True and cfg["precision_requested"] == "auto"
    assert f"trainer.precision=auto -> {cfg['trainer']['precision']} " in proc.stdout
    assert config_hash(OmegaConf.load(run / "config.yaml")) == ckpt["selfsup"]["config_hash"]
    conv = ckpt["state_dict"]["backbone.net.conv1.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_no_data_uses_demo_data_and_says_so(tmp_path):
    proc = run_submit("pretrain", "rotnet", "resnet_tiny", "trainer.max_steps=2", "data.batch_size=8",
                      "data.num_workers=0", f"run_dir={tmp_path}", check=True)
    assert "built-in demo data 'fashion_mnist'" in proc.stdout


def test_dry_run_prints_config_without_running(tmp_path):
    proc = run_submit("pretrain", *TINY, "optim.lr=0.01", f"run_dir={tmp_path}", "--dry-run", check=True)
    printed = yaml.safe_load(proc.stdout)
    assert printed["optim"]["lr"] == 0.01
    assert not any(tmp_path.iterdir())


def _restore_sigint():
    # a shell's background job (`make test &`, nohup) inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler: give the run a terminal's Ctrl-C whatever started pytest
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args, tmp_path):
    return subprocess.Popen([sys.executable, "-m", "selfsup.launch.cli", "pretrain", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_restore_sigint)


def _wait_for_checkpoint(path: Path, proc, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_mid_epoch_then_resume(tmp_path):
    run = tmp_path / "k"
    args = [*TINY, "trainer.max_steps=400", "trainer.max_epochs=-1", "checkpoint_every_n_steps=5", f"run_dir={tmp_path}", "run_name=k"]
    proc = _start(args, tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    _wait_for_checkpoint(ckpt, proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < killed_at < 400
    resumed = run_submit("pretrain", "rotnet", "resnet_tiny", f"resume={run}", "trainer.max_steps=60", check=True)
    assert "resuming from" in resumed.stdout
    final = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert final["global_step"] == max(60, killed_at)
    steps = [s for s, _ in read_scalars(run / "tb")["train/loss"]]
    assert min(s for s in steps if s > killed_at) <= killed_at + 10  # continued, not restarted from 0


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path):
    run = tmp_path / "c"
    args = [*TINY, "trainer.max_steps=100000", "trainer.max_epochs=-1", "checkpoint_every_n_steps=100000",
            f"run_dir={tmp_path}", "run_name=c"]
    proc = _start(args, tmp_path)
    end = time.time() + 120
    while not (run / "tb").exists() and time.time() < end:
        time.sleep(0.2)
    time.sleep(8)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)  # generous: a loaded 2-core machine is slow to wind down
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists(), out[-2000:]
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert step > 0
    resumed = run_submit("pretrain", "rotnet", "resnet_tiny", f"resume={run}", f"trainer.max_steps={step + 3}", check=True)
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == step + 3
    assert "resuming from" in resumed.stdout


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    proc = run_submit("pretrain", "rotnet", "resnet_tiny", f"resume={tmp_path}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_pretrain_and_continual_resume_a_named_run_from_its_saved_config(tmp_path):
    import pytest

    from selfsup.continual.config import compose as compose_continual
    from selfsup.core.errors import UserError
    from selfsup.core.run_folder import write_run_config
    from selfsup.launch.config import compose as compose_pretrain
    from selfsup.launch.run_config import resolve_run

    for method, backbone, compose, key in [("rotnet", "resnet_tiny", compose_pretrain, "optim.lr"),
                                           ("contracon", "cct_tiny_test", compose_continual, "continual.lr")]:
        named = [f"run_dir={tmp_path}", f"run_name={method}"]
        cfg, folder, resumed = resolve_run(method, backbone, [*named, f"{key}=0.125"], compose)
        assert not resumed and folder == tmp_path / method
        write_run_config(folder, cfg)
        cfg, again, resumed = resolve_run(method, backbone, named, compose)
        assert resumed and again == folder and OmegaConf.select(cfg, key) == 0.125 and cfg.resume == str(folder)
        cfg, _, _ = resolve_run(method, backbone, [f"resume={folder}", f"{key}=0.5"], compose)
        assert OmegaConf.select(cfg, key) == 0.5
    with pytest.raises(UserError, match="run folder .* is a rotnet resnet_tiny run, not obow resnet_tiny"):
        resolve_run("obow", "resnet_tiny", [f"run_dir={tmp_path}", "run_name=rotnet"], compose_pretrain)
