"""Wall time of the command line: `submit --help` and the headline command's `--dry-run`.

Each command runs as a fresh process (`python -m selfsup.launch.cli ...`, what the `submit` console
script runs), alternated run by run; medians and minima of --repeats after one warm-up run (which
fills the OS page cache: a first run after boot reads every module from disk). Prints a markdown table.

    python benchmarks/cli_startup.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import load_average, machine_line, median  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    ("submit --help", ["--help"], 0.5),
    ("submit pretrain spark convnext_b --dry-run", ["pretrain", "spark", "convnext_b", "--dry-run"], 3.0),
]


def run_once(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "selfsup.launch.cli", *argv], check=True, capture_output=True, env=env,
                   cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(machine_line())
    times: dict[str, list[float]] = {label: [] for label, _, _ in COMMANDS}
    for _, argv, _ in COMMANDS:
        run_once(argv)  # warm-up
    for _ in range(args.repeats):
        for label, argv, _ in COMMANDS:
            times[label].append(run_once(argv))
    print(f"load average at the end: {load_average()}; {args.repeats} runs each")
    print("\n| command | median (s) | min (s) | goal (s) |")
    print("|---|---:|---:|---:|")
    for label, _, goal in COMMANDS:
        print(f"| `{label}` | {median(times[label]):.2f} | {min(times[label]):.2f} | < {goal} |")


if __name__ == "__main__":
    main()
