"""What the benchmark scripts share: the machine line, medians, and the 224-px photographs.

The photographs: no image dataset of natural photos at ImageNet resolution ships on this machine
(the built-in data is Fashion-MNIST at 28 px and scikit-learn's 8 px digits), so the benchmarks cut
their JPEGs out of the two real photographs that scikit-learn ships (`china.jpg` and `flower.jpg`,
640 x 427 px): random windows of 400-640 x 300-427 px (ImageNet's median image is 500 x 375),
randomly mirrored, re-encoded at JPEG quality 90 (about 55 KB each). Natural-photo content at an
ImageNet-like resolution, so decode and resize costs are those of real training data; only two
scenes, so nothing here may be read as an accuracy result.
"""

from __future__ import annotations

import datetime
import io
import os
import platform
import statistics
from pathlib import Path

BENCH_TMP = Path(os.environ.get("SELFSUP_BENCH_TMP", "/tmp/selfsup-bench"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine_line() -> str:
    import PIL
    import torch
    import torchvision

    mem = ""
    try:
        with open("/proc/meminfo") as info:
            kb = int(next(line for line in info if line.startswith("MemTotal")).split()[1])
            mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu_model()}, {cpu_count()} cores{mem}{gpu}; torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, Pillow {PIL.__version__}, Python {platform.python_version()}; "
            f"{datetime.date.today().isoformat()}; load average at start {load_average()}")


def cpu_seconds_tree(pid: int | None = None) -> float:
    """CPU time (user + system) of a process and all its live descendants, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0, [pid or os.getpid()]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


class Clock:
    """Wall-clock seconds, or (`cpu`) the CPU seconds of this process tree divided by the cores: on a
    machine shared with other jobs, what the work would take if the cores were its own."""

    def __init__(self, kind: str = "wall"):
        self.kind = kind

    def now(self) -> float:
        import time

        return time.perf_counter() if self.kind == "wall" else cpu_seconds_tree() / cpu_count()


def median(values) -> float:
    return statistics.median(values)


def photographs() -> list:
    """The two photographs scikit-learn ships, as RGB PIL images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def make_jpegs(n: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """`n` JPEGs cut from the photographs (see the module docstring)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = photographs()
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        width, height = src.size
        w = int(rng.integers(min(400, width), width + 1))
        h = int(rng.integers(min(300, height), height + 1))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = src.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def photo_dataset(n: int, shards: int, seed: int = 0) -> tuple[Path, Path, list[bytes]]:
    """The same `n` JPEGs as WebDataset shards (`shards` of them, index.json included) and as an
    image folder with two class folders; written once under BENCH_TMP and reused."""
    from selfsup.data.shards import read_index, write_shards

    root = BENCH_TMP / f"photos-{n}-{shards}-{seed}"
    shard_dir, folder = root / "shards", root / "folder"
    classes = ["china", "flower"]
    jpegs = None
    if not (read_index(shard_dir) and (folder / "done").exists()):
        jpegs = make_jpegs(n, seed)
        samples = ({"__key__": f"{i:07d}", "jpg": b, "cls": i % 2} for i, b in enumerate(jpegs))
        write_shards(samples, shard_dir, prefix="train", total=n, samples_per_shard=-(-n // shards),
                     classes=classes, desc="benchmark shards")
        for c in classes:
            (folder / c).mkdir(parents=True, exist_ok=True)
        for i, b in enumerate(jpegs):
            (folder / classes[i % 2] / f"{i:07d}.jpg").write_bytes(b)
        (folder / "done").write_text("")
    else:
        jpegs = [(folder / classes[i % 2] / f"{i:07d}.jpg").read_bytes() for i in range(n)]
    return shard_dir, folder, jpegs
