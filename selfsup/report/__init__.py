"""`submit report RUN`: one self-contained HTML page of a run folder, and a PNG of it.

- events.py      the scalars and pictures of the run's TensorBoard logs
- svg.py         inline SVG line charts (no script: the page renders offline, anywhere)
- results.py     the probe results and fine-tune records in the run folder, as tables
- page.py        the page: scalars, pictures, evaluation, config
- screenshot.py  the PNG, drawn by headless Chromium
- run_report.py  the command: checks, writes the page, then the PNG

It reads run folders and the files written into them; it imports nothing of the launcher.
"""
