"""`submit report RUN [-o PAGE.html] [--no-png] [--width W] [--height H]`: the page of a run folder
(RUN/report.html by default), then its PNG beside it (same name, .png). Everything the user gave is
checked before anything is written; without Chromium the page is still written and one line says
how to get the PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfsup.core.atomic import write_text_atomic
from selfsup.core.errors import UserError
from selfsup.core.run_folder import CONFIG_FILE, is_run_folder
from selfsup.report.page import render_page
from selfsup.report.screenshot import FULL_PAGE_HEIGHT, INSTALL_CHROMIUM, ChromiumFailed, find_chromium, screenshot

REPORT_FILE = "report.html"


@dataclass
class ReportFiles:
    html: Path
    png: Path | None  # None: no PNG written
    line: str  # what `submit report` prints
    status: int = 0  # the command's exit status: 1 when Chromium ran and drew nothing


def check_run_folder(run: str) -> Path:
    folder = Path(run)
    if not folder.exists():
        raise UserError(f"{run!r} does not exist: give a run folder (e.g. runs/<method>-<backbone>-<time>)")
    if not folder.is_dir():
        raise UserError(f"{run!r} is not a folder: give a run folder (e.g. runs/<method>-<backbone>-<time>)")
    if not is_run_folder(folder):
        raise UserError(f"{run!r} is not a run folder (no {CONFIG_FILE} in it): give the folder that "
                        f"submit pretrain made (e.g. runs/<method>-<backbone>-<time>)")
    return folder


def output_paths(run_dir: Path, output: str | None) -> tuple[Path, Path]:
    """The page and the PNG beside it."""
    html = Path(output) if output else run_dir / REPORT_FILE
    if html.is_dir():
        raise UserError(f"-o {output}: a folder; give the .html file to write (e.g. {Path(output) / REPORT_FILE})")
    if html.suffix.lower() == ".png":
        raise UserError(f"-o {output}: give the .html file to write; the PNG goes beside it "
                        f"({html.with_suffix('.html')} and {html})")
    return html, html.with_suffix(".png")


def check_size(width: int, height: int | None) -> None:
    if not 200 <= width <= 8192:
        raise UserError(f"--width {width}: give a width in pixels from 200 to 8192 (default 1200)")
    if height is not None and not 100 <= height <= FULL_PAGE_HEIGHT:
        raise UserError(f"--height {height}: give a height in pixels from 100 to {FULL_PAGE_HEIGHT}, "
                        "or leave it out for the whole page")


def write_report(run: str, output: str | None = None, png: bool = True, width: int = 1200,
                 height: int | None = None) -> ReportFiles:
    run_dir = check_run_folder(run)
    html_path, png_path = output_paths(run_dir, output)
    check_size(width, height)
    write_text_atomic(html_path, render_page(run_dir))
    if not png:
        return ReportFiles(html_path, None, f"selfsup: wrote {html_path}")
    chromium = find_chromium()
    if chromium is None:
        return ReportFiles(html_path, None, f"selfsup: wrote {html_path}; no PNG: it needs Chromium "
                                            f"({INSTALL_CHROMIUM}), or pass --no-png")
    try:
        w, h, cut = screenshot(chromium, html_path, png_path, width, height)
    except ChromiumFailed as error:
        return ReportFiles(html_path, None, f"selfsup: wrote {html_path}; no PNG: {error}", status=1)
    note = f"; the page is taller: the PNG shows its top {h} px" if cut else ""
    return ReportFiles(html_path, png_path, f"selfsup: wrote {html_path} and {png_path} ({w}x{h}){note}")
