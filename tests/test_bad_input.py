"""A command line that cannot run ends in one line on stderr and exit code 2, before any run folder
is made: every case runs the CLI in-process (validation comes before any training work)."""

import pytest

from selfsup.data.shards import builtin_shards
from selfsup.launch.cli import main


@pytest.fixture(scope="module", autouse=True)
def digits_shards():
    """Write the built-in digits shards before any case captures stderr (their bar goes there)."""
    for split in ("train", "test"):
        builtin_shards("digits", split)


@pytest.fixture
def submit(tmp_path, capsys):
    """Runs `submit ARGS` with run_dir=tmp_path/runs; returns the one stderr line of a refusal after
    checking exit code 2, a single line, no traceback and no folder left under run_dir."""
    runs = tmp_path / "runs"

    def refused(*args, run_dir=True):
        code = main([*args, *([f"run_dir={runs}"] if run_dir else [])])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1 and "Traceback" not in err, err
        assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
        return lines[0]

    return refused


TINY = ["rotnet", "resnet_tiny", "data=digits", "data.batch_size=16", "data.num_workers=0", "steps=2"]


def test_spark_mask_grid_needs_two_cells_a_side(submit):
    line = submit("pretrain", "spark", "convnext_atto", "data=digits", "data.image_size=32")
    assert line.startswith("submit pretrain: error: spark: data.image_size=32 ")
    assert "1x1 mask grid" in line and "use image_size=64" in line
    line = submit("pretrain", "spark", "convnext_atto", "data=digits", "data.image_size=48")
    assert "data.image_size=48 is not a multiple of convnext_atto's total stride 32" in line


def test_obow_border_crop_leaves_no_map(submit):
    line = submit("pretrain", "obow", "resnet18", "data=digits", "data.image_size=32")
    assert "obow: data.image_size=32" in line and "method.border=1" in line and "use image_size=65 or more" in line


def test_convnet_maps_that_vanish(submit):
    line = submit("pretrain", "rotnet", "convnet4", "data=digits", "data.image_size=8")
    assert "data.image_size=8 is too small for convnet4" in line and "image_size=16" in line


def test_vit_patch_grid_must_fit_the_image(submit):
    line = submit("pretrain", "rotnet", "vit_t", "data=digits")
    assert "vit_t is built for 224 px images, not data.image_size=32" in line and "backbone.kwargs.img_size=32" in line
    line = submit("pretrain", "rotnet", "vit_tiny_test", "data=digits", "image_size=2", "backbone.kwargs.img_size=2")
    assert "data.image_size=2 is smaller than vit_tiny_test's 4 px patches" in line
    line = submit("pretrain", "sit", "vit_tiny_test", "data=digits", "image_size=30", "backbone.kwargs.img_size=30")
    assert "sit: data.image_size=30 is not a multiple of vit_tiny_test's 4 px patches" in line
    line = submit("pretrain", "tov_vicreg", "cct_tiny_test")
    assert "cct_tiny_test is built for 32 px images, not data.image_size=84" in line


def test_a_run_needs_a_step_or_epoch_bound(submit):
    line = submit("pretrain", *TINY, "trainer.max_epochs=-1", "trainer.max_steps=-1")
    assert "the run has no end" in line and "pass steps=N or epochs=N" in line
    line = submit("pretrain", *TINY, "trainer.max_epochs=-1", "trainer.max_steps=-1", "trainer.max_time=00:00:10:00")
    assert "trainer.max_time='00:00:10:00' alone" in line and "pass steps=N" in line
    assert "trainer.max_time='15m' is not a duration" in submit("pretrain", *TINY, "trainer.max_time=15m")
    assert "trainer.max_steps=0" in submit("pretrain", *TINY, "trainer.max_steps=0")


def test_an_epoch_must_hold_a_batch_for_every_rank(submit):
    line = submit("pretrain", *TINY, "data.epoch_samples=10")
    assert "an epoch of 10 samples is smaller than one global batch (16 images)" in line and "data.batch_size=10" in line
    line = submit("pretrain", *TINY, "data.epoch_samples=40", "trainer.accelerator=cpu", "trainer.devices=3", "strategy=ddp")
    assert "(16 images x 3 ranks = 48)" in line and "data.batch_size=13" in line
    line = submit("pretrain", "obow", "resnet_tiny", "data=digits", "trainer.accelerator=cpu", "trainer.devices=3",
                  "strategy=ddp", "method.num_words=64", "data.batch_size=8", "method.border=0")
    assert "method.num_words=64 is not a multiple of the global batch (24" in line and "method.num_words=72" in line


def test_missing_data_leaves_no_run_folder(submit, tmp_path):
    line = submit("pretrain", "rotnet", "resnet18", "data=/nonexistent")
    assert line == "submit pretrain: error: no shards found at '/nonexistent' (missing: /nonexistent)"
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "a-000000.tar").write_bytes(b"")
    assert "no index.json" in submit("pretrain", "rotnet", "resnet_tiny", f"data={tmp_path / 'bare'}")


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=-1", "optim.lr=-1.0: must be a positive learning rate"),
    ("batch_size=0", "data.batch_size=0: must be a positive number"),
    ("image_size=0", "data.image_size=0: must be a positive number of pixels"),
    ("data.num_workers=-1", "data.num_workers=-1: must be 0"),
    ("optim.name=adamx", "unknown optim.name 'adamx': did you mean 'adamax'"),
    ("optim.schedule=linear", "unknown optim.schedule 'linear'"),
    ("trainer.precision=garbage", "unknown trainer.precision 'garbage'"),
    ("trainer.devices=0", "trainer.devices=0: give a positive number of devices"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]"),
    ("backbone.kwargs.nosuch=1", "backbone.kwargs {'nosuch': 1} do not fit resnet_tiny"),
    ("method.mask_ratio=1.0", None),  # spark only: an unknown key for rotnet
])
def test_bad_numbers_and_names(submit, override, needle):
    line = submit("pretrain", *TINY, override)
    assert (needle or "unknown config key 'method.mask_ratio'") in line, line


def test_spark_mask_ratio_range(submit):
    line = submit("pretrain", "spark", "convnext_atto", "data=digits", "image_size=64", "method.mask_ratio=1.0")
    assert "spark: method.mask_ratio=1.0: must be in (0, 1)" in line


def test_probe_export_and_shards_refusals(submit, tmp_path):
    line = submit("probe", str(tmp_path / "no-run"), run_dir=False)
    assert f"'{tmp_path / 'no-run'}' does not exist" in line
    assert "probe.batch_size=0" in submit("probe", "random:resnet_tiny", "data=digits", "probe.batch_size=0", run_dir=False)
    assert "probe.val_fraction=2.0" in submit("probe", "pixels", "data=digits", "probe.val_fraction=2", run_dir=False)
    line = submit("probe", "pixels", "data=digits", "probe.precision=fp8", run_dir=False)
    assert line.startswith("submit probe: error: probe.precision='fp8': use auto") and "32-true" in line
    line = submit("probe", "random:vit_t", "data=digits", run_dir=False)
    assert "vit_t is built for 224 px images" in line
    line = submit("probe", "random:convnet4", "data=digits", "probe.layers=[2,7]", run_dir=False)
    assert line == ("submit probe: error: probe.layers=[2,7]: convnet4 has no layer 7; use 1..4 (stage1..stage4, or "
                    "timm's stages.0..stages.3), a list of them, or all")
    assert "no such file or folder" in submit("export", str(tmp_path / "none"), "-o", str(tmp_path / "x.safetensors"),
                                               run_dir=False)
    assert "does not exist" in submit("shards", str(tmp_path / "none"), str(tmp_path / "out"), run_dir=False)
    (tmp_path / "empty").mkdir()
    assert "no images" in submit("shards", str(tmp_path / "empty"), str(tmp_path / "out"), run_dir=False)
    line = submit("shards", "digits", str(tmp_path / "out"), "--samples-per-shard", "0", run_dir=False)
    assert line == "submit shards: error: --samples-per-shard 0: give a positive number"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, line", [
    ("probe.solver=sgd", "probe.solver='sgd': use auto (L-BFGS up to probe.minibatch.auto_above = samples x dims x "
                         "classes, mini-batch above), lbfgs or minibatch"),
    ("probe.minibatch.epochs=0", "probe.minibatch.epochs=0: must be a positive number of epochs, e.g. 10"),
    ("probe.minibatch.batch_size=-5", "probe.minibatch.batch_size=-5: must be a positive number of samples per step, "
                                      "e.g. 4096"),
    ("probe.minibatch.momentum=1", "probe.minibatch.momentum=1.0: must be in [0, 1), e.g. 0.9"),
    ("probe.minibatch.auto_above=0", "probe.minibatch.auto_above=0.0: must be a positive size"),
    ("probe.minibatch.lrs=[]", "probe.minibatch.lrs=[]: must be one or more positive learning rates"),
    ("probe.minibatch.lrs=[0.1,-1e-2]", "probe.minibatch.lrs=[0.1, -0.01]: must be one or more positive"),
    ("probe.minibatch.lrs=[fast]", "probe.minibatch.lrs=['fast']: must be one or more positive"),
    ("probe.weight_decays=[1e-4,x]", "probe.weight_decays=[0.0001, 'x']: must be one or more penalties"),
])
def test_probe_solver_refusals(submit, override, line):
    assert submit("probe", "pixels", "data=digits", override, run_dir=False).startswith(f"submit probe: error: {line}")


def test_probe_cluster_refusals(submit):
    line = submit("probe", "pixels", "data=digits", "nodes=2", run_dir=False)
    assert line == ("submit probe: error: nodes=2: a local probe runs in one process; extraction on several GPUs "
                    "or nodes needs cluster=slurm")
    assert "unknown cluster 'slurmx': did you mean 'slurm'" in submit("probe", "pixels", "cluster=slurmx", run_dir=False)
    line = submit("probe", "random:resnet_tiny", "data=digits", "cluster=slurm", run_dir=False)
    assert "cluster=slurm: probe a run folder (or a .ckpt inside one), not 'random:resnet_tiny'" in line


def test_continual_refusals(submit):
    assert "tasks=0: need at least one task" in submit("continual", "contracon", "cct_tiny_test", "data=digits", "tasks=0")
    line = submit("continual", "contracon", "cct_tiny_test", "data=digits", "tasks=11")
    assert "tasks=11: 10 classes do not split into 11 equal tasks" in line
    line = submit("continual", "contracon", "cct_tiny_test", "data=digits", "image_size=64")
    assert "cct_tiny_test is built for 32 px images, not data.image_size=64" in line
    assert "data.batch_size=0" in submit("continual", "contracon", "cct_tiny_test", "data=digits", "batch_size=0")


# ---- a run that fails before its first step leaves no folder; a resumed one is never removed ------
def _failing_run(cfg, run_dir, **_):
    (run_dir / "tb").mkdir()  # what Lightning has made by then
    from selfsup.core.errors import UserError

    raise UserError("the data broke before the first step")


def test_a_new_run_that_fails_before_its_first_step_leaves_no_folder(submit, monkeypatch, tmp_path):
    monkeypatch.setattr("selfsup.launch.train.run_training", _failing_run)
    monkeypatch.delenv("_SELFSUP_LAUNCHED_RUN_DIR", raising=False)
    assert submit("pretrain", *TINY, "run_name=r").endswith("the data broke before the first step")


def test_a_resumed_run_or_one_with_a_checkpoint_is_kept(monkeypatch, tmp_path, capsys):
    from selfsup.launch.commands import remove_unstarted_run

    run = tmp_path / "r"
    assert main(["pretrain", *TINY, f"run_dir={tmp_path}", "run_name=r", "--dry-run"]) == 0
    run.mkdir()
    (run / "config.yaml").write_text("\n".join(capsys.readouterr().out.splitlines()[1:]) + "\n")
    monkeypatch.setattr("selfsup.launch.train.run_training", _failing_run)
    monkeypatch.delenv("_SELFSUP_LAUNCHED_RUN_DIR", raising=False)
    assert main(["pretrain", "rotnet", "resnet_tiny", f"resume={run}"]) == 2
    assert (run / "config.yaml").exists()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    assert not remove_unstarted_run(run) and (run / "checkpoints" / "last.ckpt").exists()


def test_tov_vicreg_needs_episode_shards(submit, tmp_path):
    from selfsup.data.atari import write_atari_shards
    from selfsup.ssl.tov_vicreg.method import holds_episodes

    line = submit("pretrain", "tov_vicreg", "vit_tiny_test", "data=digits", "image_size=84")
    assert "tov_vicreg needs ordered episode shards, and data=digits holds single images" in line
    write_atari_shards(tmp_path / "atari", ["Breakout"], frames=30, test_frames=0, max_episode_frames=20)
    assert holds_episodes(str(tmp_path / "atari" / "train")) is True
    assert holds_episodes(str(builtin_shards("digits", "train"))) is False
    assert holds_episodes(str(tmp_path / "elsewhere")) is None
