"""Built-in real datasets that need no network, as uint8 arrays with their official splits.

- fashion_mnist: the Debian package `dataset-fashion-mnist` (idx files under FASHION_MNIST_DIR).
- digits: scikit-learn's 8x8 digits (shipped inside the package); there is no official split,
  so a fixed stratified 80/20 split (seed 0) stands in for one.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfsup.core.errors import UserError, unknown_choice

FASHION_MNIST_DIR = Path(os.environ.get("SELFSUP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
SPLITS = ("train", "test")


@dataclass(frozen=True)
class LabeledArrays:
    images: np.ndarray  # uint8 [N, H, W] (grayscale) or [N, H, W, 3]
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str) -> LabeledArrays:
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise UserError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: install it with "
            "`apt-get install dataset-fashion-mnist` (or set SELFSUP_FASHION_MNIST_DIR)"
        )
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    return LabeledArrays(_read_idx(images_path), _read_idx(labels_path).astype(np.int64), classes)


def digits(split: str) -> LabeledArrays:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)
    x, y = (tr_x, tr_y) if split == "train" else (te_x, te_y)
    return LabeledArrays(np.ascontiguousarray(x), y, tuple(str(d) for d in range(10)))


BUILTIN = {"fashion_mnist": fashion_mnist, "digits": digits}


def load_builtin(name: str, split: str) -> LabeledArrays:
    if name not in BUILTIN:
        raise unknown_choice("built-in dataset", name, BUILTIN)
    if split not in SPLITS:
        raise unknown_choice("split", split, SPLITS)
    return BUILTIN[name](split)
