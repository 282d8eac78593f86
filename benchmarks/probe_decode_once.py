"""Several probes of one labelled split in one process (a network, then its baselines: its random init
and raw pixels, as `probe.baselines=true` and the learning tests do) read the same images each time.
selfsup.eval.decoded_splits decodes a small split once per process; this times the same probes with
that (the default) and with every pass decoding its images again (the limit set to 0 bytes), in one
process, on the built-in Fashion-MNIST with the learning tests' probe: 10,000 train images (two
shards) and the 10,000 test images at 32 px, 150 L-BFGS iterations.

    python benchmarks/probe_decode_once.py                        # convnet4 and resnet_tiny at random init, pixels
    python benchmarks/probe_decode_once.py --targets random:resnet10_s1 pixels

Prints the machine, both wall times, the CPU seconds of this process and its loader workers (which
decode), and the ratios. Each probe's top-1 must be the same both ways (the same tensors reach the
network): the script fails otherwise.
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


def timed_probes(targets: list[str], overrides: list[str]) -> tuple[float, float, list[float]]:
    from selfsup.eval.probe import run_probe

    wall, cpu = time.perf_counter(), cpu_seconds()
    top1 = [run_probe(target, overrides).record["linear"]["top1"] for target in targets]
    return time.perf_counter() - wall, cpu_seconds() - cpu, top1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["random:convnet4", "random:resnet_tiny", "pixels"])
    parser.add_argument("--max-iter", type=int, default=150, help="L-BFGS iterations per fit (the learning tests' 150)")
    args = parser.parse_args(argv)

    from selfsup.data.shards import builtin_shards
    from selfsup.eval import decoded_splits

    train = builtin_shards("fashion_mnist", "train")
    overrides = ["data=fashion_mnist", f"data.train={train}/train-{{000000..000001}}.tar", f"probe.max_iter={args.max_iter}"]
    print(machine_line())
    limit = decoded_splits.LIMIT_BYTES
    decoded_splits.forget_all()
    decoded_splits.LIMIT_BYTES = 0
    every_pass = timed_probes(args.targets, overrides)
    decoded_splits.LIMIT_BYTES = limit
    once = timed_probes(args.targets, overrides)
    print(f"| decoding | wall s | CPU s | linear top-1 ({', '.join(args.targets)}) |\n|---|---|---|---|")
    for name, (wall, cpu, top1) in (("every pass", every_pass), ("once per split", once)):
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {' / '.join(f'{t:.2f}' for t in top1)} |")
    print(f"ratio (every pass / once): {every_pass[0] / once[0]:.2f}x wall, {every_pass[1] / once[1]:.2f}x CPU")
    if every_pass[2] != once[2]:
        raise SystemExit("the probes differ: the kept batches are not the decoded ones")
    return {"every_pass_s": every_pass[0], "once_s": once[0]}


if __name__ == "__main__":
    main()
