"""Probing a network with its baselines (`probe.baselines=true`: the network, its random init, raw
pixels) reads the same labelled splits three times. selfsup.eval.decoded_splits decodes a small split
once per process; this times the whole probe with that (the default) against the same probe with every
pass decoding its images again (the limit set to 0 bytes), in one process, on the built-in
Fashion-MNIST: 10,000 train images (two shards) and the 10,000 test images at 32 px.

    python benchmarks/probe_decode_once.py                        # random:convnet4, the learning tests' probe
    python benchmarks/probe_decode_once.py --target random:resnet10_s1

Prints the machine, both wall times, the CPU seconds of this process and its loader workers, and the
ratios. The two probes'
top-1 must be equal (the same tensors reach the network): the script fails otherwise.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine_line  # noqa: E402


def cpu_seconds() -> float:
    """This process's CPU time and its finished children's (the loader workers that decode)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed_probe(target: str, overrides: list[str]) -> tuple[float, float, dict]:
    from selfsup.eval.probe import run_probe

    wall, cpu = time.perf_counter(), cpu_seconds()
    record = run_probe(target, overrides).record
    return time.perf_counter() - wall, cpu_seconds() - cpu, record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="random:convnet4")
    parser.add_argument("--max-iter", type=int, default=150, help="L-BFGS iterations per fit (the learning tests' 150)")
    args = parser.parse_args(argv)

    from selfsup.data.shards import builtin_shards
    from selfsup.eval import decoded_splits

    train = builtin_shards("fashion_mnist", "train")
    overrides = ["data=fashion_mnist", f"data.train={train}/train-{{000000..000001}}.tar",
                 f"probe.max_iter={args.max_iter}", "probe.baselines=true"]
    print(machine_line())
    limit = decoded_splits.LIMIT_BYTES
    decoded_splits.forget_all()
    decoded_splits.LIMIT_BYTES = 0
    every_pass = timed_probe(args.target, overrides)
    decoded_splits.LIMIT_BYTES = limit
    once = timed_probe(args.target, overrides)
    same = _top1s(every_pass[2]) == _top1s(once[2])
    print("| decoding | wall s | CPU s | top-1 (network, random init, pixels) |\n|---|---|---|---|")
    for name, (wall, cpu, record) in (("every pass", every_pass), ("once per split", once)):
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {' / '.join(f'{t:.2f}' for t in _top1s(record))} |")
    print(f"ratio (every pass / once): {every_pass[0] / once[0]:.2f}x wall, {every_pass[1] / once[1]:.2f}x CPU")
    if not same:
        raise SystemExit("the two probes differ: the kept batches are not the decoded ones")
    return {"every_pass_s": every_pass[0], "once_s": once[0]}


def _top1s(record: dict) -> list[float]:
    baselines = record.get("baselines", {})
    return [record["linear"]["top1"], *(baselines[k]["linear"]["top1"] for k in sorted(baselines))]


if __name__ == "__main__":
    main()
