"""A PNG of an HTML file, drawn by headless Chromium (Debian/Ubuntu package `chromium`).

Without a height, the whole page: a page marks its end with a rule of END_MARK's colour (the report
page's footer), Chromium draws it in a window WINDOW_HEIGHTS[0] tall, or, when the end mark is not in
that, in the tallest one, and the PNG is cut a few pixels under the mark. Chromium has no option for
a whole page, and a tall window costs time: drawing and encoding 1200x16384 pixels takes about three
times as long as 1200x4096."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from selfsup.core.atomic import write_atomic

CHROMIUM_COMMANDS = ("chromium", "chromium-browser")
INSTALL_CHROMIUM = "sudo apt-get install -y chromium"
TIMEOUT_S = 120
END_MARK = (190, 190, 191)  # the colour of the rule that ends a page (its CSS: rgb(190, 190, 191))
WINDOW_HEIGHTS = (4096, 16384)  # 16384: the tallest window Chromium draws in one piece
FULL_PAGE_HEIGHT = WINDOW_HEIGHTS[-1]
BOTTOM_MARGIN = 12  # pixels kept under the end mark

# one headless Chromium of its own per PNG: a new profile, and nothing that reaches the network
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1")


class ChromiumFailed(RuntimeError):
    """Chromium ran but gave no picture."""


def find_chromium() -> str | None:
    return next((found for name in CHROMIUM_COMMANDS if (found := shutil.which(name))), None)


def run_chromium(chromium: str, url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    try:
        return subprocess.run(command, capture_output=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ChromiumFailed(f"{chromium} gave no answer in {TIMEOUT_S} s") from None


def screenshot(chromium: str, html: Path, png: Path, width: int, height: int | None) -> tuple[int, int, bool]:
    """Draw `html` `width` pixels wide into `png` (written atomically): `height` pixels tall, or the
    whole page. Returns the PNG's width and height, and whether a whole page was cut (taller than
    FULL_PAGE_HEIGHT, or with no end mark)."""
    with tempfile.TemporaryDirectory(prefix="selfsup-report-") as tmp:
        for window in (height,) if height else WINDOW_HEIGHTS:
            image = draw(chromium, html, Path(tmp), width, window)
            end = None if height else end_mark_row(image)
            if height or end is not None:
                break
        cut = not height and end is None
        if end is not None:
            image = image.crop((0, 0, image.width, min(image.height, end + BOTTOM_MARGIN)))
        write_atomic(png, lambda temporary: image.save(temporary, format="PNG"))
    return image.width, image.height, cut


def draw(chromium: str, html: Path, tmp: Path, width: int, height: int):
    """Chromium's picture of `html` in a window `width` x `height`, as a PIL image."""
    from PIL import Image

    shot = tmp / f"shot-{height}.png"
    done = run_chromium(chromium, html.resolve().as_uri(), tmp / f"profile-{height}", f"--screenshot={shot}",
                        f"--window-size={width},{height}")
    if not shot.is_file():
        said = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
        raise ChromiumFailed(f"{chromium} wrote no screenshot (exit {done.returncode}"
                             + (f"; its last line: {said[-1].strip()}" if said else "") + ")")
    with Image.open(shot) as image:
        return image.convert("RGB")


def end_mark_row(image) -> int | None:
    """The last row of the page's end mark (a rule across the middle of the page), None when it is
    not in the picture."""
    import numpy as np

    pixels = np.asarray(image)
    middle = pixels[:, image.width // 4: image.width * 3 // 4]
    rows = np.flatnonzero((middle == END_MARK).all(axis=(1, 2)))
    return int(rows[-1]) if rows.size else None
