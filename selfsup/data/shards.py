"""Writing WebDataset shards: from a built-in dataset, or from an image folder.

A sample is `__key__`, the encoded image under its format's extension (`png`, `jpg`, ...), and
`cls` (an integer label) when there is one. Every shard folder gets `index.json` with the sample
count per shard and the class names, so that readers know the epoch size without a scan.
Shards are written into a temporary folder and renamed at the end: an interrupted write never
leaves a half-written dataset behind.
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


def write_shards(
    samples: Iterable[dict],
    out_dir: Path,
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
    `extra()` is merged into it after the last sample. `progress=False`: the caller shows its own bar."""
    import webdataset as wds

    from selfsup.core.progress import progress_bar

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a temporary folder of this writer's own: the ranks of a multi-process job may write the same
    # built-in dataset at the same time (the first complete one wins, see below)
    tmp = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir(parents=True)
    counts: list[int] = []
    weights: list[int] = []
    with wds.ShardWriter(str(tmp / f"{prefix}-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for sample in progress_bar(samples, total=total, desc=desc, unit=unit, enabled=progress):
            if not counts or counts[-1] == samples_per_shard:
                counts.append(0)
                weights.append(0)
            sink.write(sample)
            counts[-1] += 1
            weights[-1] += weight(sample) if weight else 1
    shards = sorted(p.name for p in tmp.glob(f"{prefix}-*.tar"))
    index = {"shards": dict(zip(shards, weights, strict=True)), "classes": classes}
    if weight:
        index["stored"] = dict(zip(shards, counts, strict=True))
    if extra:
        index.update(extra())
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


def write_shards_from(src: str, out: str | Path, samples_per_shard: int = 5000) -> list[Path]:
    """`submit shards SRC OUT`: SRC is a built-in dataset name (both splits) or an image folder."""
    from selfsup.data.builtin import BUILTIN

    out = Path(out)
    if src in BUILTIN:
        written = []
        for split in ("train", "test"):
            samples, total, classes = builtin_samples(src, split)
            written += write_shards(samples, out / split, prefix=split, total=total, classes=classes,
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
