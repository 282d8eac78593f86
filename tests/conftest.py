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


def run_submit(*args, cwd=None, timeout=600, env=None, check=False):
    """Run the real `submit` console entry point in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "selfsup.launch.cli", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"submit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


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
