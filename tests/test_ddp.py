"""2-process DDP on CPU (gloo) through `submit pretrain` itself (Lightning's local DDP launcher
re-runs the same command for rank 1): disjoint shards per rank, the same number of batches, identical
weights after N steps, and the LR scaled by the global batch. SyncBatchNorm is GPU-only in torch:
its wiring is checked here without running it."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_submit

# `submit pretrain` with a recording callback added to the trainer on every rank
DRIVER = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch

    import selfsup.launch.train as train

    OUT = Path(os.environ["SELFSUP_TEST_TRACE"])

    class Trace(pl.Callback):
        def __init__(self):
            self.keys, self.batches = [], {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.keys += list(batch["key"])
            self.batches[trainer.current_epoch] = self.batches.get(trainer.current_epoch, 0) + 1

        def on_train_end(self, trainer, module):
            rank = trainer.global_rank
            groups = trainer.optimizers[0].param_groups
            (OUT / f"rank{rank}.json").write_text(json.dumps({
                "rank": rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
                "keys": self.keys, "batches": self.batches, "peak_lr": module.peak_lr(),
                "initial_lr": [g["initial_lr"] for g in groups if g.get("name") != "online_probe"],
                "sync_bn": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()),
                "strategy": type(trainer.strategy).__name__,
                "dist": torch.distributed.is_initialized() and torch.distributed.get_backend(),
            }))
            torch.save({k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, OUT / f"rank{rank}.pt")

    original = train.build_trainer

    def build_trainer(cfg, run_dir, extra_callbacks=(), module=None, **kwargs):
        return original(cfg, run_dir, extra_callbacks=(*extra_callbacks, Trace()), module=module, **kwargs)

    train.build_trainer = build_trainer
    from selfsup.launch.cli import main

    sys.exit(main(sys.argv[1:]))
''')

SAMPLES_PER_SHARD = 180
BATCHES_PER_EPOCH = 10  # per rank: data.epoch_samples=320 over 2 ranks x 16


@pytest.mark.long
def test_two_process_ddp_on_cpu(tmp_path):
    run_submit("shards", "digits", tmp_path / "shards", "--samples-per-shard", SAMPLES_PER_SHARD, check=True)
    shards = sorted((tmp_path / "shards" / "train").glob("*.tar"))
    assert len(shards) == 8
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    trace = tmp_path / "trace"
    trace.mkdir()
    lr = 1e-3
    proc = subprocess.run(
        [sys.executable, str(driver), "pretrain", "rotnet", "resnet_tiny", f"data={tmp_path / 'shards' / 'train'}",
         "data.batch_size=16", "data.num_workers=0", "data.epoch_samples=320", "data.shuffle_buffer=100",
         "trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp",
         "trainer.max_epochs=2", f"optim.lr={lr}", "optim.scale_lr=true", "optim.base_batch=16",
         "images_every_n_steps=0", "trainer.enable_progress_bar=false", f"run_dir={tmp_path / 'runs'}", "run_name=ddp"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "SELFSUP_TEST_TRACE": str(trace)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((trace / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [list((tmp_path / "runs").iterdir())] == [[tmp_path / "runs" / "ddp"]]  # rank 1 joined rank 0's run folder

    for r, info in enumerate(ranks):
        assert info["rank"] == r and info["world_size"] == 2 and info["dist"] == "gloo"
        assert info["strategy"] == "DDPStrategy"
        # the same number of batches on both ranks, every epoch
        assert info["batches"] == {"0": BATCHES_PER_EPOCH, "1": BATCHES_PER_EPOCH}
        assert info["global_step"] == 2 * BATCHES_PER_EPOCH
        # every sample a rank saw comes from its own shards: rank r owns shards r, r+2, ...
        shard_of = {int(key.removeprefix("train")) // SAMPLES_PER_SHARD for key in info["keys"]}
        assert shard_of and all(s % 2 == r for s in shard_of), (r, sorted(shard_of))
        # LR scaled by the global batch: 2 ranks x 16 images / base_batch 16 = 2x
        assert info["peak_lr"] == 2 * lr and all(v == 2 * lr for v in info["initial_lr"])
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])  # disjoint samples

    # identical weights on both ranks after N steps (BN running statistics are per rank without
    # SyncBN: DDP broadcasts rank 0's buffers before each forward, so they differ after the last one)
    w0, w1 = (torch.load(trace / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys()
    params = [k for k in w0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 20
    for key in params:
        assert torch.equal(w0[key], w1[key]), key
    ckpt = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 * BATCHES_PER_EPOCH
    assert all(torch.equal(ckpt["state_dict"][k], w0[k]) for k in params)  # rank 0 wrote the checkpoint


def test_sync_batchnorm_wiring(monkeypatch):
    """strategy.sync_batchnorm reaches Trainer(sync_batchnorm=...) where it can run (GPUs), and is a
    one-line notice, not a crash, on CPU (torch's DDP refuses SyncBatchNorm there)."""
    from selfsup.launch.config import compose
    from selfsup.launch.strategies import sync_batchnorm
    from selfsup.launch.train import build_trainer

    gpu = compose("rotnet", "resnet_tiny", ["strategy=ddp", "strategy.sync_batchnorm=true", "trainer.accelerator=gpu"])
    assert sync_batchnorm(gpu) is True
    cpu = compose("rotnet", "resnet_tiny", ["strategy=ddp", "strategy.sync_batchnorm=true", "trainer.accelerator=cpu",
                                            "trainer.devices=2"])
    assert sync_batchnorm(cpu) is False
    assert build_trainer(cpu, Path("/tmp/unused")).strategy._layer_sync is None
    assert sync_batchnorm(compose("rotnet", "resnet_tiny", ["strategy=ddp"])) is False

    import lightning.pytorch as pl

    seen = {}
    monkeypatch.setattr(pl, "Trainer", lambda **kwargs: seen.update(kwargs))
    build_trainer(gpu, Path("/tmp/unused"))
    assert seen["sync_batchnorm"] is True and seen["devices"] == 1 and seen["accelerator"] == "gpu"


@pytest.mark.long
def test_two_process_ddp_finetuning_on_cpu(tmp_path):
    """`submit finetune` on 2 local ranks: both train on disjoint parts of the labelled subset for the
    same steps and end with the same weights; rank 0 alone scores the best weights on test and writes
    the result and the export."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    trace = tmp_path / "trace"
    trace.mkdir()
    proc = subprocess.run(
        [sys.executable, str(driver), "finetune", "random:resnet_tiny", "data=digits", "data.num_workers=0",
         "finetune.label_fraction=0.5", "finetune.val_samples=100", "finetune.val_every_n_steps=2",
         "data.batch_size=16", "trainer.max_steps=4", "optim.warmup_steps=2", "trainer.accelerator=cpu",
         "trainer.devices=2", "strategy=ddp", "trainer.enable_progress_bar=false", f"run_dir={tmp_path / 'runs'}",
         "run_name=ft"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "SELFSUP_TEST_TRACE": str(trace)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "ft"
    ranks = [json.loads((trace / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert info["rank"] == r and info["world_size"] == 2 and info["strategy"] == "DDPStrategy"
        assert info["global_step"] == 4 and sum(info["batches"].values()) == 4
    assert ranks[0]["keys"] and ranks[1]["keys"] and not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    labels = json.loads((run / "labels.json").read_text())
    assert set(ranks[0]["keys"]) | set(ranks[1]["keys"]) <= set(labels["train"])  # only the labelled subset
    w0, w1 = (torch.load(trace / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    params = [k for k in w0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(w0[k], w1[k]) for k in params)
    result = json.loads((run / "finetune.json").read_text())
    assert result["steps"] == 4 and result["best_step"] in (2, 4) and result["test_samples"] > 0
    assert result["labelled_samples"] == len(labels["train"]) and (run / "model.safetensors").exists()
    # the labelled subset was written as one shard per rank, so that the ranks' samples are disjoint
    assert len(list((run / "labelled" / "train").glob("train-*.tar"))) == 2
