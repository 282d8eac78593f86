"""Remote shards: http(s):// and pipe: URLs stream like local shards; a dropped or stalled connection is
resumed, a shard that cannot be read (404, a failing command) is skipped and counted, and nothing
hangs; `submit shards` writes through a pipe: destination. A real HTTP server on 127.0.0.1 serves
real shards (a handler of the test's own, so that it can cut, stall or refuse a transfer)."""

import hashlib
import http.server
import itertools
import json
import multiprocessing
import re
import threading
import time
from pathlib import Path

import pytest

from selfsup.core.errors import UserError
from selfsup.data.remote import HttpShard, ReadSettings, ShardUnreadable, read_remote_json
from selfsup.data.shards import builtin_samples, write_shards
from selfsup.data.stream import count_samples, dataset_classes, expand_urls, make_stream
from selfsup.launch.cli import main

pytestmark = pytest.mark.timeout(60)

SHARDS = 4
PER_SHARD = 40
PATTERN = f"train-{{000000..{SHARDS - 1:06d}}}.tar"
FAST = ReadSettings(timeout=0.5, retries=2)


class ShardServer(http.server.ThreadingHTTPServer):
    """Serves the files of `root`. `faults[name]`: a list of what to do to the next requests of that
    file ("drop": send half and close; "cut": send nothing and close; "stall": send half and go quiet
    for `stall_s`; "404"), each used once; `in_turn`: the same for the next requests of shards, in the
    order they come, whichever shard they ask for; `ranges=False` answers a Range request with the
    whole file, as some servers do."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        self.root = root
        self.faults: dict[str, list[str]] = {}
        self.in_turn: list[str] = []
        self.ranges = True
        self.stall_s = 3.0
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    server: ShardServer

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        wanted = self.headers.get("Range")
        self.server.requests.append((name, wanted))
        fault = self.server.faults.get(name, []).pop(0) if self.server.faults.get(name) else None
        if fault is None and name.endswith(".tar") and self.server.in_turn:
            fault = self.server.in_turn.pop(0)
        path = self.server.root / name
        if fault == "404" or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted and self.server.ranges else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if fault == "cut":  # the headers, then nothing
            self.close_connection = True
            return
        if fault in ("drop", "stall"):
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            if fault == "stall":
                time.sleep(self.server.stall_s)
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """SHARDS shards of PER_SHARD real digits images (PNG, with labels) and their index.json."""
    out = tmp_path_factory.mktemp("remote") / "shards"
    samples, _, classes = builtin_samples("digits", "train")
    write_shards(itertools.islice(samples, SHARDS * PER_SHARD), out, prefix="train", samples_per_shard=PER_SHARD,
                 classes=classes, progress=False)
    return out


@pytest.fixture
def server(shard_dir):
    srv = ShardServer(shard_dir)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    read_remote_json.cache_clear()


def key_label_digest(sample: dict) -> dict:
    return {"key": sample["__key__"], "label": int(sample["cls"]), "digest": hashlib.sha1(sample["png"]).hexdigest()}


def read_all(spec, read: ReadSettings = FAST, num_workers: int = 0) -> tuple[list[tuple], int]:
    """(key, label, image digest) of every sample of one ordered pass, and the shards skipped."""
    skipped = multiprocessing.get_context("fork").Value("l", 0)
    loader = make_stream(expand_urls(spec), key_label_digest, batch_size=16, num_workers=num_workers, shuffle_buffer=0,
                         resampled=False, seed=0, read=read, skipped_shards=skipped)
    rows = [row for batch in loader for row in zip(batch["key"], batch["label"].tolist(), batch["digest"])]
    return rows, skipped.value


@pytest.fixture(scope="module")
def local_rows(shard_dir):
    rows, skipped = read_all(str(shard_dir / PATTERN))
    assert len(rows) == SHARDS * PER_SHARD and skipped == 0
    return rows


def test_http_shards_stream_the_same_samples_as_the_local_files(server, shard_dir, local_rows):
    spec = f"{server.url}/{PATTERN}"
    assert read_all(spec, num_workers=1) == (local_rows, 0)
    # the size and the classes come from the index.json beside the shards, over HTTP
    assert count_samples(spec) == SHARDS * PER_SHARD == count_samples(str(shard_dir))
    assert dataset_classes(spec) == [str(i) for i in range(10)]


@pytest.mark.parametrize("ranges", [True, False], ids=["range-request", "server-ignores-ranges"])
@pytest.mark.parametrize("fault", ["drop", "stall"])
def test_a_cut_or_stalled_connection_is_resumed_where_it_stopped(server, local_rows, fault, ranges):
    server.ranges = ranges
    server.faults["train-000001.tar"] = [fault]
    start = time.perf_counter()
    assert read_all(f"{server.url}/{PATTERN}") == (local_rows, 0)
    assert time.perf_counter() - start < server.stall_s  # a stall costs the read timeout, not the server's silence
    retried = [wanted for name, wanted in server.requests if name == "train-000001.tar"]
    assert len(retried) == 2 and retried[0] is None and int(retried[1].removeprefix("bytes=").rstrip("-")) > 0


def test_a_404_shard_is_skipped_and_counted(server, local_rows):
    server.faults["train-000002.tar"] = ["404"]
    rows, skipped = read_all(f"{server.url}/{PATTERN}", num_workers=1)
    assert skipped == 1
    assert rows == [r for r in local_rows if not PER_SHARD * 2 <= local_rows.index(r) < PER_SHARD * 3]
    assert [n for n, _ in server.requests].count("train-000002.tar") == 1  # a 404 is final: not asked again


def test_a_shard_that_keeps_failing_is_skipped_after_its_retries_keeping_what_was_read(server, local_rows):
    # the limit is on failures with no byte read in between: the drop after half the shard, then cuts
    server.faults["train-000000.tar"] = ["drop"] + ["cut"] * FAST.retries
    rows, skipped = read_all(f"{server.url}/{PATTERN}")
    assert skipped == 1
    assert rows[-3 * PER_SHARD:] == local_rows[PER_SHARD:]  # the other shards, whole
    kept = rows[:-3 * PER_SHARD]
    assert 0 < len(kept) < PER_SHARD and kept == local_rows[:len(kept)]  # samples before the cut, none broken
    assert [n for n, _ in server.requests].count("train-000000.tar") == 1 + FAST.retries


def test_an_unreachable_server_is_given_up_on_quickly(server):
    url = f"{server.url}/train-000000.tar"
    server.shutdown()
    server.server_close()
    reader = HttpShard(url, ReadSettings(timeout=0.5, retries=2), sleep=lambda s: None)
    with pytest.raises(ShardUnreadable, match="after 2 retries"):
        reader.read(512)


def test_pipe_shards_stream_and_a_failing_or_silent_command_is_skipped(shard_dir, local_rows):
    assert read_all(f"pipe:cat {shard_dir}/{PATTERN}", num_workers=1) == (local_rows, 0)
    spec = [f"pipe:cat {shard_dir}/train-000000.tar", "pipe:cat /nonexistent/train.tar", "pipe:sleep 30",
            f"pipe:cat {shard_dir}/train-000003.tar"]
    start = time.perf_counter()
    rows, skipped = read_all(spec, read=ReadSettings(timeout=0.5, retries=0))
    assert time.perf_counter() - start < 10
    assert skipped == 2 and rows == local_rows[:PER_SHARD] + local_rows[-PER_SHARD:]


def test_an_http_training_stream_resumes_mid_epoch_with_the_batches_it_had_left(server, shard_dir):
    # the training stream (2 loader workers, a shuffle buffer) reads http shards as it reads the local
    # files; cut after 3 batches (the next one is the second worker's) and resumed from its state, the
    # epoch goes on with exactly its remaining batches, though the re-read shards' connections drop
    def epoch_loader(spec):
        skipped = multiprocessing.get_context("fork").Value("l", 0)
        loader = make_stream(expand_urls(spec), key_label_digest, batch_size=16, num_workers=2, shuffle_buffer=32,
                             resampled=False, seed=3, batches_per_rank=SHARDS * PER_SHARD // 16, read=FAST,
                             skipped_shards=skipped)
        return loader, skipped

    def keys(batches) -> list[list[str]]:
        return [list(batch["key"]) for batch in batches]

    spec = f"{server.url}/{PATTERN}"
    whole, _ = epoch_loader(spec)
    epoch = keys(whole)
    local, _ = epoch_loader(str(shard_dir / PATTERN))
    assert epoch == keys(local) and len(epoch) == 10 and len({k for b in epoch for k in b}) == SHARDS * PER_SHARD

    cut, _ = epoch_loader(spec)
    batches = iter(cut)
    head = keys(next(batches) for _ in range(3))
    state = cut.stream_state()
    cut.close()
    assert state["batches"] == 3 and state["ranks"][0]["next"] == 1
    server.requests.clear()
    server.in_turn = ["drop", "drop"]  # the next two shard transfers are cut half-way
    resumed, skipped = epoch_loader(spec)
    resumed.resume_from(state)
    assert head + keys(resumed) == epoch and skipped.value == 0
    assert sum(1 for name, wanted in server.requests if name.endswith(".tar") and wanted) == 2  # resumed by range


def test_remote_data_without_a_size_is_a_one_line_error(server, capsys, tmp_path):
    common = ["pretrain", "rotnet", "resnet_tiny", f"run_dir={tmp_path}"]  # checked before the run folder exists
    server.faults["index.json"] = ["404"]
    assert main([*common, f"data={server.url}/{PATTERN}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"no {server.url}/index.json" in err and "data.epoch_samples=<N>" in err
    assert main([*common, f"data=pipe:cat {Path('/x') / PATTERN}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pipe: shards carry no index.json" in err and "data.epoch_samples=<N>" in err
    assert not any(tmp_path.iterdir())
    server.shutdown()  # a server out of reach: one line that names the URL
    server.server_close()
    read_remote_json.cache_clear()
    with pytest.raises(UserError, match=r"cannot read http://127\.0\.0\.1:\d+/index\.json"):
        count_samples(f"{server.url}/{PATTERN}")


def test_pretrain_streams_over_http_and_reports_the_shards_it_skipped(server, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("_SELFSUP_LAUNCHED_RUN_DIR", raising=False)
    # the first shard the run asks for is gone; the next one is cut half-way (whichever shards they are:
    # the order is the run's shuffle). 2 steps of 16 samples take less than the 40 of one shard.
    server.in_turn = ["404", "drop"]
    assert main(["pretrain", "rotnet", "resnet_tiny", f"data={server.url}/{PATTERN}", "data.image_size=16",
                 "data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=0", "trainer.max_steps=2",
                 "trainer.precision=32-true", "trainer.enable_progress_bar=false", "images_every_n_steps=0",
                 "data.read_timeout=2", f"run_dir={tmp_path}", "run_name=r"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"selfsup: done at step 2 .*; skipped 0 corrupt samples and 1 unreadable shards", summary), summary
    assert (tmp_path / "r" / "checkpoints" / "last.ckpt").exists()
    shards = [(name, wanted) for name, wanted in server.requests if name.endswith(".tar")]
    assert shards[1][1] is None and shards[2][0] == shards[1][0] and shards[2][1]  # the cut shard, resumed with a range


def test_a_run_whose_shards_all_fail_ends_with_one_line(server, capsys, tmp_path, monkeypatch):
    # only max_steps bounds the run: without the check an endless stream would try its shards for ever
    monkeypatch.delenv("_SELFSUP_LAUNCHED_RUN_DIR", raising=False)
    server.faults = {f"train-{i:06d}.tar": ["404"] * 10 for i in range(SHARDS)}
    assert main(["pretrain", "rotnet", "resnet_tiny", f"data={server.url}/{PATTERN}", "data.image_size=16",
                 "data.batch_size=16", "data.num_workers=0", "trainer.max_steps=4", "trainer.max_epochs=-1",
                 "trainer.enable_progress_bar=false", f"run_dir={tmp_path}", "run_name=r"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"submit pretrain: error: epoch 0 gave no batch: {SHARDS} shards could not be read and 0 samples "
                   "could not be decoded so far (the warnings above say why)"), err
    assert not (tmp_path / "r").exists()  # no step taken: nothing to resume, the run folder is gone


def test_submit_shards_writes_through_a_pipe_destination(tmp_path, capsys):
    # an image folder (one split), through `cat` into a folder the command chooses
    images = tmp_path / "images" / "seven"
    images.mkdir(parents=True)
    for i in range(5):
        (images / f"{i}.png").write_bytes(_png(i))
    out = tmp_path / "piped"
    out.mkdir()
    assert main(["shards", str(tmp_path / "images"), f"pipe:cat > {out}/img-%06d.tar", "--samples-per-shard", "2"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 shards" in printed and f"'pipe:cat > {out}/index.json'" in printed
    index = json.loads((out / "index.json").read_text())
    assert index == {"shards": {"img-000000.tar": 2, "img-000001.tar": 2, "img-000002.tar": 1}, "classes": ["seven"]}
    assert count_samples(str(out)) == 5
    # a built-in dataset's two splits: {split} in the folder part gives each split its folder and index
    assert main(["shards", "digits", f"pipe:mkdir -p {tmp_path}/d/{{split}} && cat > {tmp_path}/d/{{split}}/{{split}}-%06d.tar",
                 "--samples-per-shard", "1000"]) == 0
    assert count_samples(str(tmp_path / "d" / "train")) + count_samples(str(tmp_path / "d" / "test")) == 1797
    capsys.readouterr()
    # what would not work (the first two before anything is written), and a command that fails: one line each
    for bad, said in ((f"pipe:cat > {tmp_path}/x.tar", "needs one %06d"),
                      (f"pipe:cat > {tmp_path}/{{split}}-%06d.tar", "put {split} in the folder part"),
                      ("pipe:exit 3 # %06d.tar", "writing shards through 'pipe:exit 3 # %06d.tar' failed")):
        assert main(["shards", "digits" if "split" in said else str(tmp_path / "images"), bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # after the progress bar, if any
        assert last.startswith("submit shards: error: ") and said in last and "Traceback" not in err, err
    assert not list(tmp_path.glob("*.tar"))


def _png(i: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
