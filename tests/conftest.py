import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """`make test` runs the suite on pytest-xdist workers, one per core. The controller makes one shard
    cache for all of them (the built-in datasets are written once per run of the suite, and the learning
    tests' baselines are probed once); each worker then takes its share of the cores, for itself and the
    `submit` processes it starts."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        os.environ["OMP_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))
    elif getattr(config.option, "numprocesses", None) and not os.environ.get("SELFSUP_TEST_CACHE"):
        os.environ["SELFSUP_TEST_CACHE"] = tempfile.mkdtemp(prefix="selfsup-test-cache-")
        config.add_cleanup(lambda: shutil.rmtree(os.environ.pop("SELFSUP_TEST_CACHE"), ignore_errors=True))


def pytest_collection_modifyitems(config, items):
    # The long tests start first, so that no worker ends the run alone on one. pytest-xdist
    # (--dist loadgroup) hands out the Slurm tests' xdist_group first, as its largest unit, then single
    # tests in this order, two to a worker at the start, and a worker runs what it was handed in turn.
    # So: the tests marked long, SparK's learning test (the longest) among them, then RotNet's
    # learning test (slow, not long), then the rest. RotNet's would otherwise be handed to the same
    # worker as SparK's at the start, and the two would run one after the other; this way it goes to
    # the other worker, after the Fashion-MNIST shards that both train on have been written once.
    items.sort(key=lambda item: (item.get_closest_marker("long") is None, item.get_closest_marker("slow") is None))


@pytest.fixture(scope="session", autouse=True)
def shard_cache(tmp_path_factory):
    """Built-in datasets are written to shards once per test session (subprocesses inherit it)."""
    cache = os.environ.get("SELFSUP_TEST_CACHE") or str(tmp_path_factory.mktemp("selfsup-cache"))
    os.environ["SELFSUP_CACHE"] = cache
    return Path(cache)


# commands that hold no process-wide state (no training loop, no signal handlers, no fork): they run
# in the test's own process, which has torch imported already, instead of paying a fresh
# interpreter's imports (about 7 CPU seconds) per call
IN_PROCESS = {"shards", "probe", "export", "status", "logs", "report", "backbones", "methods"}


def run_submit(*args, cwd=None, timeout=600, env=None, check=False, in_process=None):
    """Run `submit ARGS`: through the real console entry point in a subprocess, or through the same
    `main` in this process. `in_process=None`: here for the commands of IN_PROCESS and any --dry-run;
    True: a training command (`pretrain`, `continual` on one device) here too, for a test of what the
    run writes, prints and returns (the process state it changes is put back afterwards); False: a
    subprocess, for a test of the process itself (signals, several ranks, a fresh interpreter)."""
    args = tuple(map(str, args))
    if in_process is None:
        in_process = env is None and bool(args) and (args[0] in IN_PROCESS or "--dry-run" in args)
    elif in_process and env is not None:
        raise ValueError("run_submit: env= needs a subprocess")
    proc = _submit_here(args, cwd) if in_process else subprocess.run(
        [sys.executable, "-m", "selfsup.launch.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"submit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# what a training run in this process may change for the process (Lightning restores the handlers it
# replaces when fit ends; these are put back whatever happened)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _submit_here(args: tuple[str, ...], cwd) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from selfsup.launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    environ = dict(os.environ)  # a run sets its run folder for local ranks, Lightning its seed
    handlers = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    torch = sys.modules.get("torch")  # (not imported yet: no thread count of this process to keep)
    threads = torch.get_num_threads() if torch else None
    try:
        os.chdir(cwd or before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse: --help, usage errors
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        os.chdir(before)
        os.environ.clear()
        os.environ.update(environ)
        for signum, handler in handlers.items():
            if handler is not None:  # (None: a handler set outside Python, left alone)
                signal.signal(signum, handler)
        if threads is not None:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["submit", *args], code, out.getvalue(), err.getvalue())


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def image_tags(tb_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]


def write_keyed_shards(folder: Path, shards: int, per_shard: int, corrupt_per_shard: int = 0) -> list[str]:
    """`shards` shards of `per_shard` small random PNGs keyed k0000, k0001, ... (the last
    `corrupt_per_shard` of each shard are not images); returns the keys of the readable ones."""
    import numpy as np

    from selfsup.data.shards import encode_png, write_shards

    rng = np.random.default_rng(0)
    good = []

    def samples():
        for i in range(shards * per_shard):
            key = f"k{i:04d}"
            if i % per_shard >= per_shard - corrupt_per_shard:
                yield {"__key__": key, "png": b"not an image", "cls": 0}
                continue
            good.append(key)
            yield {"__key__": key, "png": encode_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), "cls": i % 2}

    write_shards(samples(), folder, prefix="train", samples_per_shard=per_shard, classes=["a", "b"], progress=False)
    return good
