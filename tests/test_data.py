"""Shards: writing (image folders, built-in data), streaming, rank splitting, corrupt samples."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import read_scalars, run_submit
from selfsup.data.builtin import load_builtin
from selfsup.data.shards import builtin_shards, write_shards_from
from selfsup.data.stream import SampleDecoder, count_samples, expand_urls, make_stream
from selfsup.data.views import crop_flip_view, eval_view, to_float
from selfsup.core.errors import UserError

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
                      "trainer.log_every_n_steps=1", f"run_dir={tmp_path}", "run_name=r", check=True, in_process=True)
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


# ---- the fast paths give what the reference paths give -----------------------------------------
def _photo(size=(96, 72)):
    """A crop of a real photograph (scikit-learn ships two), as a PIL image."""
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0]).crop((200, 100, 200 + size[0], 100 + size[1]))


def _encode(image, fmt="JPEG", **kw):
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_fast_decode_gives_the_pil_image():
    import io

    from selfsup.data.stream import decode_image

    photo = _photo()
    for image in (photo, photo.convert("L"), photo.convert("CMYK")):  # CMYK: decode_jpeg refuses, PIL decodes
        data = _encode(image, quality=90)
        fast = decode_image(data, "jpg")
        with Image.open(io.BytesIO(data)) as img:
            ref = torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1)
        assert fast.dtype == torch.uint8 and fast.shape == ref.shape == (3, 72, 96), (image.mode, fast.shape)
        diff = (fast.int() - ref.int()).abs().float()
        assert diff.mean() < 1.0 and diff.max() <= 16, (image.mode, diff.mean(), diff.max())
    png = decode_image(_encode(photo, "PNG"), "png")  # lossless: exact
    assert torch.equal(png, torch.from_numpy(np.asarray(photo)).permute(2, 0, 1))
    with pytest.raises(Exception):
        decode_image(b"\xff\xd8\xff\xe0 not a jpeg", "jpg")


def test_fast_tar_reader_reads_what_tarfile_reads(tmp_path):
    import io
    import tarfile

    from selfsup.data.tarstream import TarError, tar_members

    files = {"a/b/000.jpg": b"x" * 700, "000.cls": b"3", "001.jpg": b"", "__meta__.json": b"{}",
             "d/" + "long" * 40 + ".png": b"y" * 1500, "ümlaut.txt": "é".encode()}
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            d = tarfile.TarInfo("a/b")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            for name, data in files.items():
                if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                    continue
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1.5  # a fractional mtime: a PAX header per member
                tar.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        expected = []
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
        assert list(tar_members(io.BytesIO(raw))) == expected, fmt
        with pytest.raises(TarError):
            list(tar_members(io.BytesIO(raw[:1000])))
        broken = bytearray(raw)
        broken[1] ^= 0xFF
        with pytest.raises(TarError, match="checksum"):
            list(tar_members(io.BytesIO(bytes(broken))))
    # and through webdataset, on shards that `submit shards` writes
    import webdataset as wds

    from selfsup.data.tarstream import use_fast_tar_reader

    src = make_image_folder(tmp_path / "images", per_class=5, corrupt=0)
    urls = [str(p) for p in write_shards_from(str(src), tmp_path / "shards", samples_per_shard=4)]
    plain = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False))
    fast = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    assert use_fast_tar_reader(fast)
    assert list(fast) == plain and len(plain) == 10


def test_batched_photometric_ops_match_torchvision():
    from torchvision.transforms.v2 import functional as TF

    from selfsup.data import views as V

    torch.manual_seed(0)
    x = torch.rand(5, 3, 20, 24)
    x[0] = x[0, :1]  # a gray image (hue undefined)
    x[1, 1, :4] = 0.0  # saturated colours: a channel at 0 (as after a clamp)
    x[2, :, :3] = 1.0
    f = torch.tensor([0.6, 1.0, 1.3, 0.0, 1.4])
    for mine, ref in ((V.adjust_brightness, TF.adjust_brightness), (V.adjust_contrast, TF.adjust_contrast),
                      (V.adjust_saturation, TF.adjust_saturation)):
        expected = torch.stack([ref(x[i], float(f[i])) for i in range(5)])
        assert torch.allclose(mine(x.clone(), f), expected, atol=1e-5), mine.__name__
    hue = torch.tensor([-0.5, -0.1, 0.0, 0.07, 0.5])
    assert torch.allclose(V.adjust_hue(x, hue), torch.stack([TF.adjust_hue(x[i], float(hue[i])) for i in range(5)]),
                          atol=1e-5)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    blurred = torch.stack([TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2) for i in range(5)])
    assert torch.allclose(V.gaussian_blur(x, 7, sigma), blurred, atol=1e-5)
    # the per-image blur transform draws sigma as v2.GaussianBlur does and gives its uint8 image
    u8 = (x[1] * 255).round().to(torch.uint8)
    torch.manual_seed(3)
    ours = V.SeparableGaussianBlur(17, (0.1, 2.0))(u8)
    torch.manual_seed(3)
    assert torch.equal(ours, v2.GaussianBlur(17, sigma=(0.1, 2.0))(u8))


def test_batched_photometric_draws_per_image():
    from selfsup.data.views import Photometric, batched_photometric

    torch.manual_seed(0)
    same = torch.rand(1, 3, 16, 16).expand(64, -1, -1, -1).contiguous()
    out = batched_photometric(same, Photometric(flip=0.0, jitter=1.0))
    per_image = out.flatten(1)
    assert (per_image - per_image[:1]).abs().amax(1).gt(1e-3).sum() >= 60  # not one draw for the batch
    assert out.min() >= 0 and out.max() <= 1 and out.isfinite().all()
    for seed in range(20):  # every op, in every order, on images with clamped (0 and 1) values
        torch.manual_seed(seed)
        full = batched_photometric(torch.rand(8, 3, 8, 8).mul_(1.6).sub_(0.3).clamp_(0, 1),
                                   Photometric(jitter=0.8, gray=0.2, blur=0.5, blur_kernel=3))
        assert full.isfinite().all() and full.min() >= 0 and full.max() <= 1, seed
    gray = batched_photometric(same, Photometric(flip=0.0, gray=0.5))
    is_gray = (gray[:, 0] == gray[:, 1]).flatten(1).all(1) & (gray[:, 1] == gray[:, 2]).flatten(1).all(1)
    assert 10 <= int(is_gray.sum()) <= 54


def test_two_stage_view_is_the_one_stage_view():
    from selfsup.data.stream import collate
    from selfsup.data.views import multi_crop_view

    photo = _photo((64, 64))
    view = multi_crop_view(MEAN, STD, teacher_size=32, teacher_resize=32, num_crops=2, crop_size=24,
                           patch_image_size=48, patch_size=16, patch_jitter=6)
    for v in (view, view.with_gpu_augment(True), view.with_gpu_augment(True, in_workers=True)):
        torch.manual_seed(0)
        whole = v(photo)
        torch.manual_seed(0)
        sample = v.sample(photo)
        assert all(t.dtype == torch.uint8 for t in sample.values())
        assert sample["patches"].shape == (3, 48, 48)  # cut into the grid after normalising
        batch = v.batch(v.worker_batch(collate([{"key": "k", "label": 0, **sample}])))
        for name in ("image", "crops", "patches"):
            assert batch[name].dtype == torch.float32 and batch[name].isfinite().all(), name
            assert torch.allclose(batch[name][0], whole[name], atol=1e-5), name
        assert whole["crops"].shape == (2, 3, 24, 24) and whole["patches"].shape == (5, 3, 16, 16)
    # the deterministic eval view: what the one-stage torchvision chain on the PIL image gives
    ref = v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(32), *to_float(MEAN, STD)])(photo)
    assert (eval_view(32, MEAN, STD)(photo)["image"] - ref).abs().mean() < 0.02


def test_gpu_augment_runs_in_the_workers_without_a_gpu(tmp_path):
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from selfsup.data.stream import ShardDataModule
    from selfsup.data.views import resized_crop_view

    photo = _photo((80, 60))
    folder = tmp_path / "images" / "x"
    folder.mkdir(parents=True)
    for i in range(8):
        photo.rotate(i * 10).save(folder / f"{i}.jpg", quality=90)
    write_shards_from(str(tmp_path / "images"), tmp_path / "shards", samples_per_shard=4)
    cfg = OmegaConf.create({"name": "shards", "train": str(tmp_path / "shards"), "batch_size": 4, "num_workers": 1,
                            "shuffle_buffer": 0, "resampled": False, "epoch_samples": None, "gpu_augment": True,
                            "prefetch_factor": 2})
    dm = ShardDataModule(cfg, resized_crop_view(32, MEAN, STD, scale=(0.5, 1.0)))
    assert dm.train_view_in_use().in_workers  # no GPU here: batched augmentation in the workers
    seen = []

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            seen.append(batch["image"])
            return (self.w - batch["image"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, use_distributed_sampler=False).fit(Probe(), datamodule=dm)
    assert len(seen) == 2
    for image in seen:  # uint8 from the workers, finished by the DataModule's batch stage in Lightning's hook
        assert image.dtype == torch.float32 and image.shape == (4, 3, 32, 32)
        assert -2.5 < float(image.min()) and float(image.max()) < 2.5 and float(image.std()) > 0.1
    dm.cfg.gpu_augment = False
    assert not dm.train_view_in_use().gpu_augment


@pytest.mark.long
def test_a_run_is_reproducible_from_its_seed(tmp_path):
    # one loader worker and a shuffle buffer: the buffer's order, the augmentations and the method's own
    # randomness (rotations) all follow `seed`, so a rerun pretrains to the same weights and another
    # seed does not. The first run has a fresh interpreter of its own (another hash seed, nothing run
    # before it); the rerun and the other seed run in this process, after it
    src = make_image_folder(tmp_path / "images", per_class=40, corrupt=0)
    write_shards_from(str(src), tmp_path / "shards", samples_per_shard=40)

    def weights(name, seed, in_process):
        run_submit("pretrain", "rotnet", "resnet_tiny", f"data={tmp_path / 'shards'}", "data.batch_size=8",
                   "data.num_workers=1", "data.shuffle_buffer=100", "trainer.max_steps=6", f"seed={seed}",
                   "trainer.enable_progress_bar=false", f"run_dir={tmp_path}", f"run_name={name}", check=True,
                   in_process=in_process)
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return ckpt["state_dict"]

    first, again, other = weights("a", 0, False), weights("b", 0, True), weights("c", 1, True)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_a_resumed_epoch_has_the_batches_the_uninterrupted_epoch_had(tmp_path):
    # 2 loader workers (2 sub-streams, batches taken from each in turn) and a corrupt sample in every
    # shard: a loader restored from the state after 7 batches (odd: the next batch is the second
    # worker's) gives exactly the rest of the epoch, having dropped what was read before it; within
    # an epoch every sample comes once, and the next epoch has another order
    from conftest import write_keyed_shards

    good = write_keyed_shards(tmp_path / "shards", shards=4, per_shard=12, corrupt_per_shard=1)
    urls = expand_urls(str(tmp_path / "shards"))

    def loader():
        return make_stream(urls, SampleDecoder(eval_view(8, MEAN, STD), _counter()), batch_size=4, num_workers=2,
                           shuffle_buffer=16, resampled=False, seed=0, batches_per_rank=10)

    whole = loader()
    epoch0, epoch1 = ([list(b["key"]) for b in whole] for _ in range(2))
    keys = [k for batch in epoch0 for k in batch]
    assert len(epoch0) == 10 and len(set(keys)) == len(keys) == 40 and set(keys) <= set(good)
    assert epoch1 != epoch0

    cut = loader()
    batches = iter(cut)
    assert [list(next(batches)["key"]) for _ in range(7)] == epoch0[:7]
    state = cut.stream_state()
    cut.close()
    read = state["ranks"][0]["read"]
    assert state["epoch"] == 0 and state["batches"] == 7 and state["ranks"][0]["next"] == 1
    assert sum(read) > 7 * 4  # a corrupt sample was read before the cut: skipping counts it too
    resumed = loader()
    resumed.resume_from(state)
    assert [list(b["key"]) for b in resumed] == epoch0[7:]
    assert [list(b["key"]) for b in resumed] == epoch1
