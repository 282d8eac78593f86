"""`submit pretrain` end to end: run folder, TensorBoard, checkpoints, resume after kill and Ctrl-C."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import image_tags, read_scalars, run_submit
from selfsup.core.config_hash import config_hash

TINY = ["rotnet", "resnet_tiny", "data=digits", "data.batch_size=16", "data.num_workers=0"]


@pytest.mark.long
def test_run_folder_config_checkpoint_and_tensorboard(tmp_path):
    proc = run_submit("pretrain", *TINY, "trainer.max_steps=12", "checkpoint_every_n_steps=5",
                      "images_every_n_steps=5", f"run_dir={tmp_path}", "run_name=r", check=True, in_process=True)
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
    # the run's report page shows what it logged (tests/test_report.py: the page in full)
    run_submit("report", run, "--no-png", check=True)
    page = (run / "report.html").read_text()
    assert ">train/loss<" in page and 'alt="rotnet/predicted_vs_true" ' in page


def test_no_data_uses_demo_data_and_says_so(tmp_path):
    proc = run_submit("pretrain", "rotnet", "resnet_tiny", "trainer.max_steps=2", "data.batch_size=8",
                      "data.num_workers=0", f"run_dir={tmp_path}", check=True, in_process=True)
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


@pytest.mark.long
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
    resumed = run_submit("pretrain", "rotnet", "resnet_tiny", f"resume={run}", "trainer.max_steps=60", check=True,
                         in_process=True)
    assert "resuming from" in resumed.stdout
    final = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert final["global_step"] == max(60, killed_at)
    steps = [s for s, _ in read_scalars(run / "tb")["train/loss"]]
    assert min(s for s in steps if s > killed_at) <= killed_at + 10  # continued, not restarted from 0


@pytest.mark.long
def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path):
    run = tmp_path / "c"
    args = [*TINY, "trainer.max_steps=100000", "trainer.max_epochs=-1", "checkpoint_every_n_steps=100000",
            "data.log_keys=true", f"run_dir={tmp_path}", "run_name=c"]
    proc = _start(args, tmp_path)
    end = time.time() + 180
    while _steps_logged(run / "keys" / "rank0.jsonl") < 2:  # Ctrl-C in the middle of training
        assert proc.poll() is None and time.time() < end, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)  # generous: a loaded 2-core machine is slow to wind down
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists(), out[-2000:]
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert step > 0
    resumed = run_submit("pretrain", "rotnet", "resnet_tiny", f"resume={run}", f"trainer.max_steps={step + 3}", check=True,
                         in_process=True)
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == step + 3
    assert "resuming from" in resumed.stdout


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    proc = run_submit("pretrain", "rotnet", "resnet_tiny", f"resume={tmp_path}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_pretrain_and_continual_resume_a_named_run_from_its_saved_config(tmp_path):
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


def _steps_logged(log: Path) -> int:
    from selfsup.ssl.callbacks import read_key_log

    return len(read_key_log(log)) if log.exists() else 0


def _sigterm_after(proc, log: Path, steps: int) -> int:
    """SIGTERM to `proc` once `log` (data.log_keys) shows `steps` steps; the steps done when it was sent."""
    end = time.time() + 180
    while _steps_logged(log) < steps:
        assert proc.poll() is None and time.time() < end, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)  # held while the steps done are counted (the log is written at each step's end)
    done = _steps_logged(log)
    proc.send_signal(signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    return done


def _stream_keys(cfg, epochs: int) -> list[list[str]]:
    """The keys of each batch the uninterrupted stream of `cfg` gives (this process's RANK/WORLD_SIZE)."""
    from selfsup.data.stream import ShardDataModule
    from selfsup.data.views import crop_flip_view

    loader = ShardDataModule(cfg.data, crop_flip_view(cfg.data.image_size, cfg.data.mean, cfg.data.std),
                             seed=cfg.seed).train_dataloader()
    return [list(batch["key"]) for _ in range(epochs) for batch in loader]


@pytest.mark.long
def test_sigterm_checkpoints_the_step_and_the_resumed_epoch_sees_each_sample_once(tmp_path, monkeypatch):
    """SIGTERM to a running `submit pretrain` (2 loader workers, no periodic checkpoint): a checkpoint
    at the step it came in or the next one, and status 143. `submit pretrain resume=` then ends at
    the step an uninterrupted run ends at, and each step trained on the batch of the uninterrupted
    stream (the keys of data.log_keys): the interrupted epoch saw each of its samples once."""
    from conftest import write_keyed_shards
    from selfsup.launch.cli import main
    from selfsup.launch.commands import LAUNCHED_RUN_DIR_ENV
    from selfsup.launch.config import compose
    from selfsup.ssl.callbacks import read_key_log

    keys = write_keyed_shards(tmp_path / "shards", shards=4, per_shard=4)
    args = ["rotnet", "resnet_tiny", f"data={tmp_path / 'shards'}", "data.batch_size=2", "data.image_size=16",
            "data.num_workers=2", "data.log_keys=true", "trainer.max_epochs=2", "trainer.precision=32-true",
            "checkpoint_every_n_steps=100000",
            "images_every_n_steps=0", "trainer.enable_progress_bar=false", f"run_dir={tmp_path}", "run_name=t"]
    run, log = tmp_path / "t", tmp_path / "t" / "keys" / "rank0.jsonl"
    proc = _start(args, tmp_path)
    at_signal = _sigterm_after(proc, log, 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert at_signal <= saved <= at_signal + 1 < 8, (at_signal, saved)  # no step lost, and mid-epoch
    assert f"SIGTERM received: checkpoint saved at step {saved} (epoch 0); exiting" in out
    assert f"selfsup: ended by SIGTERM at step {saved} " in out
    assert list(read_key_log(log)) == list(range(1, saved + 1))

    monkeypatch.delenv(LAUNCHED_RUN_DIR_ENV, raising=False)  # the run in this process sets it
    assert main(["pretrain", "rotnet", "resnet_tiny", f"resume={run}"]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 16
    trained = read_key_log(log)
    assert list(trained) == list(range(1, 17))
    assert [line["keys"] for line in trained.values()] == _stream_keys(compose("rotnet", "resnet_tiny", args[2:]), 2)
    for epoch in (0, 1):
        seen = [key for line in trained.values() if line["epoch"] == epoch for key in line["keys"]]
        assert sorted(seen) == sorted(keys), epoch


@pytest.mark.long
def test_sigterm_under_ddp_checkpoints_both_ranks_at_one_step(tmp_path, monkeypatch):
    """Two CPU ranks (gloo) through `submit pretrain`: SIGTERM to rank 0 alone (as `kill` sends it);
    the ranks agree on one step, save it together with both ranks' places in the data stream, and
    exit 143. From that checkpoint, each rank's stream goes on with that rank's remaining batches."""
    from conftest import write_keyed_shards
    from selfsup.data.stream import ShardDataModule
    from selfsup.data.views import crop_flip_view
    from selfsup.launch.config import compose
    from selfsup.ssl.callbacks import read_key_log

    write_keyed_shards(tmp_path / "shards", shards=4, per_shard=6)
    args = ["rotnet", "resnet_tiny", f"data={tmp_path / 'shards'}", "data.batch_size=2", "data.image_size=16",
            "data.num_workers=0", "data.log_keys=true", "trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp",
            "trainer.precision=32-true", "trainer.max_epochs=4", "checkpoint_every_n_steps=100000",
            "images_every_n_steps=0", "trainer.enable_progress_bar=false", f"run_dir={tmp_path}", "run_name=d"]
    run = tmp_path / "d"
    proc = _start(args, tmp_path)
    at_signal = _sigterm_after(proc, run / "keys" / "rank0.jsonl", 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    saved = re.findall(r"SIGTERM received: checkpoint saved at step (\d+) \(epoch 0\) \[rank (\d) of 2\]", out)
    assert sorted(rank for _, rank in saved) == ["0", "1"] and len({step for step, _ in saved}) == 1, out[-3000:]
    step = int(saved[0][0])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == step and at_signal <= step < 6  # 6 batches per rank and epoch
    state = ckpt["ShardDataModule"]["stream"]
    assert state["batches"] == step and len(state["ranks"]) == 2

    cfg = compose("rotnet", "resnet_tiny", args[2:])
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        whole = _stream_keys(cfg, 1)
        trained = read_key_log(run / "keys" / f"rank{rank}.jsonl")
        assert [line["keys"] for line in trained.values()] == whole[:step]
        view = crop_flip_view(16, cfg.data.mean, cfg.data.std)
        loader = ShardDataModule(cfg.data, view, seed=cfg.seed).train_dataloader()
        loader.resume_from(state)
        assert [list(batch["key"]) for batch in loader] == whole[step:]
