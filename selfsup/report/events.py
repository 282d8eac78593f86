"""The scalars and pictures of a run's TensorBoard logs (`RUN/tb`), read with TensorBoard's own
EventAccumulator (no torch). Every folder under `tb` that holds event files is read; a tag of a
sub-folder is shown as `<sub-folder>/<tag>`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

TB_FOLDER = "tb"
# points kept per scalar tag: TensorBoard's reservoir keeps an even sample and always the last point
SCALAR_POINTS = 1000

# the first bytes of the image formats TensorBoard stores, and their MIME types
_IMAGE_MAGIC = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif"}


@dataclass
class Picture:
    tag: str
    step: int
    width: int
    height: int
    data: bytes  # the encoded image as logged
    mime: str


@dataclass
class RunEvents:
    scalars: dict[str, list[tuple[int, float]]]  # tag -> (step, value), by step, finite values only
    pictures: list[Picture]  # the last one of each image tag


def event_folders(tb_dir: Path) -> list[Path]:
    """`tb_dir` and its sub-folders that hold TensorBoard event files."""
    if not tb_dir.is_dir():
        return []
    return sorted({p.parent for p in tb_dir.rglob("*tfevents*") if p.is_file()})


def read_events(run_dir: Path) -> RunEvents:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = Path(run_dir) / TB_FOLDER
    scalars: dict[str, list[tuple[int, float]]] = {}
    pictures: list[Picture] = []
    for folder in event_folders(tb_dir):
        prefix = "" if folder == tb_dir else f"{folder.relative_to(tb_dir).as_posix()}/"
        # a resumed run appends events after a step it logged before: the accumulator purges the
        # points of the abandoned steps, as TensorBoard shows them
        acc = EventAccumulator(str(folder), size_guidance={"scalars": SCALAR_POINTS, "images": 1})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags["scalars"]:
            # one value per step, the last one written
            points = {e.step: e.value for e in acc.Scalars(tag) if math.isfinite(e.value)}
            if points:
                scalars[prefix + tag] = sorted(points.items())
        for tag in tags["images"]:
            last = acc.Images(tag)[-1]
            data = last.encoded_image_string
            mime = next((m for magic, m in _IMAGE_MAGIC.items() if data.startswith(magic)), "image/png")
            pictures.append(Picture(prefix + tag, last.step, last.width, last.height, data, mime))
    return RunEvents(scalars, sorted(pictures, key=lambda p: p.tag))
