"""What the shard stream asks of a method's training view (`SSLMethod.train_view()`).

A view turns one stored item (a decoded image, or what the view's own `stream_stages` yields) into a
dict of named tensors. The stream (selfsup.data.stream) reads only the members of `TrainView`:

- `two_stage`: False for a one-stage view, whose `__call__` gives the finished tensors per sample in
  the loader workers. True for a two-stage view: `sample` runs per item in the workers (uint8
  tensors, cheap to collate and to send between processes), `worker_batch` runs on each collated
  batch in the workers, and `batch` on each batch on the training device (the DataModule's
  `on_after_batch_transfer`).
- `with_gpu_augment(on, in_workers)`: the view with `data.gpu_augment` applied (the view itself when
  it has no batched augmentation).
- `stream_stages(skipped)`: `(expand, decode)` for a view over stored sequences (one stored sample
  expands into several items, then `decode` makes each item a sample), or None for plain images.

`ViewDefaults` gives every member but `__call__` a default (one stage, nothing per batch, no batched
augmentation, plain images); views subclass it and override what they do differently.
`as_train_view` wraps a plain callable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TrainView(Protocol):
    two_stage: bool

    def __call__(self, item: Any) -> dict: ...

    def sample(self, item: Any) -> dict: ...

    def worker_batch(self, batch: dict) -> dict: ...

    def batch(self, batch: dict) -> dict: ...

    def with_gpu_augment(self, on: bool, in_workers: bool = False) -> TrainView: ...

    def stream_stages(self, skipped: Any) -> tuple[Callable, Callable] | None: ...


class ViewDefaults:
    """The defaults of `TrainView`: a one-stage view of plain images without batched augmentation."""

    two_stage: bool = False

    def __call__(self, item: Any) -> dict:
        raise NotImplementedError

    def sample(self, item: Any) -> dict:
        return self(item)

    def worker_batch(self, batch: dict) -> dict:
        return batch

    def batch(self, batch: dict) -> dict:
        return batch

    def with_gpu_augment(self, on: bool, in_workers: bool = False) -> TrainView:
        return self

    def stream_stages(self, skipped: Any) -> tuple[Callable, Callable] | None:
        return None


class _CallableView(ViewDefaults):
    def __init__(self, fn: Callable[[Any], dict]):
        self.fn = fn

    def __call__(self, item: Any) -> dict:
        return self.fn(item)


def as_train_view(view: TrainView | Callable[[Any], dict]) -> TrainView:
    """`view` itself if it is a `TrainView`, else a one-stage view that calls it on every image."""
    return view if isinstance(view, TrainView) else _CallableView(view)
