"""Writing WebDataset shards: from a built-in dataset, or from an image folder.

A sample is `__key__`, the encoded image under its format's extension (`png`, `jpg`, ...), and
`cls` (an integer label) when there is one. Every shard folder gets `index.json` with the sample
count per shard and the class names, so that readers know the epoch size without a scan.
Shards are written into a temporary folder and renamed at the end: an interrupted write never
leaves a half-written dataset behind.

A `pipe:COMMAND` destination (`pipe:aws s3 cp - s3://bucket/train-%06d.tar`) is a shell command per
shard that reads the shard on its standard input (webdataset's ShardWriter runs it, `%06d` the shard
number). Such shards are written as they come, and index.json goes last, through the same command
with the shard's file name replaced by `index.json`: a dataset with its index.json is complete.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from selfsup.core.errors import UserError
from selfsup.data.remote import is_pipe, is_url, remote_index

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".bmp": "bmp", ".webp": "webp", ".ppm": "ppm"}
INDEX_FILE = "index.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SELFSUP_CACHE", Path.home() / ".cache" / "selfsup"))


SHARD_NUMBER = re.compile(r"%0?\d*d")
# the file name in a pipe: destination that holds the shard number (no quotes, spaces, '/' or '=')
SHARD_FILE = re.compile(r"[^\s'\"/=]*%0?\d*d[^\s'\"/]*")
SPLIT_FIELD = "{split}"


def check_pipe_destination(pattern: str) -> None:
    if len(SHARD_NUMBER.findall(pattern)) != 1 or not SHARD_FILE.search(pattern):
        raise UserError(f"{pattern!r}: a pipe: destination needs one %06d in a file name, where the shard number "
                        f"goes, e.g. 'pipe:aws s3 cp - s3://bucket/train-%06d.tar' or 'pipe:cat > /data/train-%06d.tar'")


def index_destination(pattern: str) -> str:
    """Where the index.json of a pipe: destination goes: its shard file name replaced by `index.json`
    (`pipe:cat > /data/train-%06d.tar` -> `pipe:cat > /data/index.json`)."""
    return SHARD_FILE.sub(INDEX_FILE, pattern, count=1)


def split_destination(out: str | Path, split: str) -> str | Path:
    """Where one split of a source with splits goes: OUT/SPLIT for a folder; for a pipe: destination
    the split's name in place of `{split}`, which must be in its folder part, so that each split gets
    an index.json of its own."""
    if not is_pipe(out):
        return Path(out) / split
    check_pipe_destination(str(out))
    if SPLIT_FIELD not in index_destination(str(out)):
        raise UserError(f"{str(out)!r}: this source writes a train and a test split: put {SPLIT_FIELD} in the folder "
                        f"part of the destination, e.g. 'pipe:aws s3 cp - s3://bucket/data/{SPLIT_FIELD}/"
                        f"{SPLIT_FIELD}-%06d.tar'")
    return str(out).replace(SPLIT_FIELD, split)


def _shard_sink(pattern: str, samples_per_shard: int, samples: Iterable[dict], weight) -> tuple[list[int], list[int]]:
    """Write `samples` with webdataset's ShardWriter to `pattern`; (samples, weights) per shard."""
    import webdataset as wds

    counts: list[int] = []
    weights: list[int] = []
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0) as sink:
        for sample in samples:
            if not counts or counts[-1] == samples_per_shard:
                counts.append(0)
                weights.append(0)
            sink.write(sample)
            counts[-1] += 1
            weights[-1] += weight(sample) if weight else 1
    return counts, weights


def _index(shards: list[str], counts: list[int], weights: list[int], classes, weight, extra) -> dict:
    index = {"shards": dict(zip(shards, weights, strict=True)), "classes": classes}
    if weight:
        index["stored"] = dict(zip(shards, counts, strict=True))
    if extra:
        index.update(extra())
    return index


def _write_through_pipe(samples: Iterable[dict], pattern: str, samples_per_shard: int, classes, weight, extra) -> list[str]:
    """Shards and then index.json through a pipe: destination (module docstring)."""
    from webdataset.gopen import gopen

    check_pipe_destination(pattern)
    if SPLIT_FIELD in pattern:
        raise UserError(f"{pattern!r}: {SPLIT_FIELD} is for sources with a train and a test split (built-in data, "
                        f"atari); this source is one split: name its files directly")
    try:
        counts, weights = _shard_sink(pattern, samples_per_shard, samples, weight)
        file_name = SHARD_FILE.search(pattern).group(0)
        index = _index([file_name % i for i in range(len(counts))], counts, weights, classes, weight, extra)
        with gopen(index_destination(pattern), "wb") as sink:
            sink.write(json.dumps(index, indent=1).encode())
    except OSError as err:  # the command failed: its own message went to stderr
        status = re.search(r": exit (-?\d+) \(read\)", str(err))  # how webdataset's Pipe reports an exit status
        reason = (f"a command exited with status {status.group(1)}" if status else
                  "a command closed its input early" if isinstance(err, BrokenPipeError) else f"{type(err).__name__}: {err}")
        raise UserError(f"writing shards through {pattern!r} failed ({reason}): see the command's message above") from None
    return [pattern % i for i in range(len(counts))]


def write_shards(
    samples: Iterable[dict],
    out_dir: Path | str,
    *,
    prefix: str,
    total: int | None = None,
    samples_per_shard: int = 5000,
    classes: list[str] | None = None,
    desc: str = "writing shards",
    keep_existing: bool = False,
    weight: Callable[[dict], int] | None = None,
    unit: str = "img",
    extra: Callable[[], dict] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write `samples` (dicts in webdataset form) as `out_dir/<prefix>-000000.tar`, ... atomically.

    index.json counts samples per shard, or with `weight` the training samples each stored sample
    gives (e.g. the temporal samples of an episode chunk; the stored ones are then under "stored");
    `extra()` is merged into it after the last sample. `progress=False`: the caller shows its own bar.
    `out_dir` may be a pipe: destination (module docstring); the shard locations are then returned as
    its commands."""
    from selfsup.core.progress import progress_bar

    shown = progress_bar(samples, total=total, desc=desc, unit=unit, enabled=progress)
    if is_pipe(out_dir):
        return _write_through_pipe(shown, str(out_dir), samples_per_shard, classes, weight, extra)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a temporary folder of this writer's own: the ranks of a multi-process job may write the same
    # built-in dataset at the same time (the first complete one wins, see below)
    tmp = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir(parents=True)
    counts, weights = _shard_sink(str(tmp / f"{prefix}-%06d.tar"), samples_per_shard, shown, weight)
    shards = sorted(p.name for p in tmp.glob(f"{prefix}-*.tar"))
    index = _index(shards, counts, weights, classes, weight, extra)
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    if out_dir.exists():
        if keep_existing and (out_dir / INDEX_FILE).exists():  # another writer finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return [out_dir / s for s in shards]
        shutil.rmtree(out_dir, ignore_errors=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # another writer renamed its complete copy into place first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / INDEX_FILE).exists():
            raise
    return [out_dir / s for s in shards]


def encode_png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def builtin_samples(name: str, split: str) -> tuple[Iterator[dict], int, list[str]]:
    from selfsup.data.builtin import load_builtin

    arrays = load_builtin(name, split)

    def gen():
        for i, (image, label) in enumerate(zip(arrays.images, arrays.labels, strict=True)):
            yield {"__key__": f"{split}{i:07d}", "png": encode_png(image), "cls": int(label)}

    return gen(), len(arrays.labels), list(arrays.classes)


def builtin_shards(name: str, split: str, cache_dir: str | Path | None = None) -> Path:
    """The shard folder of a built-in dataset split, written on first use."""
    folder = Path(cache_dir or default_cache_dir()) / "shards" / name / split
    if not (folder / INDEX_FILE).exists():
        samples, total, classes = builtin_samples(name, split)
        print(f"selfsup: writing built-in dataset {name}/{split} as shards into {folder} (once)", flush=True)
        write_shards(samples, folder, prefix=split, total=total, classes=classes, desc=f"{name}/{split}",
                     keep_existing=True)
    return folder


def image_folder_samples(src: Path) -> tuple[Iterator[dict], int, list[str]]:
    """Images under `src/<class>/...` (labels from sorted class folders) or directly under `src`.
    Files are stored as their original bytes: nothing is decoded or re-encoded here, so a corrupt
    file is written as it is and skipped (and counted) by the reader."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"image folder {str(src)!r} does not exist or is not a folder")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    files: list[tuple[Path, int | None]] = []
    if classes:
        for label, cls in enumerate(classes):
            files += [(p, label) for p in sorted((src / cls).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    else:
        files = [(p, None) for p in sorted(src.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise UserError(f"no images ({', '.join(sorted(set(IMAGE_EXTENSIONS)))}) found under {str(src)!r}")

    def gen():
        for i, (path, label) in enumerate(files):
            sample = {"__key__": f"{i:08d}", IMAGE_EXTENSIONS[path.suffix.lower()]: path.read_bytes()}
            if label is not None:
                sample["cls"] = label
            yield sample

    return gen(), len(files), classes or None


def write_shards_from(src: str, out: str | Path, samples_per_shard: int = 5000) -> list[Path | str]:
    """`submit shards SRC OUT`: SRC is a built-in dataset name (both splits) or an image folder; OUT a
    folder or a pipe: destination."""
    from selfsup.data.builtin import BUILTIN

    if src in BUILTIN:
        destinations = {split: split_destination(out, split) for split in ("train", "test")}
        written = []
        for split, destination in destinations.items():
            samples, total, classes = builtin_samples(src, split)
            written += write_shards(samples, destination, prefix=split, total=total, classes=classes,
                                    samples_per_shard=samples_per_shard, desc=f"{src}/{split}")
        return written
    if not Path(src).exists() and "/" not in src:
        from selfsup.core.errors import unknown_choice

        raise unknown_choice("shard source (built-in dataset or image folder)", src, BUILTIN)
    samples, total, classes = image_folder_samples(Path(src))
    return write_shards(samples, out, prefix="shard", total=total, classes=classes, samples_per_shard=samples_per_shard)


def read_index(folder: Path | str) -> dict | None:
    """The index.json of a shard folder, or of a folder URL (read over HTTP(S)); None where there is none."""
    if not isinstance(folder, Path) and is_url(folder):
        return remote_index(folder)
    path = Path(str(folder).removeprefix("file://")) / INDEX_FILE
    return json.loads(path.read_text()) if path.exists() else None
