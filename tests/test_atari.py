"""Atari data: real ale-py play written to ordered episode shards, and the temporal samples that the
training stream assembles from them (o_t, o_{t-3}, o_{t+3}, clamped at episode borders)."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_submit
from selfsup.data import atari
from selfsup.data.atari import RAM_VARIABLES, decode_chunk, write_atari_shards
from selfsup.data.stream import ShardDataModule, count_samples
from selfsup.data.temporal import TemporalView, tov_transforms, triplet
from selfsup.eval.atari_ram import load_split

MAX_EPISODE = 40  # short episodes: many borders in a few hundred frames


@pytest.fixture(scope="module")
def short_episodes(tmp_path_factory):
    out = tmp_path_factory.mktemp("atari-short")
    report = write_atari_shards(out, ["Pong", "Breakout"], frames=400, test_frames=0, max_episode_frames=MAX_EPISODE,
                                samples_per_shard=3, chunk_starts=16)
    return out / "train", report


def episodes_from_chunks(chunks):
    """Whole episodes rebuilt from the stored chunks: {episode: frames [L, 84, 84]}."""
    episodes = {}
    for c in chunks:
        ep = episodes.setdefault(c.episode, np.zeros((c.episode_length, 84, 84), np.uint8))
        ep[c.first_frame : c.first_frame + len(c.frames)] = c.frames
    return episodes


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def test_shards_hold_ordered_episodes_with_counts(short_episodes):
    folder, report = short_episodes
    stats = report["splits"]["train"]
    assert stats["frames"] == 400 and stats["episodes"] >= 10
    index = json.loads((folder / "index.json").read_text())
    assert index["atari"]["frame_skip"] == 4 and index["atari"]["frames"] == 400
    chunks = load_split(folder)
    episodes = episodes_from_chunks(chunks)
    assert len(episodes) == stats["episodes"]
    # every stack start of every episode is owned by exactly one chunk: the epoch size is exact
    owned = sorted((c.episode, t) for c in chunks for t in c.starts())
    assert len(owned) == len(set(owned)) == sum(len(e) - 2 for e in episodes.values()) == count_samples(str(folder))
    for c in chunks:
        assert c.frames.shape[1:] == (84, 84) and c.ram.shape == (len(c.frames), 128)
        assert c.episode_length <= MAX_EPISODE
    # real play: frames change over time and are not blank
    frames = np.concatenate(list(episodes.values()))
    assert frames.std() > 10 and np.abs(np.diff(frames.astype(int), axis=0)).mean() > 0.1


def test_training_samples_never_cross_an_episode_border(short_episodes):
    folder, _ = short_episodes
    episodes = episodes_from_chunks(load_split(folder))
    cfg = OmegaConf.create({"train": str(folder), "batch_size": 16, "num_workers": 0, "shuffle_buffer": 200,
                            "resampled": False, "epoch_samples": None, "name": "shards"})
    dm = ShardDataModule(cfg, TemporalView(augment=False), seed=0)
    seen = set()
    clamped_start = clamped_end = 0
    for batch in dm.train_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)  # the view's batch stage, as training runs it
        for i, episode in enumerate(batch["episode"]):
            frames = torch.from_numpy(episodes[episode])
            length = len(frames)
            t, prev, nxt = batch["starts"][i].tolist()
            assert prev == max(0, t - 3) and nxt == min(length - 3, t + 3)
            # pixels of every stack are those of the sample's own episode at the clamped starts
            for view, start in (("x", t), ("y", t), ("z", prev), ("w", nxt)):
                assert torch.equal(to_uint8(batch[view][i]), frames[start : start + 3])
            clamped_start += t < 3
            clamped_end += t > length - 6
            seen.add((episode, t))
    total = sum(len(e) - 2 for e in episodes.values())
    assert len(seen) > 0.6 * total  # one epoch of a shuffled, cycled stream covers most samples
    assert clamped_start > 0 and clamped_end > 0  # border samples were drawn and checked


def test_augmented_views_shapes_and_ranges(short_episodes):
    folder, _ = short_episodes
    chunk = load_split(folder)[0]
    torch.manual_seed(0)
    sample = TemporalView()((chunk, chunk.start))
    for k in "xyzw":
        assert sample[k].shape == (3, 84, 84) and sample[k].dtype == torch.float32
        assert 0.0 <= sample[k].min() and sample[k].max() <= 1.0
    # x and y are two different augmentations of the same stack; z and w keep their geometry (A3 has no crop)
    assert not torch.equal(sample["x"], sample["y"])


@pytest.mark.parametrize("flip", [0.0, 0.5])
def test_flip_option_sets_how_often_a1_mirrors(flip):
    # left half bright, right half dark: jitter, grayscale and blur keep which side is brighter
    stack = torch.zeros(3, 84, 84, dtype=torch.uint8)
    stack[..., :42] = 200
    a1, _, _ = tov_transforms(crop_scale=(0.9, 1.0), flip=flip)
    torch.manual_seed(0)
    mirrored = sum(bool(x[..., :42].mean() < x[..., 42:].mean()) for x in (a1(stack) for _ in range(40)))
    assert mirrored == 0 if flip == 0 else 8 <= mirrored <= 32


def test_policy_gives_varied_ram_state(tmp_path):
    episodes = list(atari.play("Pong", 500, seed=3))
    ram = np.concatenate([e.ram for e in episodes])
    player_y = ram[:, RAM_VARIABLES["Pong"]["player_y"]]
    assert len(np.unique(player_y)) > 30  # the sticky-random paddle sweeps its range


def test_submit_shards_atari_command(tmp_path):
    proc = run_submit("shards", "atari", tmp_path / "out", "--games", "Breakout", "--frames", "150", "--test-frames", "60",
                      check=True)
    assert "frames/s" in proc.stdout and "ms CPU per frame" in proc.stdout
    assert "atari/train" in proc.stderr  # the progress bar
    for split, frames in (("train", 150), ("test", 60)):
        index = json.loads((tmp_path / "out" / split / "index.json").read_text())
        assert index["atari"]["frames"] == frames and index["atari"]["games"] == ["Breakout"]
    assert not list(tmp_path.glob("out*.partial-*"))  # written atomically
    bad = run_submit("shards", "atari", tmp_path / "bad", "--games", "Pongg")
    assert bad.returncode == 2 and "did you mean 'Pong'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_corrupt_chunk_is_skipped_and_counted(short_episodes):
    import multiprocessing

    import webdataset as wds

    from selfsup.data.temporal import expand_chunks

    folder, _ = short_episodes
    samples = list(wds.WebDataset(str(sorted(folder.glob("*.tar"))[0]), shardshuffle=False, empty_check=False))
    broken = dict(samples[0], **{"ram.npy": samples[0]["ram.npy"][: -128 * 2]})
    with pytest.raises(ValueError):
        decode_chunk(broken)
    skipped = multiprocessing.Value("l", 0)
    refs = list(expand_chunks(iter([broken, samples[1]]), skipped))
    assert skipped.value == 1 and len(refs) == decode_chunk(samples[1]).own


def test_ram_feature_cache_loads_weights_only(tmp_path, monkeypatch):
    """The RAM probe's features go through the probe's one feature cache, which holds tensors only
    (the RAM labels as uint8 tensors): the second call reads it with weights_only=True."""
    import selfsup.data.stream as stream
    from selfsup.eval import probe
    from selfsup.eval.targets import get_target

    target = get_target("atari_ram")
    read = []

    def fake_batches(cfg, split, spec):
        read.append(split)
        ram = torch.arange(3 * 128, dtype=torch.int64).reshape(3, 128).to(torch.uint8)
        return {"Pong": [{"image": torch.randn(3, 4), "label": ram}]}

    monkeypatch.setattr(stream, "resolve_split", lambda data, split: f"/unused/{split}")
    monkeypatch.setattr(target, "labelled_batches", fake_batches)
    cfg = OmegaConf.create({"data": {"image_size": 84, "mean": [0.5] * 3, "std": [0.5] * 3},
                            "probe": {"train_samples": 3, "test_samples": 3, "seed": 0, "batch_size": 8, "precision": "32-true"}})
    first = probe.probe_features(torch.nn.Identity(), cfg, target, tmp_path, "x")
    again = probe.probe_features(torch.nn.Identity(), cfg, target, tmp_path, "x")
    assert read == ["train", "test"]  # the second call read the cache
    for split in ("train", "test"):
        for a, b in zip(first[split]["Pong"], again[split]["Pong"]):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert again["train"]["Pong"][1].dtype == torch.uint8
    cache = next(tmp_path.glob("features-*.pt"))
    torch.load(cache, weights_only=True)


def test_a_batch_mixes_games_and_episodes_from_the_first_one(tmp_path):
    # each shard holds one game (samples_per_shard=6 at 16 starts a chunk): read one shard at a time, the
    # first batches would come from one game and a handful of chunks
    report = write_atari_shards(tmp_path, ["Pong", "Breakout"], frames=800, test_frames=0, max_episode_frames=120,
                                samples_per_shard=6, chunk_starts=16)
    folder = tmp_path / "train"
    games_per_shard = [{c.game for c in load_split(shard)} for shard in sorted(folder.glob("*.tar"))]
    assert sum(len(g) == 1 for g in games_per_shard) >= 4, games_per_shard
    cfg = OmegaConf.create({"train": str(folder), "batch_size": 32, "num_workers": 0, "shuffle_buffer": 64,
                            "resampled": False, "epoch_samples": None, "name": "shards"})
    batch = next(iter(ShardDataModule(cfg, TemporalView(augment=False), seed=0).train_dataloader()))
    games = [episode.split("-")[1] for episode in batch["episode"]]
    assert set(games) == {"Pong", "Breakout"} and min(games.count("Pong"), games.count("Breakout")) >= 6, games
    assert len(set(batch["episode"])) >= 6 and report["splits"]["train"]["frames"] == 800


def test_equal_previous_and_next_stacks_are_flagged(short_episodes):
    folder, _ = short_episodes
    view = TemporalView(augment=False)
    flags = []
    for chunk in load_split(folder):
        for t in chunk.starts():
            _, previous, following, _ = triplet(chunk, t)
            sample = view.sample((chunk, t))
            assert bool(sample["distinct"]) == (not np.array_equal(previous, following))
            flags.append(bool(sample["distinct"]))
    assert any(flags)


def test_batched_colour_stage_keeps_uint8_range_and_solarizes_as_torchvision():
    from torchvision.transforms import v2

    from selfsup.data.views import Photometric

    torch.manual_seed(0)
    stack = torch.randint(0, 256, (4, 3, 84, 84), dtype=torch.uint8)
    solarize = Photometric(flip=0.0, solarize=1.0, solarize_threshold=120)
    batched = (solarize.batched(stack.float() / 255) * 255).round().to(torch.uint8)
    assert torch.equal(batched, torch.stack([v2.RandomSolarize(120, p=1.0)(s) for s in stack]))
    view = TemporalView()
    batch = {k: stack.clone() for k in "xyzw"}
    out = view.batch(view.worker_batch(batch))
    for k in "xyzw":
        assert out[k].dtype == torch.float32 and 0.0 <= out[k].min() and out[k].max() <= 1.0
    assert not torch.equal(out["x"], out["y"])  # per-image draws: the two views of the same stacks differ
