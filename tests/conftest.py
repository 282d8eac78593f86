import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def shard_cache(tmp_path_factory):
    """Built-in datasets are written to shards once per test session (subprocesses inherit it)."""
    cache = os.environ.get("SELFSUP_TEST_CACHE") or str(tmp_path_factory.mktemp("selfsup-cache"))
    os.environ["SELFSUP_CACHE"] = cache
    return Path(cache)


# commands that hold no process-wide state (no training loop, no signal handlers, no fork): they run
# in the test's own process, which has torch imported already, instead of paying a fresh
# interpreter's imports (about 5 CPU seconds) per call
IN_PROCESS = {"shards", "probe", "export", "status", "logs", "backbones", "methods"}


def run_submit(*args, cwd=None, timeout=600, env=None, check=False, subprocess_only=False):
    """Run `submit ARGS`: through the real console entry point in a subprocess, or, for the commands
    of IN_PROCESS and any --dry-run, through the same `main` in this process."""
    args = tuple(map(str, args))
    in_process = (not subprocess_only and env is None and bool(args)
                  and (args[0] in IN_PROCESS or "--dry-run" in args))
    proc = _submit_here(args, cwd) if in_process else subprocess.run(
        [sys.executable, "-m", "selfsup.launch.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"submit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _submit_here(args: tuple[str, ...], cwd) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from selfsup.launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    try:
        os.chdir(cwd or before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse: --help, usage errors
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        os.chdir(before)
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
