"""spconv 2.3 on CPUs: two fixes to `spconv.pytorch.ops`, which spconv's conv functions look their
kernels up in at call time. They change that module for the whole process, so they are made
explicitly, by `apply_spconv_cpu_patch()`, where SparK's sparse backend is built to run spconv
convolutions; applying them again changes nothing."""

from __future__ import annotations

import torch


def apply_spconv_cpu_patch() -> None:
    """Make spconv's CPU convolutions run without CUDA and add rows correctly on several threads.
    spconv must be importable (sparse_encoder.spconv_or_reason says whether it is)."""
    import spconv.pytorch.ops as ops

    _patch_stream_query(ops)
    _patch_scatter_add(ops)


def _patch_stream_query(spconv_ops) -> None:
    # spconv's CPU backward asks for the current CUDA stream even for CPU tensors (and then ignores
    # it); without CUDA that query raises, so answer 0 there.
    cuda_query = spconv_ops.get_current_stream
    if getattr(cuda_query, "answers_zero_without_cuda", False):
        return

    def get_current_stream():
        return cuda_query() if torch.cuda.is_available() else 0

    get_current_stream.answers_zero_without_cuda = True
    spconv_ops.get_current_stream = get_current_stream


class _SpconvOpsWithSafeScatter:
    """spconv's `SpconvOps` with a correct `scatter_add_cpu`.

    spconv 2.3's CPU scatter-add (csrc/sparse/gather.py) keeps its row pointers in variables shared
    by all OpenMP threads, so with more than one thread rows are added to the wrong places and CPU
    convolutions are silently wrong (forward and backward). Its CPU conv loop calls it once per
    kernel offset with distinct output rows; torch's index_add_ does the same addition safely.
    """

    fixes_scatter_add_race = True

    def __init__(self, spconv_ops_class):
        self._wrapped = spconv_ops_class

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    @staticmethod
    def scatter_add_cpu(out, rows, indices) -> None:
        # tensorview tensors -> torch views of the same memory
        out, rows = torch.from_numpy(out.numpy_view()), torch.from_numpy(rows.numpy_view())
        indices = torch.from_numpy(indices.numpy_view()).long()
        out.index_add_(0, indices, rows[: indices.numel()])


def _patch_scatter_add(spconv_ops) -> None:
    if not getattr(spconv_ops.SpconvOps, "fixes_scatter_add_race", False):
        spconv_ops.SpconvOps = _SpconvOpsWithSafeScatter(spconv_ops.SpconvOps)
