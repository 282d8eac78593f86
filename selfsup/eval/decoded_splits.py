"""Decoded evaluation splits, kept in memory for the probes that follow in the same process.

Probing a run, then its random init and raw pixels (`probe.baselines=true`, the learning tests, a
learning curve) reads the same labelled split several times; decoding and resizing its images costs
about as much as a small network's forward pass. A split whose decoded batches fit under
`LIMIT_BYTES` is decoded once: later passes get the very same tensors. A larger split streams from
its shards on every pass.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator

import torch

LIMIT_BYTES = 512 * 2**20  # all the splits kept, together: 20,000 32-px RGB images take 234 MiB in fp32

_kept: OrderedDict[Hashable, tuple[list[dict], int]] = OrderedDict()  # key -> (batches, their bytes)


def file_identity(urls: list[str]) -> tuple:
    """What a key must change with: each shard's path, size and modification time."""
    identity = []
    for url in urls:
        try:
            stat = os.stat(url)
        except OSError:  # a remote or missing shard: never kept (its content may change)
            return ()
        identity.append((url, stat.st_size, stat.st_mtime_ns))
    return tuple(identity)


def batches_nbytes(batch: dict) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def decoded_once(key: Hashable | None, make_batches: Callable[[], Iterable[dict]]) -> Iterable[dict]:
    """The batches of `make_batches()`, or the ones a complete earlier pass under `key` kept. `key`
    None: stream, keep nothing."""
    if key is None:
        return make_batches()
    if key in _kept:
        _kept.move_to_end(key)
        return list(_kept[key][0])
    return _keeping_pass(key, make_batches)


def forget_all() -> None:
    _kept.clear()


def _keeping_pass(key: Hashable, make_batches: Callable[[], Iterable[dict]]) -> Iterator[dict]:
    """One pass over the batches that keeps them if it ends and they fit under LIMIT_BYTES."""
    kept, size = [], 0
    for batch in make_batches():
        if kept is not None:
            size += batches_nbytes(batch)
            if size <= LIMIT_BYTES:
                # a copy: a loader worker's tensors live in shared memory, one open file each
                kept.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            else:
                kept = None
        yield batch
    if kept is not None:
        _kept[key] = (kept, size)
        while len(_kept) > 1 and sum(nbytes for _, nbytes in _kept.values()) > LIMIT_BYTES:
            _kept.popitem(last=False)  # the least recently used split goes first
