"""`submit`: the command line. Imports nothing heavy at start-up (`submit --help` stays fast);
each command imports what it needs. A UserError is printed as one line and exits with 2."""

from __future__ import annotations

import argparse
import sys

from selfsup.core.errors import UserError

EPILOG = """examples:
  submit pretrain rotnet convnet4                             # demo: built-in Fashion-MNIST, this machine
  submit pretrain rotnet resnet50 data=/data/shards/train-{000000..000099}.tar image_size=224
  submit pretrain rotnet resnet18 resume=runs/rotnet-resnet18-20261126-101500
  submit probe runs/rotnet-convnet4-20261126-101500 data=fashion_mnist
  submit finetune runs/spark-resnet18_s1-20261126-101500 finetune.label_fraction=0.01   # 1% of the labels
  submit export runs/rotnet-convnet4-20261126-101500 -o backbone.safetensors
  submit export runs/rotnet-convnet4-20261126-101500 --format hf -o rotnet-convnet4   # config.json, weights, model card
  submit shards ./my_images ./my_shards
  submit continual contracon cct_6_3x2 data=split_fashion_mnist tasks=5   # ConTraCon, tasks learnt in order
  submit shards atari ./atari_shards --games Pong,Breakout --frames 100000   # ordered episodes for tov_vicreg
  submit pretrain spark convnext_b cluster=slurm nodes=4 gpus_per_node=8 strategy=deepspeed_stage_2 --dry-run
  submit status runs/spark-convnext_b-20261126-101500          # its Slurm job(s); `submit status`: recent runs
  submit logs runs/spark-convnext_b-20261126-101500
  submit report runs/rotnet-convnet4-20261126-101500           # report.html (charts, pictures, probes, config) + report.png
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="submit", description="selfsup: self-supervised pretraining of vision backbones.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain a backbone with a method (local by default)")
    p.add_argument("method", help="a method name (see `submit methods`)")
    p.add_argument("backbone", help="a backbone name (see `submit backbones`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.batch_size=128")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config (and, with cluster=slurm, the sbatch script) without running or submitting")

    p = sub.add_parser("probe", help="linear probe + k-NN of a run, checkpoint, export, random:<backbone> or pixels")
    p.add_argument("target", help="a run folder, a .ckpt, a .safetensors export, random:<backbone> (baseline) or pixels (baseline)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data=fashion_mnist probe.train_samples=10000")

    p = sub.add_parser("finetune", help="fine-tune a backbone with a new classifier on labelled data (all of it, or a fraction)")
    p.add_argument("source", help="a run folder, a .ckpt, a .safetensors export, or random:<backbone> (the baseline)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. data=fashion_mnist finetune.label_fraction=0.01 finetune.recipe=spark_convnext "
                        "(configs/finetune.yaml); resume=<run folder>")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config without running or submitting")

    p = sub.add_parser("export", help="write a run's backbone as timm-ready .safetensors, or a Hugging Face hub folder")
    p.add_argument("source", help="a run folder, a .ckpt file or a DeepSpeed checkpoint folder")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write (--format hf: the folder)")
    # checked by the command (a one-line error), not by argparse's choices (usage and error: two lines)
    p.add_argument("--format", default="timm",
                   help="timm or torchvision: a .safetensors file with those key names; hf: a folder for the "
                        "Hugging Face hub that timm.create_model('local-dir:DIR', pretrained=True) loads (default: timm)")
    p.add_argument("--force", action="store_true", help="--format hf: replace a folder that has files in it")

    p = sub.add_parser("continual", help="learn a sequence of classification tasks (ConTraCon), resumable per task")
    p.add_argument("method", help="a continual method: contracon")
    p.add_argument("backbone", help="a transformer backbone (cct_6, cct_6_3x2, vit_t, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. data=split_fashion_mnist tasks=5 (data=split_digits, or labelled shards data=DIR data.test=DIR)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the task split without running")

    p = sub.add_parser("shards", help="write WebDataset shards from an image folder, a built-in dataset or Atari play")
    p.add_argument("source", help="a built-in dataset name (both splits), `atari` (play games with ale-py: ordered "
                                  "episodes of 84x84 frames + RAM), or an image folder (class sub-folders give labels; "
                                  "a folder named like built-in data is ./NAME, the built-in data beside it builtin:NAME)")
    p.add_argument("output", help="the folder to write the shards into, or a pipe: command per shard, e.g. "
                                  "'pipe:aws s3 cp - s3://bucket/train-%%06d.tar' (docs/data.md)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="samples per shard (default 5000; atari: 20 episode chunks of 256 frames)")
    p.add_argument("--games", default="Pong,Breakout", help="atari: comma-separated ALE game names")
    p.add_argument("--frames", type=int, default=10000, help="atari: observations for train, shared across the games")
    p.add_argument("--test-frames", type=int, default=None, help="atari: held-out episodes for test (default frames/5)")
    p.add_argument("--seed", type=int, default=0, help="atari: seed of play (test uses seed+1)")
    p.add_argument("--max-episode-frames", type=int, default=27000, help="atari: cut (and reset) longer episodes")

    p = sub.add_parser("status", help="state of a run's Slurm job(s) and last checkpoint, or a list of recent runs")
    p.add_argument("run", nargs="?", help="a run folder (default: list the recent runs under --run-dir)")
    p.add_argument("--run-dir", default="runs", help="where runs are (default: runs)")
    p.add_argument("--limit", type=int, default=20, help="how many recent runs to list")

    p = sub.add_parser("logs", help="print the stdout/stderr of a run's latest Slurm job")
    p.add_argument("run", help="a run folder")
    p.add_argument("--task", type=int, default=0, help="which task (rank) of the job (default: 0)")
    p.add_argument("--job", default=None, help="a job id of the run (default: the latest)")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines of each file")

    p = sub.add_parser("report", help="one self-contained HTML page of a run (scalars, pictures, probe and "
                                      "fine-tune results, config) and a PNG of it")
    p.add_argument("run", help="a run folder")
    p.add_argument("-o", "--output", default=None,
                   help="the HTML file to write (default: RUN/report.html); the PNG goes beside it, named .png")
    p.add_argument("--no-png", action="store_true", help="write the HTML only (the PNG needs Chromium)")
    p.add_argument("--width", type=int, default=1200, help="the PNG's width in pixels (default: 1200)")
    p.add_argument("--height", type=int, default=None,
                   help="the PNG's height in pixels (default: the whole page)")

    sub.add_parser("backbones", help="list registered backbones")
    sub.add_parser("methods", help="list methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from selfsup.launch import commands

        return getattr(commands, args.command)(args) or 0
    except UserError as err:
        print(f"submit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("submit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
