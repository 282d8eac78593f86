"""Slurm through submitit, on a real Slurm cluster (slurm/local-cluster.sh, one or two nodes; .ci/run
starts two and exports SLURM_CONF; the jobs here ask for one node). A job submitted with
`submit pretrain ... cluster=slurm` trains, gets USR2, checkpoints, is requeued, resumes mid-epoch and
ends at the step of an uninterrupted run.

Without a controller these tests are skipped with a loud reason; where CI=true or
SELFSUP_REQUIRE_SLURM=1 (as .ci/run sets) they fail instead. The --dry-run tests need no Slurm."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_scalars, run_submit

# the tests share one local cluster (two nodes of 2 CPUs): they run one after another, on one worker
pytestmark = pytest.mark.xdist_group("slurm")

TINY = ["rotnet", "resnet_tiny", "data=digits", "data.batch_size=16", "data.num_workers=0"]
DEFAULT_CONF = Path("/tmp/selfsup-slurm/etc/slurm.conf")  # `bash slurm/local-cluster.sh start`'s default


def _controller_up() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return " is UP" in out.stdout


@pytest.fixture(scope="module")
def slurm():
    if not os.environ.get("SLURM_CONF") and DEFAULT_CONF.exists():
        os.environ["SLURM_CONF"] = str(DEFAULT_CONF)
    if _controller_up():
        return os.environ.get("SLURM_CONF")
    message = (f"NO SLURM CONTROLLER ANSWERS `scontrol ping` (SLURM_CONF={os.environ.get('SLURM_CONF')!r}): "
               "the Slurm tests did NOT run. Start the local cluster with `bash slurm/local-cluster.sh start` "
               "and export SLURM_CONF as it prints")
    if os.environ.get("CI") == "true" or os.environ.get("SELFSUP_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)


# ---- --dry-run: the sbatch script (no Slurm needed) -----------------------------------------------
def _dry_run(tmp_path, *overrides):
    proc = run_submit("pretrain", "rotnet", "resnet_tiny", "cluster=slurm", *overrides, f"run_dir={tmp_path}",
                      "run_name=dry", "--dry-run", check=True)
    config_text, script = proc.stdout.split("# ---- the sbatch script submitit would submit", 1)
    return yaml.safe_load(config_text), script


def test_dry_run_sbatch_for_4_nodes_of_8_gpus(tmp_path):
    cfg, script = _dry_run(tmp_path, "nodes=4", "gpus_per_node=8")
    lines = script.splitlines()
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR2@90", "--requeue",
                 "--time=60", "--open-mode=append"):
        assert f"#SBATCH {flag}" in lines, (flag, script)
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
    assert f"{tmp_path / 'dry' / 'slurm'}/%j_%t_log.out" in script
    # Lightning's shape derived from the same values: one process per GPU
    assert cfg["trainer"]["num_nodes"] == 4 and cfg["trainer"]["devices"] == 8 and cfg["trainer"]["accelerator"] == "gpu"
    assert not any(tmp_path.iterdir())  # nothing written, nothing submitted


def test_dry_run_profile_and_overrides(tmp_path):
    cfg, script = _dry_run(tmp_path, "cluster.profile=gpu-a100", "cluster.partition=big", "cluster.time_min=30",
                           "cluster.account=proj", "cluster.signal_delay_s=200")
    lines = script.splitlines()
    for flag in ("--partition=big", "--constraint=a100", "--gpus-per-node=8", "--ntasks-per-node=8", "--exclusive",
                 "--cpus-per-task=10", "--mem=480GB", "--time=30", "--account=proj", "--signal=USR2@200"):
        assert f"#SBATCH {flag}" in lines, (flag, script)
    assert "--cpu-bind=none" in script
    assert cfg["cluster"]["partition"] == "big" and cfg["cluster"]["constraint"] == "a100"
    # CPU jobs: cluster.tasks_per_node tasks, no GPUs
    cfg, script = _dry_run(tmp_path, "cluster.tasks_per_node=2")
    assert "#SBATCH --ntasks-per-node=2" in script and "gpus-per-node" not in script
    assert cfg["trainer"]["devices"] == 2 and cfg["trainer"]["accelerator"] == "cpu"


def test_cluster_errors_are_one_line(tmp_path):
    for args, words in ((["cluster=slurm", "cluster.profile=nope"], "profile"),
                        (["cluster=slurm", "gpus_per_node=4", "cluster.tasks_per_node=2"], "one task per GPU"),
                        (["nodes=2"], "cluster=slurm")):
        proc = run_submit("pretrain", *TINY, *args, f"run_dir={tmp_path}", "--dry-run")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr


# ---- a real job: USR2 -> checkpoint -> requeue -> resume --------------------------------------------
BATCHES_PER_EPOCH = 10
EPOCHS = 3
JOB = [*TINY, f"data.epoch_samples={16 * BATCHES_PER_EPOCH}", f"trainer.max_epochs={EPOCHS}", "checkpoint_every_n_steps=4",
       "trainer.log_every_n_steps=1", "images_every_n_steps=0", "trainer.enable_progress_bar=false"]


def _sacct_states(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return [s.strip() for s in out.stdout.splitlines() if s.strip()]


def _wait(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _epoch_by_step(tb: Path) -> dict[int, int]:
    return {step: int(value) for step, value in read_scalars(tb)["epoch"]}


def test_usr2_checkpoints_requeues_and_resumes_mid_epoch(slurm, tmp_path):
    run = tmp_path / "runs" / "s"
    proc = run_submit("pretrain", *JOB, "cluster=slurm", "cluster.profile=local", f"run_dir={tmp_path / 'runs'}",
                      "run_name=s", check=True)
    job_id = re.search(r"submitted Slurm job (\d+)", proc.stdout).group(1)
    assert f"tensorboard --logdir {run / 'tb'}" in proc.stdout and str(run / "slurm" / f"{job_id}_0_log.out") in proc.stdout
    assert json.loads((run / "slurm" / "jobs.json").read_text())[0]["job_id"] == job_id

    # the same run without interruption, here, meanwhile (for its final step and epoch-per-step)
    reference = subprocess.Popen([__import__("sys").executable, "-m", "selfsup.launch.cli", "pretrain", *JOB,
                                  f"run_dir={tmp_path / 'runs'}", "run_name=u"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        info = run / "checkpoints" / "last.json"
        # wait until it is in its second epoch (a checkpoint at step 12), then send USR2
        _wait(lambda: info.exists() and json.loads(info.read_text())["global_step"] >= 12, 240, "step 12 in the Slurm job")
        assert _sacct_states(job_id)[-1] == "RUNNING"
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        final = _wait(lambda: (s := _sacct_states(job_id)) and s[-1] not in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING")
                      and len(s) > 1 and s, 300, "the requeued job to end")
    finally:
        ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-3000:]
    assert final[-1] == "COMPLETED" and "REQUEUED" in final[:-1], final

    logs = run_submit("logs", run, check=True).stdout
    saved = re.search(r"SIGUSR2 received: checkpoint saved at step (\d+) \(epoch (\d+)\)", logs)
    assert saved, logs[-3000:]
    step_at_signal, epoch_at_signal = int(saved.group(1)), int(saved.group(2))
    assert "Requeued job" in logs and f"resuming from {run / 'checkpoints' / 'last.ckpt'} (step {step_at_signal})" in logs
    assert 12 <= step_at_signal < EPOCHS * BATCHES_PER_EPOCH and epoch_at_signal == (step_at_signal - 1) // BATCHES_PER_EPOCH

    # the same final step as the uninterrupted run
    uninterrupted = torch.load(tmp_path / "runs" / "u" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    requeued = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert requeued["global_step"] == uninterrupted["global_step"] == EPOCHS * BATCHES_PER_EPOCH
    assert requeued["epoch"] == uninterrupted["epoch"]
    progress = requeued["loops"]["fit_loop"]["epoch_progress"]["total"]
    assert progress["completed"] == uninterrupted["loops"]["fit_loop"]["epoch_progress"]["total"]["completed"]

    # no epoch repeated: every logged step has the epoch it has in the uninterrupted run, every epoch
    # has its steps once (the step at which the signal came is saved but not logged: the job ended there)
    requeued_epochs, reference_epochs = _epoch_by_step(run / "tb"), _epoch_by_step(tmp_path / "runs" / "u" / "tb")
    assert set(reference_epochs) == set(range(EPOCHS * BATCHES_PER_EPOCH))
    assert set(reference_epochs) - set(requeued_epochs) <= {step_at_signal - 1}
    assert all(requeued_epochs[s] == reference_epochs[s] for s in requeued_epochs)
    resumed_steps = sorted(s for s in requeued_epochs if s >= step_at_signal)
    assert resumed_steps[0] == step_at_signal  # the resumed job went on from the next step, mid-epoch
    if step_at_signal % BATCHES_PER_EPOCH:
        assert requeued_epochs[step_at_signal] == epoch_at_signal  # ... and finished the interrupted epoch

    # submit status: this run, and the list of recent runs
    status = run_submit("status", run, check=True).stdout
    assert f"job {job_id}: COMPLETED" in status and "REQUEUED" in status
    assert f"last checkpoint: step {EPOCHS * BATCHES_PER_EPOCH}" in status
    listing = run_submit("status", "--run-dir", tmp_path / "runs", check=True).stdout
    assert re.search(rf"{re.escape(str(run))}\s+slurm\s+{job_id}\s+COMPLETED\s+{EPOCHS * BATCHES_PER_EPOCH}", listing), listing
    assert re.search(rf"{re.escape(str(tmp_path / 'runs' / 'u'))}\s+local\s+-", listing), listing


def test_auto_picks_slurm_when_a_controller_answers(slurm, tmp_path):
    proc = run_submit("pretrain", *TINY, "cluster=auto", f"run_dir={tmp_path}", "--dry-run", check=True)
    assert "cluster=auto -> cluster=slurm" in proc.stderr and "#SBATCH --requeue" in proc.stdout
    proc = run_submit("pretrain", *TINY, "cluster=auto", f"run_dir={tmp_path}", "--dry-run", check=True,
                      env={"SLURM_CONF": str(tmp_path / "no-such.conf")})
    assert "cluster=auto -> cluster=local" in proc.stderr and "#SBATCH" not in proc.stdout
    assert yaml.safe_load(proc.stdout)["cluster"]["name"] == "local"


def test_two_tasks_ddp_on_slurm_checkpoint_together_and_resume(slurm, tmp_path):
    """2 tasks (ranks from Lightning's SLURMEnvironment) on the node, DDP on CPU: both ranks save at the
    same step on USR2, rank 0 requeues, both resume, and the run ends at the uninterrupted step."""
    run_submit("shards", "digits", tmp_path / "shards", "--samples-per-shard", 180, check=True)
    run = tmp_path / "runs" / "t2"
    proc = run_submit("pretrain", "rotnet", "resnet_tiny", f"data={tmp_path / 'shards' / 'train'}", "data.batch_size=16",
                      "data.num_workers=0", f"data.epoch_samples={2 * 16 * BATCHES_PER_EPOCH}", f"trainer.max_epochs={EPOCHS}",
                      "checkpoint_every_n_steps=4", "images_every_n_steps=0", "trainer.enable_progress_bar=false",
                      "cluster=slurm", "cluster.profile=local", "cluster.tasks_per_node=2", "strategy=ddp",
                      f"run_dir={tmp_path / 'runs'}", "run_name=t2", check=True)
    job_id = re.search(r"submitted Slurm job (\d+) \(1 node\(s\) x 2 task\(s\)\)", proc.stdout).group(1)
    info = run / "checkpoints" / "last.json"
    _wait(lambda: info.exists() and json.loads(info.read_text())["global_step"] >= 12, 240, "step 12 in the Slurm job")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    final = _wait(lambda: (s := _sacct_states(job_id)) and s[-1] not in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING")
                  and len(s) > 1 and s, 300, "the requeued job to end")
    assert final[-1] == "COMPLETED" and "REQUEUED" in final[:-1], final
    steps = []
    for task in (0, 1):
        out = run_submit("logs", run, "--task", task, check=True).stdout
        assert f"global_rank={task}(2)" in out
        saved = re.findall(r"SIGUSR2 received: checkpoint saved at step (\d+)", out)
        assert len(saved) == 1 and f"resuming from {run / 'checkpoints' / 'last.ckpt'} (step {saved[0]})" in out, out[-2000:]
        steps.append(int(saved[0]))
    assert steps[0] == steps[1]  # the ranks agreed on the step
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == EPOCHS * BATCHES_PER_EPOCH


def test_probe_job_extracts_on_two_tasks_and_task_0_fits(slurm, tmp_path):
    """`submit probe RUN cluster=slurm` with 2 tasks: each extracts its block of the 3 train shards,
    task 0 gathers the parts into the run's feature cache (in shard order) and writes probe.json."""
    import webdataset as wds

    run_submit("shards", "digits", tmp_path / "shards", "--samples-per-shard", 300, check=True)
    run_submit("pretrain", *TINY, "trainer.max_steps=1", "images_every_n_steps=0", f"run_dir={tmp_path / 'runs'}",
               "run_name=p", check=True)
    run = tmp_path / "runs" / "p"
    train = [str(tmp_path / "shards" / "train" / f"train-00000{i}.tar") for i in range(3)]
    proc = run_submit("probe", run, "cluster=slurm", "cluster.profile=local", "cluster.tasks_per_node=2",
                      f"data.train={tmp_path / 'shards' / 'train' / 'train-{000000..000002}.tar'}",
                      f"data.test={tmp_path / 'shards' / 'test' / 'test-000000.tar'}", "data.num_workers=0",
                      "probe.max_iter=30", "probe.weight_decays=[1e-4]", check=True)
    job_id = re.search(r"submitted Slurm probe job (\d+) \(1 node\(s\) x 2 task\(s\)\)", proc.stdout).group(1)
    assert json.loads((run / "probe" / "slurm" / "jobs.json").read_text())[0]["job_id"] == job_id
    result = _wait(lambda: (run / "probe.json").exists() and json.loads((run / "probe.json").read_text()), 240,
                   "probe.json from the Slurm job")
    assert result["extraction_ranks"] == 2 and (result["train_samples"], result["test_samples"]) == (900, 300)
    (cache,) = (run / "probe").glob("features-*")  # the parts are gone, gathered into the cache
    labels = [int(s["cls"]) for s in wds.WebDataset(train, shardshuffle=False)]
    assert torch.load(cache, weights_only=True)["train"]["all"][1].tolist() == labels
    logs = {task: (run / "probe" / "slurm" / f"{job_id}_{task}_log.out").read_text() for task in (0, 1)}
    assert "probe task 1 of 2" in logs[1] and "task 1: features written" in logs[1]
    assert "probe task 0 of 2" in logs[0] and "linear (chosen on val)" in logs[0]
