"""Shards: writing (image folders, built-in data), streaming, rank splitting, corrupt samples."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import read_scalars, run_submit
from selfsup.data.builtin import load_builtin
from selfsup.data.shards import builtin_shards, write_shards_from
from selfsup.data.stream import SampleDecoder, count_samples, expand_urls, make_stream
from selfsup.data.views import crop_flip_view, eval_view
from selfsup.errors import UserError

MEAN, STD = [0.5] * 3, [0.5] * 3


def make_image_folder(root, per_class=16, classes=("cat", "dog"), corrupt=1):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    for i in range(corrupt):
        (root / classes[0] / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def test_builtin_datasets_have_official_splits():
    train, test = load_builtin("fashion_mnist", "train"), load_builtin("fashion_mnist", "test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert sorted(np.unique(train.labels)) == list(range(10))
    digits_train, digits_test = load_builtin("digits", "train"), load_builtin("digits", "test")
    assert len(digits_train.labels) + len(digits_test.labels) == 1797


def test_missing_fashion_mnist_is_a_one_line_hint(monkeypatch, tmp_path):
    import selfsup.data.builtin as builtin

    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        builtin.load_builtin("fashion_mnist", "train")


def test_image_folder_shards_keep_bytes_labels_and_index(tmp_path):
    src = make_image_folder(tmp_path / "images")
    proc = run_submit("shards", src, tmp_path / "shards", "--samples-per-shard", "10", check=True)
    assert "wrote 4 shards" in proc.stdout
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["classes"] == ["cat", "dog"] and sum(index["shards"].values()) == 33
    assert count_samples(str(tmp_path / "shards")) == 33
    loader = make_stream(expand_urls(str(tmp_path / "shards")), SampleDecoder(eval_view(16, MEAN, STD), _counter()),
                         batch_size=8, num_workers=0, shuffle_buffer=0, resampled=False, seed=0)
    labels = torch.cat([b["label"] for b in loader])
    assert len(labels) == 32 and labels.tolist().count(0) == 16 and labels.tolist().count(1) == 16


def _counter():
    import multiprocessing

    return multiprocessing.get_context("fork").Value("l", 0)


def test_corrupt_sample_is_skipped_and_counted_in_training(tmp_path):
    src = make_image_folder(tmp_path / "images")
    write_shards_from(str(src), tmp_path / "shards", samples_per_shard=100)
    proc = run_submit("pretrain", "rotnet", "resnet_tiny", f"data={tmp_path / 'shards'}", "data.batch_size=8",
                      "data.num_workers=0", "data.shuffle_buffer=0", "data.epoch_samples=32", "trainer.max_epochs=1",
                      "trainer.log_every_n_steps=1", f"run_dir={tmp_path}", "run_name=r", check=True)
    assert "skipped 1 corrupt samples" in proc.stdout
    logged = read_scalars(tmp_path / "r" / "tb")["data/skipped_samples"]
    assert logged[-1][1] == 1.0


def test_ranks_get_disjoint_shards_and_equal_batch_counts(tmp_path, monkeypatch):
    # 5 shards of uneven sizes over 2 ranks: each rank cycles its own shards for the same number of batches
    src = make_image_folder(tmp_path / "images", per_class=23, corrupt=0)
    write_shards_from(str(src), tmp_path / "shards", samples_per_shard=10)
    urls = expand_urls(str(tmp_path / "shards"))
    assert len(urls) == 5
    keys, counts = {}, {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = make_stream(urls, SampleDecoder(crop_flip_view(16, MEAN, STD), _counter()), batch_size=4,
                             num_workers=0, shuffle_buffer=0, resampled=False, seed=0, batches_per_rank=6)
        batches = list(loader)
        counts[rank] = len(batches)
        keys[rank] = {(b_url, k) for b in batches for b_url, k in zip(["x"] * len(b["key"]), b["key"])}
    assert counts == {0: 6, 1: 6}
    assert keys[0].isdisjoint(keys[1])


def test_builtin_shards_are_written_once(tmp_path):
    folder = builtin_shards("digits", "test", tmp_path)
    stamp = os.path.getmtime(folder / "index.json")
    assert builtin_shards("digits", "test", tmp_path) == folder
    assert os.path.getmtime(folder / "index.json") == stamp
    assert count_samples(str(folder)) == len(load_builtin("digits", "test").labels)


def test_missing_shards_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no shards found"):
        expand_urls(str(tmp_path / "nothing-{000..003}.tar"))
