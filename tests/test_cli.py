"""The command line: fast start, one-line errors with exit code 2, listings."""

import subprocess
import sys

from conftest import run_submit


def test_help_does_not_import_torch():
    """`submit --help` stays fast because it imports neither torch nor Lightning; its wall time is a
    benchmark (benchmarks/cli_startup.py), not a test, since a loaded machine would fail any bound."""
    code = ("import sys\nfrom selfsup.launch.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'heavy import at start-up'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_unknown_backbone_names_the_nearest():
    line = one_line_error(run_submit("pretrain", "rotnet", "nosuchnet"))
    assert "'nosuchnet'" in line and "did you mean" in line and "resnet18" in line


def test_unknown_key_names_the_nearest():
    line = one_line_error(run_submit("pretrain", "rotnet", "resnet18", "optim.lrr=1"))
    assert "'optim.lrr'" in line and "did you mean 'optim.lr'" in line


def test_bad_type_and_unknown_method_and_data():
    assert "expects a number" in one_line_error(run_submit("pretrain", "rotnet", "resnet18", "optim.lr=fast"))
    assert "'rotnett'" in one_line_error(run_submit("pretrain", "rotnett", "resnet18"))
    assert "fashion_mnist" in one_line_error(run_submit("pretrain", "rotnet", "resnet18", "data=fashion"))
    assert "key=value" in one_line_error(run_submit("pretrain", "rotnet", "resnet18", "lr"))


def test_listings():
    out = run_submit("backbones", check=True).stdout
    for name in ("resnet18", "resnet50", "convnext_b", "vit_t", "resnet10_s1_w32"):
        assert name in out
    assert "convnet" in out and "vit" in out and "87.57M" in out  # convnext_b's parameter count
    assert "rotnet" in run_submit("methods", check=True).stdout


def test_shards_source_means_the_same_wherever_the_command_runs(tmp_path, monkeypatch):
    from selfsup.data.kinds import find_kind
    from selfsup.core.errors import UserError
    from selfsup.launch.commands import shard_source

    monkeypatch.chdir(tmp_path)
    assert shard_source("atari") is find_kind("atari") and shard_source("digits") is find_kind("digits")
    (tmp_path / "my_images").mkdir()
    for folder in ("./atari", "atari/", str(tmp_path / "atari"), "./digits", "my_images"):
        assert shard_source(folder) is None, folder  # an image folder
    (tmp_path / "atari").mkdir()  # a folder named like built-in data: neither reading is guessed
    try:
        shard_source("atari")
        raise AssertionError("a bare name that is also a folder here must be refused")
    except UserError as err:
        assert "./atari" in str(err) and "builtin:atari" in str(err)
    assert shard_source("builtin:atari") is find_kind("atari") and shard_source("./atari") is None
    line = one_line_error(run_submit("shards", "atari", tmp_path / "out", cwd=tmp_path))
    assert "./atari" in line and "builtin:atari" in line and not (tmp_path / "out").exists()
    assert "'nosuchdata'" in one_line_error(run_submit("shards", "nosuchdata", tmp_path / "out", cwd=tmp_path))
