"""Feature extraction split across ranks (selfsup/eval/feature_parts.py): each rank extracts its own
block of shards into a part file, rank 0 gathers them into the feature cache."""

import pytest
import torch

from conftest import run_submit
from selfsup.core.errors import UserError
from selfsup.eval.feature_parts import (RankShare, concatenate, gather_parts, part_file, rank_shards,
                                        write_failure, write_part)
from selfsup.eval.probe import probe_config, probe_features
from selfsup.eval.targets import get_target


def test_rank_blocks_are_contiguous_disjoint_and_cover_every_shard():
    urls = [f"s{i}" for i in range(7)]
    for world in (1, 2, 3, 7, 9):
        blocks = [rank_shards(urls, r, world) for r in range(world)]
        assert sum(blocks, []) == urls  # in order, each shard once
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [rank_shards(urls[:2], r, 3) for r in range(3)] == [[], ["s0"], ["s1"]]


def test_parts_concatenate_in_rank_order_and_skip_ranks_without_shards():
    a = {"train": {"all": (torch.ones(2, 3), torch.tensor([0, 1]))}, "test": None}
    b = {"train": {"all": (torch.zeros(1, 3), torch.tensor([2]))}, "test": {"all": (torch.ones(1, 3), torch.tensor([5]))}}
    out = concatenate([a, b])
    assert torch.equal(out["train"]["all"][1], torch.tensor([0, 1, 2])) and out["train"]["all"][0].shape == (3, 3)
    assert torch.equal(out["test"]["all"][1], torch.tensor([5]))


def test_a_failed_rank_ends_the_wait_with_its_error(tmp_path):
    cache = tmp_path / "features-x.pt"
    write_part(cache, 0, 2, {"train": None, "test": None})
    write_failure(cache, RankShare(1, 2, attempt="old"), RuntimeError("an earlier attempt"))
    with pytest.raises(UserError, match="no features from rank"):  # another attempt's note is not this one's
        gather_parts(cache, 2, attempt="new", timeout_s=0.5)
    write_failure(cache, RankShare(1, 2, attempt="new"), RuntimeError("CUDA out of memory"))
    with pytest.raises(UserError, match="failed on rank 1 of 2: RuntimeError: CUDA out of memory"):
        gather_parts(cache, 2, attempt="new", timeout_s=60)


@pytest.fixture(scope="module")
def digits_in_shards(tmp_path_factory):
    """The digits as 5 train shards and 2 test shards of 300 samples (the built-in copy is one shard each)."""
    out = tmp_path_factory.mktemp("digits-shards")
    run_submit("shards", "digits", out, "--samples-per-shard", "300", check=True)
    return out


def test_two_ranks_extract_disjoint_shards_and_gather_what_one_process_extracts(digits_in_shards, tmp_path):
    # train: 3 shards of 300 (rank 0 reads the first, rank 1 the other two); test: 1 shard, read by
    # rank 1 alone (rank 0 has none of it)
    train, test = digits_in_shards / "train" / "train-{000000..000002}.tar", digits_in_shards / "test" / "test-000000.tar"
    cfg = probe_config(["data=digits", f"data.train={train}", f"data.test={test}", "data.num_workers=0", "data.image_size=16",
                        "probe.precision=32-true", "probe.batch_size=128"], None)
    target = get_target(cfg.data.eval_target)
    backbone = target.pixels()  # the raw-pixel features: what is extracted does not matter here, where
    # and in which order it is does
    alone = probe_features(backbone, cfg, target, tmp_path / "alone", "pixels")
    (cache,) = (tmp_path / "alone").glob("features-*.pt")

    ranks = tmp_path / "ranks"
    # rank 1 first (in this process, one rank after the other): it writes its part and returns nothing
    assert probe_features(backbone, cfg, target, ranks, "pixels", share=RankShare(1, 2)) is None
    part = torch.load(part_file(ranks / cache.name, 1, 2), weights_only=True)
    assert len(part["train"]["all"][1]) == 600 and len(part["test"]["all"][1]) == 300
    gathered = probe_features(backbone, cfg, target, ranks, "pixels", share=RankShare(0, 2, wait_s=60))
    assert sorted(p.name for p in ranks.iterdir()) == [cache.name]  # the cache of one process; parts removed
    for split, samples in (("train", 900), ("test", 300)):
        x_alone, y_alone = alone[split]["all"]
        x_ranks, y_ranks = gathered[split]["all"]
        assert len(y_alone) == samples and torch.equal(y_ranks, y_alone) and torch.equal(x_ranks, x_alone)
