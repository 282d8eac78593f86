"""Progress that tells the truth: the training bar counts to where the run really ends, a run ends with
one summary line, and shard writing, probe features and continual tasks show bars with a total."""

import re

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.shards import builtin_shards, write_shards_from
from selfsup.ssl.callbacks import RunProgressBar
from selfsup.launch.cli import main

TINY = ["rotnet", "resnet_tiny", "data=digits", "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=0",
        "trainer.precision=32-true", "trainer.log_every_n_steps=1", "images_every_n_steps=0"]


@pytest.fixture(autouse=True)
def fresh_launch_env(monkeypatch):
    monkeypatch.delenv("_SELFSUP_LAUNCHED_RUN_DIR", raising=False)  # `submit pretrain` sets it for its local ranks


def final_bar(err: str) -> str:
    """The last state of the training bar (tqdm redraws it after carriage returns)."""
    states = [s for s in re.split(r"[\r\n]", err) if "it/s" in s or "s/it" in s]
    return states[-1]


def test_bar_counts_to_max_steps_and_the_run_ends_with_a_summary(tmp_path, capsys):
    builtin_shards("digits", "train")
    capsys.readouterr()
    # 89 batches an epoch and 5 epochs allowed: max_steps=3 ends the run, so the bar counts to 3
    assert main(["pretrain", *TINY, "trainer.max_steps=3", "trainer.max_epochs=5", f"run_dir={tmp_path}", "run_name=r"]) == 0
    out, err = capsys.readouterr()
    assert " 3/3 " in final_bar(err), final_bar(err)
    summary = out.strip().splitlines()[-1]
    assert re.fullmatch(r"selfsup: done at step 3 \(3 steps in this run\); \d+\.\d images/s; wall time \d+:\d\d; "
                        rf"checkpoint {re.escape(str(tmp_path / 'r' / 'checkpoints' / 'last.ckpt'))}; "
                        r"skipped 0 corrupt samples", summary), summary
    # resumed to step 5: the bar starts at 3 and counts to 5; the summary counts this run's steps
    assert main(["pretrain", "rotnet", "resnet_tiny", f"resume={tmp_path / 'r'}", "trainer.max_steps=5"]) == 0
    out, err = capsys.readouterr()
    assert " 5/5 " in final_bar(err) and "done at step 5 (2 steps in this run)" in out


def test_bar_counts_epochs_and_shows_the_time_budget(tmp_path, capsys):
    builtin_shards("digits", "train")
    capsys.readouterr()
    # 2 batches an epoch x 2 epochs, no step bound; a one-hour max_time does not end it first
    assert main(["pretrain", *TINY, "data.epoch_samples=32", "trainer.max_epochs=2", "trainer.max_steps=-1",
                 "trainer.max_time=00:01:00:00", f"run_dir={tmp_path}", "run_name=r"]) == 0
    bar = final_bar(capsys.readouterr().err)
    assert " 4/4 " in bar and re.search(r"time left=(1:00:00|5\d:\d\d)\]", bar) and bar.startswith("Epoch 1"), bar


class _ManualSteps(pl.LightningModule):
    """Two optimizers stepped by hand, as a continual task does: global_step counts both."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for opt, layer in zip(self.optimizers(), (self.a, self.b), strict=True):
            opt.zero_grad()
            self.manual_backward(layer(batch[0]).pow(2).mean())
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]


def test_task_bar_counts_batches_of_a_manually_optimised_module(capsys):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 2)), batch_size=4)
    bar = RunProgressBar("task 2/5")
    trainer = pl.Trainer(max_epochs=2, callbacks=[bar], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(_ManualSteps(), data)
    assert trainer.global_step == 12  # 6 batches x 2 optimizers
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (6, 6)
    assert final_bar(capsys.readouterr().err).startswith("task 2/5, epoch 1")


def test_shard_writing_bar_has_a_total(tmp_path, capsys):
    src = tmp_path / "images" / "cats"
    src.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
    write_shards_from(str(tmp_path / "images"), tmp_path / "shards")
    assert " 3/3 " in capsys.readouterr().err


def test_atari_bar_counts_frames_played(tmp_path, capsys):
    from selfsup.data.atari import write_atari_shards

    write_atari_shards(tmp_path / "atari", ["Breakout"], frames=30, test_frames=0, max_episode_frames=20)
    err = capsys.readouterr().err
    assert "atari/train (Breakout)" in err and " 30/30 " in err and "frame" in err


def test_probe_feature_bar_has_a_total(capsys):
    from selfsup.eval.probe import batch_count, extract_features

    test = builtin_shards("digits", "test")
    assert batch_count(iter(()), str(test), 256) == 2  # 360 test images, counted from index.json
    assert batch_count([1, 2, 3], str(test), 256) == 3  # batches that know their own length
    loader = [{"image": torch.zeros(4, 3, 8, 8), "label": torch.zeros(4, dtype=torch.long)}] * 2
    capsys.readouterr()
    feats, _ = extract_features(torch.nn.Flatten(), loader, desc="features test", batches=2)
    assert feats.shape == (8, 192)
    assert " 2/2 " in capsys.readouterr().err
