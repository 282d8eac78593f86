"""The training stream, cut into epochs that a resumed run continues where they were left.

The batches of an epoch are a function of (seed, epoch, rank, sub-stream) alone. A rank owns every
world-size-th shard, and reads them as W sub-streams, one per DataLoader worker (W = 1 without
workers): each owns some of the rank's shards for this epoch and reads them in passes, every pass
shuffled in a seeded buffer that is emptied at the end of the pass (so a pass gives each of its
samples once), and the DataLoader takes batch i of the epoch from sub-stream i mod W.

`EpochLoader` counts, for every sub-stream, the stored samples read up to the last batch it handed
to training. The DataModule's `state_dict`/`load_state_dict` carry that count in the checkpoint
(every rank's, gathered when the checkpoint is written; Lightning restores a loader's own state only
when the loader is made after the checkpoint is loaded, and a method's optimizer schedule, sized by
`estimated_stepping_batches`, makes it before). A resumed run starts the same epoch's sub-streams,
drops the samples already read before they are decoded (only the shard bytes are read again, and
the shuffle buffer refilled), and gives worker p the sub-stream whose batch comes next (the
DataLoader always starts an epoch at worker 0): training then receives exactly the batches that the
uninterrupted run would have received, corrupt samples included. Shards are opened as everywhere in
the package (selfsup/data/remote.py: files, http(s) with timeouts and resumed reads, pipe: commands),
and a remote one is fetched again for the part a resumed run drops; a shard that cannot be read is
skipped and counted, so the resume is exact as long as the shards read as they did before.

Workers start with each epoch (they read that epoch's start from the dataset they are forked with)
and end with it; a loader left mid-epoch ends its workers on `close()` (the DataModule calls it
when fit ends, however it ends) or at the latest when the process exits.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import random
import signal
import weakref
from collections.abc import Callable, Iterator

import torch

from selfsup.data.remote import ReadSettings, ShardOpener
from selfsup.data.tarstream import fast_tar_expander

log = logging.getLogger(__name__)
INTERLEAVED_SHARDS = 4  # shards of stored sequences read side by side by one sub-stream


def epoch_shards(urls: list[str], *, seed: int, epoch: int, rank: int, world_size: int, substream: int,
                 substreams: int) -> list[str]:
    """The shards one sub-stream reads in an epoch: its rank's shards (every world_size-th, the same
    for the whole run), in the epoch's seeded order, split among the sub-streams; disjoint across
    ranks and sub-streams."""
    mine = urls[rank::world_size]
    return random.Random(f"shards:{seed}:{epoch}:{rank}").sample(mine, len(mine))[substream::substreams]


class SubStreams(torch.utils.data.IterableDataset):
    """What one DataLoader worker (or the training process, without workers) yields for an epoch:
    `(sub-stream, stored samples read, batch)`, endlessly (the loader decides where the epoch ends)."""

    def __init__(self, urls: list[str], substreams: int, *, rank: int, world_size: int, seed: int, resampled: bool,
                 shuffle_buffer: int, decoder: Callable, batch_size: int, collation_fn: Callable,
                 read: ReadSettings, failures: Callable[[Exception], bool], expand: Callable | None = None):
        super().__init__()
        self.urls, self.substreams = list(urls), substreams
        # where the next iteration starts: (epoch, the sub-stream worker 0 serves, stored samples each
        # sub-stream skips); set by EpochLoader before it starts the workers, which are forked with it
        self.start: tuple[int, int, list[int]] = (0, 0, [0] * substreams)
        self.rank, self.world_size, self.seed, self.resampled = rank, world_size, seed, resampled
        self.shuffle_buffer, self.decoder, self.expand = shuffle_buffer, decoder, expand
        self.batch_size, self.collation_fn = batch_size, collation_fn
        # how remote shards are read (timeouts, retries), and the handler of a shard that fails (it is
        # skipped and counted: ShardFailures in selfsup/data/stream.py)
        self.read, self.failures = read, failures

    def __iter__(self) -> Iterator[tuple[int, int, dict]]:
        info = torch.utils.data.get_worker_info()
        epoch, first, skips = self.start
        substream = ((info.id if info else 0) + first) % self.substreams
        read = skips[substream]
        stored = itertools.islice(self._stored(epoch, substream), read, None)  # already trained on: not decoded

        def counted():
            nonlocal read
            for sample in stored:
                read += 1
                yield sample

        decoded = (s for s in map(self.decoder, counted()) if s is not None)
        while len(samples := list(itertools.islice(decoded, self.batch_size))) == self.batch_size:
            yield substream, read, self.collation_fn(samples)

    def _stored(self, epoch: int, substream: int) -> Iterator:
        """The sub-stream's samples, before decoding: pass after pass over its shards (or shards drawn
        with replacement, one endless pass), each pass shuffled on its own."""
        tag = f"{self.seed}:{epoch}:{self.rank}:{substream}"
        if self.resampled:
            rng = random.Random(f"resampled:{tag}")
            yield from self._shuffled(self._read(rng.choice(self.urls) for _ in itertools.count()), tag)
            return
        shards = epoch_shards(self.urls, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                              substream=substream, substreams=self.substreams)
        for n in itertools.count():
            order = shards if n == 0 else random.Random(f"pass:{tag}:{n}").sample(shards, len(shards))
            empty = True
            for sample in self._shuffled(self._read(order), f"{tag}:{n}"):
                empty = False
                yield sample
            if empty:  # nothing readable in these shards: end here rather than loop on nothing
                return

    def _read(self, urls) -> Iterator[dict]:
        """The samples of `urls`, in order: each shard opened by selfsup.data.remote's ShardOpener (a
        file, http(s) with timeouts and resumed reads, pipe:) and read by the fast tar reader; a shard
        that fails is skipped from where it failed (what was read of it is kept)."""
        import webdataset as wds
        from webdataset.tariterators import group_by_keys

        if self.expand is not None:  # stored sequences: read several shards side by side (see _interleaved)
            return self._interleaved(urls)
        opened = ShardOpener(self.read, self.failures)(urls)
        return group_by_keys(fast_tar_expander(opened, self.failures), handler=wds.warn_and_continue)

    def _interleaved(self, urls) -> Iterator[dict]:
        """The samples of `urls`, INTERLEAVED_SHARDS shards at a time, one sample from each in turn.
        A shard of episode chunks often holds one game, or a few episodes: read one shard at a time,
        the shuffle buffers would mix only those, and whole batches would come from one game."""
        import webdataset as wds
        from webdataset.tariterators import group_by_keys

        def one(url):
            opened = ShardOpener(self.read, self.failures)([url])
            return group_by_keys(fast_tar_expander(opened, self.failures), handler=wds.warn_and_continue)

        urls = iter(urls)
        readers = [one(url) for url in itertools.islice(urls, INTERLEAVED_SHARDS)]
        while readers:
            for reader in list(readers):
                sample = next(reader, None)
                if sample is not None:
                    yield sample
                    continue
                readers.remove(reader)
                url = next(urls, None)
                if url is not None:
                    readers.append(one(url))

    def _shuffled(self, samples: Iterator, tag: str) -> Iterator:
        import webdataset as wds

        buffer = self.shuffle_buffer
        if self.expand is not None:
            if buffer:
                samples = wds.shuffle(min(buffer, 64), min(buffer, 16), rng=random.Random(f"stored:{tag}"))(samples)
            samples = self.expand(samples)
        if buffer:
            samples = wds.shuffle(buffer, min(buffer, 1000), rng=random.Random(f"samples:{tag}"))(samples)
        return samples


def keep_running_on_sigterm(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM. Slurm sends it to every process of a job; the training
    process then finishes its step and checkpoints (it needs its workers' batches to get there), and
    the workers end with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class EpochLoader:
    """`batches_per_epoch` batches per iteration from a DataLoader over `SubStreams`; an iteration is
    an epoch. `epoch_of_run()` (the trainer's current epoch) names the epoch when there is one;
    otherwise iterations count from epoch 0."""

    def __init__(self, dataset: SubStreams, loader: torch.utils.data.DataLoader, batches_per_epoch: int,
                 epoch_of_run: Callable[[], int | None] | None = None):
        self.dataset, self.loader, self.batches_per_epoch = dataset, loader, batches_per_epoch
        self.substreams = dataset.substreams
        self.epoch_of_run = epoch_of_run
        self._epoch, self._done, self._read, self._next = -1, 0, [0] * self.substreams, 0
        self._resume: tuple[int, int, list[int], int] | None = None
        self._current = None  # (a weak reference to) the epoch being iterated
        _OPEN.add(self)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        # nothing starts until the first batch is asked for: Lightning calls iter() to check that the
        # loader is iterable, and before it has settled the epoch of a resumed run
        batches = self._epoch_batches()
        self._current = weakref.ref(batches)
        return batches

    def _epoch_batches(self) -> Iterator[dict]:
        epoch, done, read, first = self._resume or (self._next_epoch(), 0, [0] * self.substreams, 0)
        self._resume = None
        self._epoch, self._done, self._read, self._next = epoch, done, list(read), first
        self.dataset.start = (epoch, first, list(read))
        # the only reference to the DataLoader's iterator: its workers end when this epoch ends or is closed
        workers = iter(self.loader)
        for substream, stored_read, batch in itertools.islice(workers, self.batches_per_epoch - done):
            self._read[substream] = stored_read
            self._next = (substream + 1) % self.substreams
            self._done += 1
            yield batch

    def _next_epoch(self) -> int:
        epoch = self.epoch_of_run() if self.epoch_of_run is not None else None
        return self._epoch + 1 if epoch is None else epoch

    def close(self) -> None:
        """End the workers of an epoch left unfinished (a run that ends mid-epoch)."""
        batches = self._current() if self._current is not None else None
        if batches is not None:
            batches.close()

    def stream_state(self) -> dict:
        """Where the stream stands after the batches handed out so far, for every rank (a collective
        under torch.distributed: every rank writes a checkpoint together)."""
        ranks = _gather({"read": list(self._read), "next": self._next})
        return {"epoch": self._epoch, "batches": self._done, "substreams": self.substreams, "ranks": ranks}

    def resume_from(self, state: dict) -> None:
        """The next iteration goes on from `state` (a `stream_state()`)."""
        epoch, done = int(state.get("epoch", -1)), int(state.get("batches", 0))
        if epoch < 0:
            return
        fresh = [0] * self.substreams
        if done >= self.batches_per_epoch:  # saved after the epoch's last batch: the next one starts fresh
            self._resume = (epoch + 1, 0, fresh, 0)
            return
        ranks = state.get("ranks", [])
        if state.get("substreams") != self.substreams or len(ranks) != self.dataset.world_size:
            log.warning("the checkpoint's data stream had %s rank(s) x %s sub-stream(s), this run %s x %s: epoch %d "
                        "goes on from the start of its stream (some of its samples are seen twice)",
                        len(ranks), state.get("substreams"), self.dataset.world_size, self.substreams, epoch)
            self._resume = (epoch, done, fresh, 0)
            return
        mine = ranks[self.dataset.rank]
        self._resume = (epoch, done, [int(n) for n in mine["read"]], int(mine["next"]))


def _gather(state: dict) -> list[dict]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return states
    return [state]


# Workers ignore SIGTERM, so the exit of the process must not wait on one that was never told to end
# (multiprocessing's own exit handler terminates and joins them): close what is still open first.
# atexit runs the last registered first, and multiprocessing registered its handler on import.
_OPEN: weakref.WeakSet[EpochLoader] = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for loader in list(_OPEN):
        loader.close()
