"""Does a method learn? Pretrain for 5, 10 and 15 minutes of wall time (one run, resumed: Lightning's
Timer state travels in the checkpoint), probe after each, and compare with the baselines: the same
backbone at random init (its best standard init, built with the run's backbone.kwargs) and raw
pixels. Prints a markdown table.

    python benchmarks/learning_curve.py rotnet resnet10_s1_w32 --minutes 5 10 15 --pretrain trainer.max_steps=1500

`--pretrain` overrides go to `submit pretrain`; they must bound the run in steps (steps=N, or a method
recipe that sets trainer.max_steps): the minutes only cut it short, the steps size its LR schedule.
Probes use the full Fashion-MNIST splits unless `--probe key=value ...` says otherwise; with
`--probe data=atari_ram ...` the score is the RAM probe's mean F1 in % (and there is no k-NN).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def submit(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "selfsup.launch.cli", *args], capture_output=True, text=True)
    if proc.returncode == 2:  # bad input: submit's one line names what to change (pass it with --pretrain)
        print(proc.stderr.strip(), file=sys.stderr)
        sys.exit(2)
    if proc.returncode != 0:
        sys.exit(f"submit {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def probe(target: str, probe_args: list[str]) -> dict:
    from selfsup.eval.probe import run_probe

    result = run_probe(target, probe_args)
    if "variables" in result:  # data=atari_ram: the mean F1 over RAM variables (in %), no k-NN
        return {"linear": 100 * result["mean_f1"], "knn": float("nan"), "step": result.get("global_step", 0)}
    return {"linear": result["linear"]["top1"], "knn": result["knn"]["top1"], "step": result.get("global_step", 0)}


def same_architecture(run: Path) -> list[str]:
    """`backbone.kwargs.*` of the run (e.g. a ViT's img_size and patch_size): the random-init
    baseline is the network the run trained, not the registry's default build of that name."""
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(OmegaConf.load(run / "config.yaml").backbone.kwargs, resolve=True)
    return [f"backbone.kwargs.{key}={json.dumps(value)}" for key, value in kwargs.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("backbone")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 15])
    parser.add_argument("--run-dir", default="runs/learning")
    parser.add_argument("--run", help="continue this run folder (its Timer state says how long it has trained)")
    parser.add_argument("--probe", nargs="*", default=["data=fashion_mnist"])
    parser.add_argument("--pretrain", nargs="*", default=["data=fashion_mnist"], help="overrides for submit pretrain")
    args = parser.parse_args()

    run = Path(args.run) if args.run else Path(args.run_dir) / f"{args.method}-{args.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for minutes in args.minutes:
        max_time = time.strftime("00:%H:%M:%S", time.gmtime(minutes * 60))
        if not (run / "config.yaml").exists():
            # max_epochs=-1: each timed stop ends Lightning's current epoch, so only max_steps may bound the run
            submit("pretrain", args.method, args.backbone, *args.pretrain, f"trainer.max_time={max_time}",
                   "trainer.max_epochs=-1",
                   f"run_dir={run.parent}", f"run_name={run.name}", "trainer.enable_progress_bar=false")
        else:
            submit("pretrain", args.method, args.backbone, f"resume={run}", f"trainer.max_time={max_time}")
        result = probe(str(run), args.probe)
        rows.append({"minutes": minutes, **result})
        print(f"after {minutes:g} min (step {result['step']}): linear {result['linear']:.2f}  k-NN {result['knn']:.2f}", flush=True)
    random_init = probe(f"random:{args.backbone}", [*args.probe, *same_architecture(run)])
    pixels = probe("pixels", args.probe)
    best_baseline = max(random_init["linear"], pixels["linear"])
    print("\n| pretraining | steps | linear top-1 | k-NN top-1 | margin over best baseline |")
    print("|---|---|---|---|---|")
    print(f"| raw pixels | - | {pixels['linear']:.2f} | {pixels['knn']:.2f} | |")
    print(f"| random init ({args.backbone}) | 0 | {random_init['linear']:.2f} | {random_init['knn']:.2f} | |")
    for r in rows:
        print(f"| {args.method}, {r['minutes']:g} min | {r['step']} | {r['linear']:.2f} | {r['knn']:.2f} | "
              f"{r['linear'] - best_baseline:+.2f} |")
    (run / "learning_curve.json").write_text(json.dumps({"rows": rows, "random_init": random_init, "pixels": pixels}, indent=1))


if __name__ == "__main__":
    main()
