"""Feature extraction split across ranks: each of N ranks extracts the features of its own
contiguous block of shards and writes them beside the feature cache as one part file (atomically);
rank 0 waits for every part, concatenates them in rank order into the cache file (the one a
single process writes, under the same name) and fits the probe.

The blocks are contiguous and in shard order, so with one loader worker per rank
(`data.num_workers` 0 or 1) the gathered features are those of a single process, row for row. A
part already on disk is kept (a requeued job extracts only the parts that are missing); a rank that
fails leaves a `.failed` note, named by its attempt (a requeued job is another attempt), that ends
rank 0's wait with its error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from selfsup.core.atomic import write_atomic, write_text_atomic
from selfsup.core.errors import UserError


@dataclass(frozen=True)
class RankShare:
    """Which share of the extraction this process does: rank `rank` of `world_size`, in attempt
    `attempt` (e.g. a Slurm job id and restart count); rank 0 waits up to `wait_s` seconds for the
    others' parts (None: as long as it takes)."""

    rank: int
    world_size: int
    attempt: str = "0"
    wait_s: float | None = None


def rank_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Rank `rank`'s block of `urls`: contiguous, in order, sizes differing by one at most (empty
    when there are fewer shards than ranks)."""
    n = len(urls)
    return list(urls[rank * n // world_size:(rank + 1) * n // world_size])


def part_file(cache: Path, rank: int, world_size: int) -> Path:
    return cache.with_name(f"{cache.stem}.part{rank}of{world_size}.pt")


def failure_file(cache: Path, rank: int, world_size: int, attempt: str) -> Path:
    return part_file(cache, rank, world_size).with_suffix(f".{attempt}.failed")


def write_part(cache: Path, rank: int, world_size: int, features: dict) -> Path:
    path = part_file(cache, rank, world_size)
    write_atomic(path, lambda temporary: torch.save(features, temporary))
    return path


def write_failure(cache: Path, share: RankShare, error: BaseException) -> None:
    write_text_atomic(failure_file(cache, share.rank, share.world_size, share.attempt), f"{type(error).__name__}: {error}\n")


def wait_for_parts(cache: Path, world_size: int, *, attempt: str = "0", timeout_s: float | None = None,
                   poll_s: float = 1.0) -> list[Path]:
    """The part files of every rank, once all are there; a rank's `.failed` note of this attempt
    raises its error."""
    paths = [part_file(cache, r, world_size) for r in range(world_size)]
    start = time.monotonic()
    while True:
        for rank in range(world_size):
            failed = failure_file(cache, rank, world_size, attempt)
            if failed.exists():
                raise UserError(f"feature extraction failed on rank {rank} of {world_size}: {failed.read_text().strip()}")
        if all(p.exists() for p in paths):
            return paths
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            missing = [str(r) for r, p in enumerate(paths) if not p.exists()]
            raise UserError(f"no features from rank(s) {', '.join(missing)} of {world_size} after {timeout_s:g} s "
                            f"(expected {paths[int(missing[0])]})")
        time.sleep(poll_s)


def _cat(values: list):
    values = [v for v in values if v is not None]  # a rank without shards
    if isinstance(values[0], dict):  # several layers' features (selfsup.eval.layers)
        return {k: torch.cat([v[k] for v in values]) for k in values[0]}
    return torch.cat(values)


def concatenate(parts: list[dict]) -> dict:
    """{split: {group: (x, labels)}} of the parts, each split and group concatenated in rank order."""
    out = {}
    for split in parts[0]:
        groups = [g for part in parts for g in (part[split] or {})]
        out[split] = {}
        for group in dict.fromkeys(groups):
            pieces = [(part[split] or {}).get(group) for part in parts]
            pieces = [p for p in pieces if p is not None]
            out[split][group] = (_cat([x for x, _ in pieces]), _cat([y for _, y in pieces]))
    return out


def gather_parts(cache: Path, world_size: int, *, attempt: str = "0", timeout_s: float | None = None) -> dict:
    """Every rank's part, concatenated and written as the feature cache `cache` (atomically); the
    parts (and the failure notes of earlier attempts) are removed once the cache is written. Parts
    are memory-mapped, not read whole first."""
    paths = wait_for_parts(cache, world_size, attempt=attempt, timeout_s=timeout_s)
    features = concatenate([torch.load(p, weights_only=True, mmap=True) for p in paths])
    write_atomic(cache, lambda temporary: torch.save(features, temporary))
    for path in paths:
        path.unlink(missing_ok=True)
    for note in cache.parent.glob(f"{cache.stem}.part*of{world_size}.*.failed"):
        note.unlink(missing_ok=True)
    return features
