"""Reading shards that are not local files: `http(s)://` URLs and `pipe:` commands.

webdataset opens both by running a command (curl for http) and reads its output to the end. Nothing
there limits how long a server that goes quiet is waited for, and curl cannot resume a transfer
into a pipe: its retry writes the shard again from the first byte, after the part already read. So
an HTTP shard is read here with urllib instead: every connect and read has a timeout, and a
connection that drops or stalls is resumed at the byte it reached (an HTTP Range request; from a
server that ignores ranges the shard comes again and the part already read is passed over). A
`pipe:` command runs once, and a read waits at most the timeout for its next bytes. Whatever still
fails raises `ShardUnreadable`, and the stream skips the rest of that shard and counts it
(selfsup/data/stream.py: ShardFailures). Other schemes webdataset knows (`gs://`, ...) go to its gopen.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from selfsup.core.errors import UserError

log = logging.getLogger(__name__)

PIPE = "pipe:"
HTTP_SCHEMES = ("http", "https")
# answers worth asking again (the server is busy or briefly broken); any other error status is final
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 1 << 20


class ShardUnreadable(Exception):
    """A shard that could not be read to its end, after the retries it was allowed. `status`: the HTTP
    status of a final error answer (404, 403, ...)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ReadSettings:
    """`timeout`: seconds a remote shard may send nothing before its read is retried (HTTP) or given
    up (pipe:); `retries`: attempts after a failure with no byte read in between."""

    timeout: float = 60.0
    retries: int = 5

    @classmethod
    def of(cls, data_cfg) -> ReadSettings:
        timeout, retries = data_cfg.get("read_timeout"), data_cfg.get("read_retries")
        return cls(float(cls.timeout if timeout is None else timeout), int(cls.retries if retries is None else retries))


def is_pipe(location) -> bool:
    return str(location).startswith(PIPE)


def is_url(location) -> bool:
    """A shard location that is not a path on this machine (http(s)://, gs://, pipe:, ...)."""
    text = str(location)
    return is_pipe(text) or ("://" in text and not text.startswith("file://"))


def split_url(url: str) -> tuple[str, str]:
    """(folder URL, file name) of a shard URL."""
    folder, _, name = url.rpartition("/")
    return folder, name


def retry_delay(failures: int) -> float:
    """Seconds before attempt `failures + 1`: at once after a first failure (a dropped connection is
    mostly a one-off), then 1, 2, 4, ... up to 30."""
    return 0.0 if failures <= 1 else float(min(2 ** (failures - 2), 30))


def describe(err: BaseException, timeout: float) -> str:
    if isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError):
        return f"nothing received for {timeout:g} s"
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    return str(err) or type(err).__name__


class HttpShard:
    """A file-like reader (`read`, `close`) of one shard over HTTP(S). It connects on the first read."""

    def __init__(self, url: str, settings: ReadSettings, sleep: Callable[[float], None] = time.sleep):
        self.url = url
        self.settings = settings
        self.sleep = sleep
        self.pos = 0  # bytes handed to the reader so far
        self.size: int | None = None  # the whole shard's length, when the server says it
        self.resumed = 0  # connections made after the first one
        self._response: http.client.HTTPResponse | None = None
        self._failures = 0  # in a row, with no byte read in between

    def _connect(self) -> None:
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        request = urllib.request.Request(self.url, headers=headers)
        response = self._response = urllib.request.urlopen(request, timeout=self.settings.timeout)
        length = response.headers.get("Content-Length")
        if self.pos and response.status == 206:
            start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if start != str(self.pos):
                raise ConnectionError(f"asked for byte {self.pos} on, the server sent {response.headers.get('Content-Range')!r}")
            self.size = self.pos + int(length) if length else None
            return
        self.size = int(length) if length else None
        left = self.pos  # the server ignored the range: pass over the part already read
        while left:
            passed = response.read(min(left, CHUNK))
            if not passed:
                raise ConnectionError(f"connection closed {left} bytes before byte {self.pos}")
            left -= len(passed)

    def _failed(self, err: BaseException) -> None:
        self._close_response()
        self._failures += 1
        reason = describe(err, self.settings.timeout)
        if self._failures > self.settings.retries:
            raise ShardUnreadable(f"{reason} (at byte {self.pos}, after {self.settings.retries} retries)") from None
        delay = retry_delay(self._failures)
        log.warning("%s: %s; retrying from byte %d in %g s", self.url, reason, self.pos, delay)
        self.sleep(delay)
        self.resumed += 1

    def read(self, n: int = -1) -> bytes:
        parts = []
        want = n if n >= 0 else None
        while want is None or want > 0:
            try:
                if self._response is None:
                    self._connect()
                chunk = self._response.read(CHUNK if want is None else want)
                if not chunk and self.size is not None and self.pos < self.size:
                    raise ConnectionError(f"connection closed with {self.size - self.pos} bytes to go")
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUS:
                    self._close_response()
                    raise ShardUnreadable(describe(err, self.settings.timeout), status=err.code) from None
                self._failed(err)
                continue
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, cut short
                self._failed(err)
                continue
            if not chunk:
                break
            self._failures = 0
            self.pos += len(chunk)
            parts.append(chunk)
            if want is not None:
                want -= len(chunk)
        return b"".join(parts)

    def _close_response(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def close(self) -> None:
        self._close_response()


class PipeShard:
    """A file-like reader of the output of one `pipe:` command (run by the shell, in a process group of
    its own so that closing early ends its children too). A nonzero exit, or no output for the
    timeout, raises ShardUnreadable; the command is not run again (it may retry on its own)."""

    def __init__(self, url: str, settings: ReadSettings):
        self.url = url
        self.command = url[len(PIPE):]
        self.timeout = settings.timeout
        self._proc = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, bufsize=0,
                                      process_group=0)

    def read(self, n: int = -1) -> bytes:
        fd = self._proc.stdout.fileno()
        parts = []
        want = n if n >= 0 else None
        while want is None or want > 0:
            ready, _, _ = select.select([fd], [], [], self.timeout)
            if not ready:
                self.close()
                raise ShardUnreadable(f"{self.command!r} sent nothing for {self.timeout:g} s")
            chunk = os.read(fd, CHUNK if want is None else min(want, CHUNK))
            if not chunk:
                self._check_exit()
                break
            parts.append(chunk)
            if want is not None:
                want -= len(chunk)
        return b"".join(parts)

    def _check_exit(self) -> None:
        try:
            status = self._proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise ShardUnreadable(f"{self.command!r} closed its output but did not exit within {self.timeout:g} s") from None
        if status != 0:
            raise ShardUnreadable(f"{self.command!r} exited with status {status}")

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._proc.stdout.close()


def open_shard(url: str, settings: ReadSettings):
    """(stream, local path or None) of one shard."""
    if is_pipe(url):
        return PipeShard(url, settings), None
    parsed = urlparse(url)
    if parsed.scheme in HTTP_SCHEMES:
        return HttpShard(url, settings), None
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme else url
        return open(path, "rb"), path
    from webdataset.gopen import gopen

    return gopen(url), None


class ShardOpener:
    """A webdataset pipeline stage in the place of its StreamingOpen: shard URLs (or dicts with a
    `url`) -> dict(url, stream[, local_path]). A shard that cannot be opened goes to `handler`."""

    def __init__(self, settings: ReadSettings, handler: Callable[[Exception], bool]):
        self.settings = settings
        self.handler = handler

    def __call__(self, urls: Iterator) -> Iterator[dict]:
        for item in urls:
            url = item["url"] if isinstance(item, dict) else item
            try:
                stream, local_path = open_shard(url, self.settings)
            except Exception as exn:  # noqa: BLE001 - the handler decides, as in webdataset
                exn.args = (*exn.args, url)
                if self.handler(exn):
                    continue
                break
            yield {"url": url, "stream": stream, **({"local_path": local_path} if local_path else {})}


INDEX_READ = ReadSettings(timeout=30.0, retries=2)


@lru_cache(maxsize=64)
def read_remote_json(url: str) -> dict | None:
    """A small JSON file (a dataset's index.json) over HTTP(S): None where the server answers that it
    has none (4xx); a UserError where the server cannot be reached."""
    reader = HttpShard(url, INDEX_READ)
    try:
        return json.loads(reader.read())
    except ShardUnreadable as err:
        if err.status is not None and 400 <= err.status < 500:
            return None
        raise UserError(f"cannot read {url}: {err}: check that the server is up and the URL is right") from None
    except ValueError as err:
        raise UserError(f"{url} is not an index.json that `submit shards` writes ({err})") from None
    finally:
        reader.close()


def remote_index(folder: str) -> dict | None:
    """The index.json of a folder of remote shards, where it can be read (http/https); None otherwise."""
    if urlparse(folder).scheme not in HTTP_SCHEMES:
        return None
    return read_remote_json(f"{folder}/index.json")


def shard_folder(url: str) -> tuple[str | Path | None, str]:
    """Where a shard's index.json would be (a folder, a folder URL, or None for pipe:) and its file name."""
    if is_pipe(url):
        return None, url
    if is_url(url):
        return split_url(url)
    path = Path(str(url).removeprefix("file://"))
    return path.parent, path.name
