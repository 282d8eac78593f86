"""Streaming WebDataset shards into Lightning.

One code path for every dataset: built-in data is written to shards once and streamed like any
user's shards. Training streams are endless (shards are cycled, or resampled) and cut into epochs
of a fixed number of batches per rank, so every rank runs the same number of steps (no DDP hang);
an epoch's batches follow from the seed and the epoch, and a resumed run continues them where the
checkpoint left them (selfsup/data/epoch_stream.py).
A sample that fails to decode is skipped and counted (a shared counter, read by the module's
logging), never fatal; so is a shard that cannot be read to its end (a remote one after its retries,
selfsup/data/remote.py), counted on a counter of its own.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule

from selfsup.data.contract import TrainView, as_train_view
from selfsup.data.remote import ReadSettings, ShardOpener, is_url, shard_folder
from selfsup.data.shards import read_index
from selfsup.data.tarstream import use_fast_tar_reader
from selfsup.data.views import ViewCollate
from selfsup.core.errors import UserError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")


def expand_urls(spec: str | list[str]) -> list[str]:
    """A folder of shards, a brace pattern (`data/train-{000000..000009}.tar`), a glob, a URL
    (`http://host/train-{000000..000099}.tar`, `pipe:COMMAND`), or a list. Local shards must exist;
    remote ones are not looked for here (a shard that cannot be read is skipped and counted)."""
    import braceexpand

    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_urls(s)]
    spec = str(spec)
    if is_url(spec):
        return list(braceexpand.braceexpand(spec))
    spec = spec.removeprefix("file://")
    path = Path(spec).expanduser()
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
    elif any(c in spec for c in "*?["):
        urls = sorted(str(p) for p in Path("/").glob(str(path.resolve()).lstrip("/")))
    else:
        urls = list(braceexpand.braceexpand(str(path)))
    missing = [u for u in urls if not Path(u).exists()]
    if not urls or missing:
        raise UserError(f"no shards found at {spec!r}" + (f" (missing: {missing[0]})" if missing else ""))
    return urls


def count_samples(spec: str | list[str]) -> int | None:
    """Samples in the shards, from the index.json that `submit shards` writes beside them (read over
    HTTP for http(s) shards); None if unknown (no index, a shard it does not list, pipe: shards)."""
    total = 0
    indexes: dict = {}
    for url in expand_urls(spec):
        folder, name = shard_folder(url)
        if folder is None:
            return None
        if folder not in indexes:
            indexes[folder] = read_index(folder)
        index = indexes[folder]
        if index is None or name not in index["shards"]:
            return None
        total += index["shards"][name]
    return total


def dataset_classes(spec: str | list[str]) -> list[str] | None:
    folder, _ = shard_folder(expand_urls(spec)[0])
    index = read_index(folder) if folder is not None else None
    return index.get("classes") if index else None


def unknown_size(spec) -> UserError:
    """The one-line error for shards whose number of samples nothing records."""
    first = expand_urls(spec)[0]
    folder, _ = shard_folder(first)
    if folder is None:
        where = "pipe: shards carry no index.json"
    elif is_url(first):
        where = f"no {folder}/index.json"
    else:
        where = "no index.json"
    return UserError(f"the size of {spec!r} is unknown ({where}): set data.epoch_samples=<N> (samples per epoch)")


JPEG_KEYS = ("jpg", "jpeg")


def decode_image(data: bytes, ext: str = "jpg") -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB tensor [3, H, W]. JPEGs go through torchvision.io.decode_jpeg
    (libjpeg-turbo straight into a tensor: faster than PIL's decode + conversion, BENCHMARKS.md),
    anything else (and a JPEG that it refuses, e.g. CMYK) through PIL."""
    if ext in JPEG_KEYS:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception:  # noqa: BLE001 - let PIL try (and raise a readable error)
            pass
    from PIL import Image

    from selfsup.data.views import as_uint8_image

    with Image.open(io.BytesIO(data)) as img:
        return as_uint8_image(img.convert("RGB"))


class ShardFailures:
    """The error handler of the shard readers: a shard that cannot be opened or read to its end is
    logged, counted on `counter` (a shared multiprocessing.Value, or None) and skipped; what was read
    of it before the failure is kept."""

    def __init__(self, counter: multiprocessing.Value | None = None):
        self.counter = counter

    def __call__(self, exn: Exception) -> bool:
        if self.counter is not None:
            with self.counter.get_lock():
                self.counter.value += 1
        *reason, url = exn.args or ("?",)
        log.warning("skipping the rest of shard %s: %s", url, " ".join(map(str, reason)) or type(exn).__name__)
        return True


class SampleDecoder:
    """Decodes one webdataset sample to `{"key", "label", **view(image)}`; returns None (and counts
    it) when the image cannot be decoded or the view fails on it. `stage="sample"` runs only the
    per-image stage of a two-stage view (`TrainView.sample`, uint8 tensors; the batch stage then runs
    on the training device); `"full"` gives the finished, normalised tensors."""

    def __init__(self, view: Callable, skipped: multiprocessing.Value, stage: str = "full",
                 keys: frozenset[str] | None = None):
        self.view = view
        self.skipped = skipped
        self.apply = view.sample if stage == "sample" else view
        self.keys = keys  # only these samples (a labelled subset); the others are passed over undecoded

    def __call__(self, sample: dict) -> dict | None:
        key = sample.get("__key__", "?")
        if self.keys is not None and key not in self.keys:
            return None
        try:
            ext = next(k for k in IMAGE_KEYS if k in sample)
            out = self.apply(decode_image(sample[ext], ext))
        except Exception as err:  # a corrupt sample must not end a long run
            with self.skipped.get_lock():
                self.skipped.value += 1
            log.warning("skipping sample %s from %s: %s", key, sample.get("__url__", "?"), err)
            return None
        label = int(sample["cls"]) if "cls" in sample else -1
        return {"key": key, "label": label, **out}


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, straight into shared memory inside a DataLoader worker (as default_collate does):
    the batch then crosses to the main process without another copy."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        elem = tensors[0]
        storage = elem._typed_storage()._new_shared(sum(t.numel() for t in tensors), device=elem.device)
        out = elem.new(storage).resize_(len(tensors), *elem.shape)
    return torch.stack(tensors, 0, out=out)


def collate(samples: list[dict]) -> dict:
    batch = {"key": [s["key"] for s in samples], "label": torch.tensor([s["label"] for s in samples])}
    for name in samples[0]:
        if name in batch:
            continue
        value = samples[0][name]
        if isinstance(value, torch.Tensor):
            batch[name] = _stack([s[name] for s in samples])
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            batch[name] = [_stack([s[name][i] for s in samples]) for i in range(len(value))]
        else:
            batch[name] = [s[name] for s in samples]
    return batch


def resolve_split(data_cfg, split: str) -> str | list[str]:
    """Where a split's shards are: `data.train`/`data.test` if given, else the built-in dataset's cache
    (written on first use, selfsup.data.kinds)."""
    explicit = data_cfg.get(split)
    if explicit:
        return explicit
    from selfsup.data.kinds import find_kind, kind_names

    kind = find_kind(data_cfg.name)
    if kind is not None:
        return str(kind.cached_split(split, data_cfg.get("cache_dir")))
    raise UserError(f"no {split} shards: set data.{split}=<shards> (or data=<built-in dataset>: {', '.join(kind_names())})")


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def make_stream(urls, decoder, *, batch_size, num_workers, shuffle_buffer, resampled, seed, batches_per_rank=None,
                expand: Callable | None = None, prefetch_factor: int | None = None, collation_fn: Callable = None,
                read: ReadSettings | None = None, skipped_shards: multiprocessing.Value | None = None,
                epoch_of_run: Callable[[], int | None] | None = None):
    """The training stream (batches_per_rank set: an `EpochLoader` of that many batches per epoch,
    resumable mid-epoch, selfsup.data.epoch_stream) or a single ordered pass (None). `expand` (an
    iterator -> iterator stage) turns each stored sample into several (e.g. an episode chunk into its
    temporal samples, see selfsup.data.temporal); the shuffle buffer then mixes what it yields.
    `read`: timeouts and retries of remote shards; `skipped_shards` counts the shards not read to the end."""
    import webdataset as wds

    # every shard, in either stream, is opened by selfsup.data.remote's ShardOpener (files, http(s) with
    # timeouts and resumed reads, pipe:) and read by selfsup.data.tarstream's tar reader; one that fails
    # is skipped and counted on `skipped_shards`
    read = read or ReadSettings()
    failures = ShardFailures(skipped_shards)
    if batches_per_rank is not None:
        return _training_stream(urls, decoder, batch_size=batch_size, num_workers=num_workers,
                                shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed,
                                batches_per_rank=batches_per_rank, expand=expand, prefetch_factor=prefetch_factor,
                                collation_fn=collation_fn or collate, epoch_of_run=epoch_of_run, read=read,
                                failures=failures)
    dataset = wds.WebDataset(urls, resampled=False, shardshuffle=False, nodesplitter=None,
                             workersplitter=wds.split_by_worker, empty_check=False, seed=seed,
                             handler=wds.warn_and_continue)
    use_fast_tar_reader(dataset, handler=failures, opener=ShardOpener(read, failures))
    if expand is not None:
        dataset = dataset.compose(expand)
    dataset = dataset.map(decoder).select(lambda s: s is not None)
    dataset = dataset.batched(batch_size, collation_fn=collation_fn or collate, partial=True)
    return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                         prefetch_factor=(prefetch_factor or 2) if num_workers > 0 else None)


def _training_stream(urls, decoder, *, batch_size, num_workers, shuffle_buffer, resampled, seed, batches_per_rank,
                     expand, prefetch_factor, collation_fn, epoch_of_run, read, failures):
    from selfsup.data.epoch_stream import EpochLoader, SubStreams, keep_running_on_sigterm

    rank, world_size = world()
    substreams = max(1, num_workers)
    if not resampled and len(urls) < world_size * substreams:
        # each rank and worker must own at least one shard for a disjoint split: resample instead
        log.warning("%d shards < %d ranks x %d workers: resampling shards", len(urls), world_size, substreams)
        resampled = True
    dataset = SubStreams(urls, substreams, rank=rank, world_size=world_size, seed=seed,
                         resampled=resampled, shuffle_buffer=shuffle_buffer, decoder=decoder, batch_size=batch_size,
                         collation_fn=collation_fn, expand=expand, read=read, failures=failures)
    # pinned host memory where a GPU will take the batch (an asynchronous copy); batches are collated
    # into shared memory in the workers (collate), uint8 for a two-stage view (selfsup.data.views).
    # Workers start with each epoch: they are forked with where that epoch starts (EpochLoader)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), prefetch_factor=(prefetch_factor or 2) if num_workers > 0 else None,
        worker_init_fn=keep_running_on_sigterm if num_workers > 0 else None)
    return EpochLoader(dataset, loader, batches_per_rank, epoch_of_run=epoch_of_run)


class ShardDataModule(LightningDataModule):
    """Training batches for a method: shards -> decode -> the method's view -> batched dicts. The view
    is a `TrainView` (selfsup.data.contract); a plain callable counts as a one-stage view."""

    def __init__(self, data_cfg, train_view: TrainView | Callable | None, seed: int = 0,
                 keys: frozenset[str] | None = None):
        super().__init__()
        self.keys = keys  # train on these samples only (a fine-tuning run's labelled subset)
        self.cfg = data_cfg
        self.train_view = train_view
        self.seed = seed
        self._view: TrainView | None = None  # the view of the current stream (batch stage after transfer)
        self._loader = None
        self._resume_stream: dict | None = None  # a checkpoint's stream state, for the loader still to make
        self.skipped = multiprocessing.get_context("fork").Value("l", 0)
        self.skipped_shards = multiprocessing.get_context("fork").Value("l", 0)
        self.train_spec = resolve_split(data_cfg, "train")
        self.urls = expand_urls(self.train_spec)
        self.num_samples = data_cfg.get("epoch_samples") or (len(keys) if keys is not None else count_samples(self.train_spec))
        if not self.num_samples:
            raise unknown_size(self.train_spec)
        self.classes = dataset_classes(self.train_spec)

    def batches_per_rank(self) -> int:
        _, world_size = world()
        return max(1, self.num_samples // (world_size * self.cfg.batch_size))

    def training_on_gpu(self) -> bool:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def train_view_in_use(self) -> TrainView:
        """The method's view with `data.gpu_augment` applied (a view without batched augmentation is
        unchanged). Without a GPU to train on, the batched augmentations run in the workers, on each batch."""
        view = as_train_view(self.train_view)
        on = bool(self.cfg.get("gpu_augment", False))
        return view.with_gpu_augment(on, in_workers=on and not self.training_on_gpu())

    def train_dataloader(self):
        view = self._view = self.train_view_in_use()
        stages = view.stream_stages(self.skipped)  # a view over stored sequences (temporal samples)
        if stages is not None:
            expand, decoder = stages
        else:
            expand, decoder = None, SampleDecoder(view, self.skipped, stage="sample" if view.two_stage else "full",
                                                  keys=self.keys)
        collation_fn = ViewCollate(view, collate) if view.two_stage else collate
        self._loader = make_stream(
            self.urls,
            decoder,
            expand=expand,
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
            shuffle_buffer=self.cfg.shuffle_buffer,
            resampled=self.cfg.resampled,
            seed=self.seed,
            batches_per_rank=self.batches_per_rank(),
            prefetch_factor=self.cfg.get("prefetch_factor"),
            collation_fn=collation_fn,
            read=ReadSettings.of(self.cfg),
            skipped_shards=self.skipped_shards,
            epoch_of_run=self._epoch_of_run,
        )
        if self._resume_stream is not None:
            self._loader.resume_from(self._resume_stream)
            self._resume_stream = None
        return self._loader

    def state_dict(self) -> dict:
        """Saved in the checkpoint: where the training stream stands (selfsup/data/epoch_stream.py)."""
        return {"stream": self._loader.stream_state()} if self._loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        # Lightning restores this before or after it asks for the loader, depending on the strategy
        stream = state.get("stream")
        if stream is not None and self._loader is not None:
            self._loader.resume_from(stream)
        else:
            self._resume_stream = stream

    def _epoch_of_run(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else None

    def teardown(self, stage: str) -> None:
        self._close_loader()

    def on_exception(self, exception: BaseException) -> None:
        self._close_loader()

    def _close_loader(self) -> None:
        """End the loader workers of an epoch that fit left unfinished (max_steps, a signal, an error)."""
        if self._loader is not None:
            self._loader.close()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """The batch stage of a two-stage view, on the training device: uint8 -> normalised floats, and
        with data.gpu_augment the photometric augmentations of whole batches."""
        view = self._view
        if view is not None and view.two_stage and isinstance(batch, dict):
            batch = view.batch(batch)
        return batch


def eval_loader(spec, view: Callable, batch_size: int = 256, num_workers: int = 1, keys: frozenset[str] | None = None):
    """One ordered pass over labelled shards (the probe's reader); with `keys`, over those samples only."""
    skipped = multiprocessing.get_context("fork").Value("l", 0)
    return make_stream(expand_urls(spec), SampleDecoder(view, skipped, keys=keys), batch_size=batch_size,
                       num_workers=num_workers, shuffle_buffer=0, resampled=False, seed=0)


class KeyAndLabel:
    """A sample's key and class label, its image left undecoded (a pass that only counts labels)."""

    def __call__(self, sample: dict) -> dict:
        return {"key": sample["__key__"], "label": int(sample["cls"]) if "cls" in sample else -1}


class KeptSample:
    """A stored sample as it is (its encoded fields, its key), if its key is among `keys`; else None."""

    def __init__(self, keys: frozenset[str]):
        self.keys = keys

    def __call__(self, sample: dict) -> dict | None:
        if sample.get("__key__") not in self.keys:
            return None
        return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def write_subset(spec, keys: frozenset[str], out_dir: Path, *, prefix: str, num_workers: int = 1,
                 readers: int = 1) -> Path:
    """The samples of `spec` whose keys are `keys`, copied undecoded as shards (with index.json) into
    `out_dir`: a small labelled subset streams from its own shards instead of a pass over all of them.
    `readers`: the ranks x loader workers that will stream it, each of which must own a shard of its own
    for their samples to be disjoint (selfsup.data.epoch_stream); at most 5000 samples per shard."""
    from selfsup.data.shards import write_shards

    def kept():
        for batch in make_stream(expand_urls(spec), KeptSample(keys), batch_size=256, num_workers=num_workers,
                                 shuffle_buffer=0, resampled=False, seed=0, collation_fn=list):
            yield from batch

    write_shards(kept(), out_dir, prefix=prefix, total=len(keys), classes=dataset_classes(spec),
                 samples_per_shard=max(1, min(5000, -(-len(keys) // max(1, readers)))), desc=f"{prefix} subset",
                 keep_existing=True)
    return out_dir


def sample_labels(spec, num_workers: int = 1) -> tuple[list[str], list[int]]:
    """The key and class label of every sample in the shards at `spec`, in shard order (images are
    not decoded). A sample without a label gets -1."""
    keys, labels = [], []
    for batch in make_stream(expand_urls(spec), KeyAndLabel(), batch_size=4096, num_workers=num_workers,
                             shuffle_buffer=0, resampled=False, seed=0):
        keys += batch["key"]
        labels += batch["label"].tolist()
    return keys, labels
