"""Built-in data by name: how the shards of each built-in dataset are made, into the cache on first
use (`data=NAME` without `data.train`) and into a folder by `submit shards NAME OUT`.

The stream and the command line look names up here and name no dataset themselves; a new built-in
dataset is one `_register` call below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfsup.data.builtin import BUILTIN


@dataclass(frozen=True)
class DataKind:
    name: str
    # (split, cache_dir or None) -> the split's shard folder in the cache, written on first use
    cached_split: Callable[[str, str | Path | None], Path]
    # (OUT, the options of `submit shards`) -> writes OUT/train and OUT/test (OUT a folder, or a pipe:
    # destination with {split}: selfsup/data/shards.py); returns the report to print
    write: Callable[[Path | str, Mapping[str, Any]], str]
    aliases: tuple[str, ...] = ()  # data config names that read the same shards


def _labelled_arrays(name: str) -> DataKind:
    """A dataset of selfsup.data.builtin, written as PNG shards with its official splits."""

    def cached_split(split: str, cache_dir: str | Path | None) -> Path:
        from selfsup.data.shards import builtin_shards

        return builtin_shards(name, split, cache_dir)

    def write(out: Path | str, options: Mapping[str, Any]) -> str:
        from selfsup.data.shards import write_shards_from

        written = write_shards_from(name, out, samples_per_shard=options.get("samples_per_shard") or 5000)
        return f"selfsup: wrote {len(written)} shards to {out}"

    return DataKind(name, cached_split, write)


def _atari_cached_split(split: str, cache_dir: str | Path | None) -> Path:
    from selfsup.data.atari import atari_cache

    return atari_cache(split, cache_dir)


def _write_atari(out: Path | str, options: Mapping[str, Any]) -> str:
    from selfsup.data.atari import report_line, write_atari_shards

    report = write_atari_shards(out, options["games"].split(","), frames=options["frames"],
                                test_frames=options["test_frames"], seed=options["seed"],
                                samples_per_shard=options.get("samples_per_shard") or 20,
                                max_episode_frames=options["max_episode_frames"])
    return report_line(report, out)


_KINDS: dict[str, DataKind] = {}


def _register(kind: DataKind) -> None:
    for name in (kind.name, *kind.aliases):
        if name in _KINDS:
            raise ValueError(f"built-in data {name!r} is registered twice")
        _KINDS[name] = kind


for _name in BUILTIN:
    _register(_labelled_arrays(_name))
# Atari play (ordered episodes + RAM) made with ale-py; `atari_ram` is the RAM probe's data config
_register(DataKind("atari", _atari_cached_split, _write_atari, aliases=("atari_ram",)))


def find_kind(name: str) -> DataKind | None:
    """The built-in data called `name`, or None."""
    return _KINDS.get(name)


def kind_names() -> list[str]:
    return sorted(_KINDS)
