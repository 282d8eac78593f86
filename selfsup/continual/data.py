"""Task streams from labelled shards: the classes split into tasks, each task's images read from the
shards when its turn comes (only that task's classes are decoded), and a validation split carved from
each task's train split for model selection (never the test split).

Only the current task's training images are held; nothing of an earlier task is kept or replayed
(exemplar-free). Test images of the tasks seen so far are read for the evaluation after each task.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from selfsup.data.stream import dataset_classes, expand_urls, resolve_split
from selfsup.core.errors import UserError, unknown_choice

log = logging.getLogger(__name__)

CLASS_ORDERS = ("natural", "seeded")
AUGMENTATIONS = ("crop", "flip", "rotate", "autoaugment")


def split_classes(num_classes: int, tasks: int, order: str = "natural", seed: int = 0) -> list[list[int]]:
    """`tasks` groups of consecutive classes (natural label order, or a fixed seeded permutation);
    the class count must divide evenly."""
    if order not in CLASS_ORDERS:
        raise unknown_choice("class order", order, CLASS_ORDERS)
    if tasks < 1 or num_classes % tasks:
        raise UserError(f"tasks={tasks}: {num_classes} classes do not split into {tasks} equal tasks")
    classes = list(range(num_classes))
    if order == "seeded":
        classes = [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]
    size = num_classes // tasks
    return [classes[i * size:(i + 1) * size] for i in range(tasks)]


def is_validation(key: str, fraction: float, seed: int = 0) -> bool:
    """A fixed, order-independent choice of validation samples by a hash of the sample key."""
    return (zlib.crc32(f"{seed}:{key}".encode()) % 100_000) < fraction * 100_000


@dataclass
class TaskArrays:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N], within-task (0 .. C_t - 1)
    keys: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> TaskArrays:
        index = torch.as_tensor(index, dtype=torch.long)
        return TaskArrays(self.images[index], self.labels[index], [self.keys[i] for i in index.tolist()])

    def take(self, n: int | None, seed: int = 0) -> TaskArrays:
        """A fixed seeded subset of `n` samples (all when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        return self.subset(torch.randperm(len(self), generator=g)[:n].sort().values)


def read_task(spec, classes: Sequence[int], image_size: int) -> tuple[TaskArrays, int]:
    """The samples of `classes` in the shards at `spec` (decoded, resized to image_size, uint8 RGB),
    labels re-indexed to the task's own 0..C-1; returns (arrays, samples skipped as undecodable)."""
    import webdataset as wds
    from PIL import Image

    from selfsup.data.stream import IMAGE_KEYS

    wanted = {int(c): i for i, c in enumerate(classes)}
    resize = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    images, labels, keys, skipped, unlabelled = [], [], [], 0, 0
    dataset = wds.WebDataset(expand_urls(spec), shardshuffle=False, empty_check=False, handler=wds.warn_and_continue)
    for sample in dataset:
        if "cls" not in sample:
            unlabelled += 1
            continue
        label = int(sample["cls"])
        if label not in wanted:
            continue
        try:
            data = next(sample[k] for k in IMAGE_KEYS if k in sample)
            with Image.open(io.BytesIO(data)) as img:
                image = v2.functional.pil_to_tensor(img.convert("RGB"))
            image = resize(image)
        except Exception as err:  # a corrupt sample is skipped and counted, never fatal
            skipped += 1
            log.warning("skipping sample %s: %s", sample.get("__key__"), err)
            continue
        images.append(image)
        labels.append(wanted[label])
        keys.append(sample["__key__"])
    if unlabelled and not images:
        raise UserError(f"the shards at {spec!r} carry no labels ('cls'): continual learning needs labelled shards")
    if not images:
        raise UserError(f"no samples of classes {list(classes)} in the shards at {spec!r}")
    return TaskArrays(torch.stack(images), torch.tensor(labels), keys), skipped


class TaskStream:
    """The task sequence of a config: `continual.tasks` tasks over the classes of `data`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.train_spec = resolve_split(cfg.data, "train")
        self.test_spec = resolve_split(cfg.data, "test")
        names = dataset_classes(self.train_spec)
        self.num_classes = cfg.continual.num_classes or (len(names) if names else None)
        if not self.num_classes:
            raise UserError("the shards' index.json names no classes: set continual.num_classes=<N>")
        self.class_names = list(names) if names else [str(i) for i in range(self.num_classes)]
        c = cfg.continual
        self.task_classes = split_classes(self.num_classes, c.tasks, c.class_order, c.class_seed)
        self.skipped = 0
        self._test: dict[int, TaskArrays] = {}

    @property
    def tasks(self) -> int:
        return len(self.task_classes)

    def train_val(self, task: int) -> tuple[TaskArrays, TaskArrays]:
        arrays, skipped = read_task(self.train_spec, self.task_classes[task], self.cfg.data.image_size)
        self.skipped += skipped
        frac, seed = self.cfg.continual.val_fraction, self.cfg.continual.val_seed
        val = torch.tensor([is_validation(k, frac, seed) for k in arrays.keys])
        if val.all() or not val.any():
            raise UserError(f"task {task + 1}: continual.val_fraction={frac} leaves an empty train or validation split")
        return arrays.subset(torch.nonzero(~val).squeeze(1)), arrays.subset(torch.nonzero(val).squeeze(1))

    def test(self, task: int) -> TaskArrays:
        if task not in self._test:
            arrays, skipped = read_task(self.test_spec, self.task_classes[task], self.cfg.data.image_size)
            self.skipped += skipped
            self._test[task] = arrays
        return self._test[task]


def normalise(mean, std):
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def train_transform(names: Sequence[str], image_size: int, mean, std):
    """The training augmentation (torchvision v2 on uint8 tensors). ConTraCon's CIFAR recipe is
    [crop, flip, rotate, autoaugment]: RandomCrop pad 4 (scaled to the size), flip, rotation 10,
    AutoAugment CIFAR-10 policy."""
    ops = []
    for name in names:
        if name not in AUGMENTATIONS:
            raise unknown_choice("augmentation", name, AUGMENTATIONS)
        if name == "crop":
            ops.append(v2.RandomCrop(image_size, padding=max(1, round(image_size / 8))))
        elif name == "flip":
            ops.append(v2.RandomHorizontalFlip())
        elif name == "rotate":
            ops.append(v2.RandomRotation(10))
        else:
            ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    return v2.Compose([*ops, normalise(mean, std)])


class ArrayDataset(Dataset):
    def __init__(self, arrays: TaskArrays, transform):
        self.arrays, self.transform = arrays, transform

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i):
        return self.transform(self.arrays.images[i]), self.arrays.labels[i]
