"""A fast reader of tar streams for the shard pipeline.

webdataset reads shards with Python's `tarfile`, which costs tens of microseconds of Python per
member (a webdataset sample is two to four members, plus a PAX header each when written with a
fractional mtime): about a tenth of the whole per-image budget of a 224-px pipeline on one core
(BENCHMARKS.md). This reader parses the 512-byte headers itself (ustar, GNU long names, PAX `path`
and `size` records; directories, links and global headers skipped; header checksums verified) and
yields what webdataset's `tar_file_expander` yields, so it replaces that one stage of a
`wds.WebDataset` and everything else (shard lists, splitting, shuffling, grouping) stays webdataset's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")
SKIP_META = re.compile(r"__[^/]*__($|/)")


class TarError(ValueError):
    pass


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream, in order."""
    read = stream.read
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        header = read(BLOCK)
        if not header:
            return
        if len(header) < BLOCK:
            raise TarError("truncated tar header")
        if header == bytes(BLOCK):  # end-of-archive marker
            return
        checksum = _number(header[148:156])
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarError("bad tar header checksum")
        size = _number(header[124:136])
        if "size" in pax:
            size = int(pax["size"])
        kind = header[156:157]
        data = read(size)
        if len(data) < size:
            raise TarError("truncated tar member")
        if size % BLOCK:
            read(BLOCK - size % BLOCK)
        if kind == b"x":  # PAX header of the next member
            pax = _pax_records(data)
            continue
        if kind == b"g":  # PAX global header: nothing a sample needs
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"K":
            continue
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        pax, long_name = {}, None
        if kind in REGULAR:
            yield name, data


def fast_tar_expander(data: Iterator[dict], handler: Callable[[Exception], bool] = None,
                      eof_value: dict | None = None) -> Iterator[dict]:
    """webdataset's `tar_file_expander` (same input: dict(url, stream[, local_path]); same output:
    dict(fname, data, __url__[, __local_path__]) per file, `{}` at the end of each shard)."""
    eof = {} if eof_value is None else eof_value
    for source in data:
        url = source["url"]
        local_path = source.get("local_path")
        failed = False
        try:
            for fname, payload in tar_members(source["stream"]):
                if fname.startswith("__") and SKIP_META.match(fname):
                    continue
                sample = {"fname": fname, "data": payload, "__url__": url}
                if local_path is not None:
                    sample["__local_path__"] = local_path
                yield sample
            yield eof
        except Exception as exn:  # noqa: BLE001 - the handler decides, as in webdataset
            failed = True
            exn.args = (*exn.args, url)
            if handler is None:
                raise
            if not handler(exn):
                break
            yield eof  # what was read of this shard is not merged into the next one's first sample
        finally:
            _close(source.get("stream"), url, handler, reported=failed)


def _close(stream, url: str, handler: Callable[[Exception], bool] | None, reported: bool) -> None:
    """Close a shard's stream. webdataset's command streams (gopen's Pipe) raise here when their
    command failed: that goes to the handler, once per shard (not for a shard already `reported`), so
    that it ends neither the stream nor a loader worker."""
    close = getattr(stream, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as exn:  # noqa: BLE001
        if reported:
            return
        exn.args = (*exn.args, url)
        if handler is None:
            raise
        handler(exn)


class FastTarExpander:
    """A webdataset pipeline stage (callable on the stream of opened shards)."""

    def __init__(self, handler: Callable[[Exception], bool] | None = None):
        self.handler = handler

    def __call__(self, sources: Iterator[dict]) -> Iterator[dict]:
        return fast_tar_expander(sources, self.handler)


def use_fast_tar_reader(dataset, handler=None, opener: Callable | None = None) -> bool:
    """Swap the tar-expanding stage of a `wds.WebDataset` for FastTarExpander (the stage after the
    shard opener), and the opener for `opener` where one is given. False (and the dataset unchanged)
    where the pipeline does not have that shape."""
    from webdataset.cache import StreamingOpen

    stages = getattr(dataset, "pipeline", None)
    if not isinstance(stages, list):
        return False
    for i, stage in enumerate(stages[:-1]):
        if isinstance(stage, StreamingOpen):
            if opener is not None:
                stages[i] = opener
            stages[i + 1] = FastTarExpander(handler)
            return True
    return False
