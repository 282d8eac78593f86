"""Two-node DDP on the two-node local Slurm cluster (`bash slurm/local-cluster.sh start --nodes 2`;
.ci/run starts it so): `submit pretrain rotnet resnet_tiny cluster=slurm nodes=2 strategy=ddp` runs
one rank per node (gloo on CPU), node 2 being a slurmd in its own network and UTS namespaces.

One job shows everything, to keep the wall time down:
- the two ranks run on different hosts (the job's two nodes);
- their samples come from disjoint shards, and they take the same number of batches every epoch;
- only rank 0 writes the checkpoint (one file);
- `scancel --signal=USR2` makes both ranks checkpoint at the same step; the job is requeued, resumes
  on both nodes and ends at the step an uninterrupted run ends at;
- the final weights equal those of a single process that trains on the same global batches: the two
  ranks' batches of each step, in one process, with `trainer.accumulate_grad_batches=2` (the mean of
  the two halves' gradients is what DDP all-reduces; each half keeps its own BatchNorm statistics, as
  each rank does), from the same initial weights, in fp32. Tolerance: max |difference| <= 1e-5 over
  every parameter, for float sums taken in another order. Measured on 2026-12-03 (2-core CPU): 0.0,
  bit-identical; the weights move up to 8e-3 from their start, and one rank's batches alone (rank 0's
  twice per step) end 8e-3 away.

What each rank trains on is recorded by a `sitecustomize` module that the job's Python processes load
from PYTHONPATH (the submitting environment reaches the job): a Lightning callback that saves every
batch, the weights at the start and at the end, and every checkpoint file a rank writes. It also
holds rank 0 at a fixed step of the first run until the USR2 has reached it, so the checkpoint step
is known in advance (the signal is the real one, sent with scancel)."""

import json
import os
import re
import subprocess
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import run_submit
from test_slurm import _sacct_states, _wait, slurm  # noqa: F401  (slurm: the fixture)

# the tests share one local cluster (two nodes of 2 CPUs): they run one after another, on one worker
pytestmark = pytest.mark.xdist_group("slurm")

SAMPLES_PER_SHARD = 180
BATCHES_PER_EPOCH = 4  # per rank
EPOCHS = 2
TOTAL_STEPS = EPOCHS * BATCHES_PER_EPOCH
PAUSE_AT = 5  # rank 0 of the first run waits at the end of this step for the USR2, which both ranks act on there
TOLERANCE = 1e-5

TRACE_SITE = textwrap.dedent('''
    # sitecustomize of tests/test_slurm_two_nodes.py: loaded by every Python process of its Slurm job
    import os

    if os.environ.get("SELFSUP_TEST_TRACE") and os.environ.get("SLURM_PROCID") is not None:
        import json
        import signal
        import socket
        import time
        from pathlib import Path

        import lightning.pytorch as pl
        import torch

        import selfsup.launch.checkpointing as checkpointing
        import selfsup.launch.train as train

        OUT = Path(os.environ["SELFSUP_TEST_TRACE"])
        PAUSE_AT = int(os.environ["SELFSUP_TEST_PAUSE_AT"])
        RANK = int(os.environ["SLURM_PROCID"])
        RUN = int(os.environ.get("SLURM_RESTART_COUNT") or 0)  # 0: the first run of the job, 1: after the requeue
        HOST = socket.gethostname()

        def weights(module):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

        class Trace(pl.Callback):
            def on_train_start(self, trainer, module):
                (OUT / f"start_r{RANK}_run{RUN}.json").write_text(json.dumps({
                    "global_rank": trainer.global_rank, "world_size": trainer.world_size, "host": HOST,
                    "step": trainer.global_step, "backend": torch.distributed.get_backend(),
                    "master_addr": os.environ.get("MASTER_ADDR")}))
                if trainer.global_step == 0:
                    torch.save(weights(module), OUT / f"init_r{RANK}.pt")

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                torch.save({"step": trainer.global_step, "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                            "batch": batch}, OUT / f"batch_r{RANK}_run{RUN}_s{trainer.global_step:04d}.pt")

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if RANK == 0 and RUN == 0 and trainer.global_step == PAUSE_AT:
                    (OUT / "paused").write_text(str(PAUSE_AT))
                    flag = signal.getsignal(signal.SIGUSR2)  # the job's own USR2 flag (selfsup/launch/slurm_job.py)
                    end = time.time() + 180
                    while flag.signum is None and time.time() < end:
                        time.sleep(0.1)

            def on_train_end(self, trainer, module):
                torch.save(weights(module), OUT / f"final_r{RANK}.pt")

        build_trainer = train.build_trainer

        def traced_build_trainer(cfg, run_dir, extra_callbacks=(), **kwargs):
            return build_trainer(cfg, run_dir, extra_callbacks=(*extra_callbacks, Trace()), **kwargs)

        train.build_trainer = traced_build_trainer
        save_checkpoint = checkpointing.AtomicCheckpointIO.save_checkpoint

        def traced_save_checkpoint(self, checkpoint, path, storage_options=None):
            save_checkpoint(self, checkpoint, path, storage_options)
            with open(OUT / f"writes_r{RANK}.jsonl", "a") as f:
                f.write(json.dumps({"rank": RANK, "host": HOST, "run": RUN, "path": str(path),
                                    "step": checkpoint["global_step"]}) + "\\n")

        checkpointing.AtomicCheckpointIO.save_checkpoint = traced_save_checkpoint
''')


@pytest.fixture(scope="module")
def two_nodes(slurm):  # noqa: F811  (the fixture imported above)
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    usable = [line.split()[0] for line in out.stdout.splitlines()
              if re.match(r"\S+ (idle|mixed|allocated|completing)", line)]
    if len(set(usable)) >= 2:
        return sorted(set(usable))
    message = (f"THE SLURM CLUSTER HAS FEWER THAN 2 USABLE NODES ({out.stdout.strip() or out.stderr.strip()!r}): the "
               "two-node test did NOT run. Start the local cluster with `bash slurm/local-cluster.sh start --nodes 2`")
    if os.environ.get("CI") == "true" or os.environ.get("SELFSUP_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _job_nodes(job_id: str) -> list[str]:
    nodelist = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "NodeList", "-j", job_id], capture_output=True,
                              text=True, check=True).stdout.split()[-1]
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()


class _ReplayEpochs:
    """The recorded batches of the trainer's current epoch (Lightning may iterate more than once per epoch)."""

    def __init__(self, epochs: list[list[dict]], trainer):
        self.epochs, self.trainer = epochs, trainer

    def __len__(self) -> int:
        return len(self.epochs[0])

    def __iter__(self):
        return iter(self.epochs[self.trainer.current_epoch])


def _single_process_weights(overrides: list[str], batches: dict, init: dict, run: Path, out: Path) -> dict:
    """A single process on the same global batches: per step rank 0's batch, then rank 1's, with
    accumulate_grad_batches=2, from the same initial weights."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from selfsup.launch.config import compose
    from selfsup.launch.train import build_trainer
    from selfsup.ssl import method_class

    cfg = compose("rotnet", "resnet_tiny", [*overrides, "trainer.accelerator=cpu", "trainer.devices=1",
                                            "trainer.accumulate_grad_batches=2"])
    job = OmegaConf.load(run / "config.yaml")  # what the job trained with
    assert (job.optim, job.method, job.seed, job.trainer.precision) == (cfg.optim, cfg.method, cfg.seed, "32-true")
    assert job.trainer.num_nodes * job.trainer.devices * job.trainer.accumulate_grad_batches == 2
    pl.seed_everything(cfg.seed, verbose=False)
    module = method_class(cfg.method.name)(cfg, num_classes=10)
    module.load_state_dict(init, strict=True)
    epochs = [[b for step in range(e * BATCHES_PER_EPOCH, (e + 1) * BATCHES_PER_EPOCH)
               for b in (batches[0, step]["batch"], batches[1, step]["batch"])] for e in range(EPOCHS)]
    trainer = build_trainer(cfg, out)
    trainer.fit(module, train_dataloaders=_ReplayEpochs(epochs, trainer))
    assert trainer.global_step == TOTAL_STEPS
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_two_node_ddp_one_rank_per_node_checkpoint_requeue_and_single_process_weights(two_nodes, tmp_path,
                                                                                     monkeypatch, capsys):
    from selfsup.launch.cli import main

    assert main(["shards", "digits", str(tmp_path / "shards"), "--samples-per-shard", str(SAMPLES_PER_SHARD)]) == 0
    assert len(list((tmp_path / "shards" / "train").glob("*.tar"))) == 8
    site, trace = tmp_path / "site", tmp_path / "trace"
    site.mkdir()
    trace.mkdir()
    (site / "sitecustomize.py").write_text(TRACE_SITE)
    overrides = [f"data={tmp_path / 'shards' / 'train'}", "data.batch_size=16", "data.num_workers=0",
                 f"data.epoch_samples={2 * 16 * BATCHES_PER_EPOCH}", f"trainer.max_epochs={EPOCHS}",
                 "trainer.precision=32-true", "checkpoint_every_n_steps=1000", "images_every_n_steps=0",
                 "trainer.enable_progress_bar=false"]
    run = tmp_path / "runs" / "n2"
    # the job gets the submitting environment: the trace module and where it writes
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SELFSUP_TEST_TRACE", str(trace))
    monkeypatch.setenv("SELFSUP_TEST_PAUSE_AT", str(PAUSE_AT))
    capsys.readouterr()
    assert main(["pretrain", "rotnet", "resnet_tiny", *overrides, "cluster=slurm", "cluster.profile=local", "nodes=2",
                 "strategy=ddp", f"run_dir={tmp_path / 'runs'}", "run_name=n2"]) == 0
    submitted = capsys.readouterr().out
    job_id = re.search(r"submitted Slurm job (\d+) \(2 node\(s\) x 1 task\(s\)\)", submitted).group(1)

    # rank 0 waits at the end of step PAUSE_AT for the signal; both ranks then save at that step's end
    def paused() -> bool:
        states = _sacct_states(job_id)
        assert not states or states[-1] in ("PENDING", "RUNNING"), (states, run_submit("logs", run).stdout[-3000:])
        return (trace / "paused").exists()

    _wait(paused, 240, f"rank 0 at step {PAUSE_AT}")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    final = _wait(lambda: (s := _sacct_states(job_id)) and s[-1] not in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING")
                  and len(s) > 1 and s, 300, "the requeued job to end")
    assert final[-1] == "COMPLETED" and "REQUEUED" in final[:-1], final

    # one rank per node, in both runs of the job: two hosts, the job's two nodes
    nodes = _job_nodes(job_id)
    assert len(nodes) == 2 and set(nodes) <= set(two_nodes), (nodes, two_nodes)
    for run_index in (0, 1):
        starts = [json.loads((trace / f"start_r{r}_run{run_index}.json").read_text()) for r in (0, 1)]
        assert [s["global_rank"] for s in starts] == [0, 1] and all(s["world_size"] == 2 for s in starts)
        assert all(s["backend"] == "gloo" for s in starts)
        assert starts[0]["host"] != starts[1]["host"] and {s["host"] for s in starts} == set(nodes), starts
    assert starts[1]["step"] == PAUSE_AT  # the requeued run started from the USR2 checkpoint

    # both ranks saved at the same step on USR2 and resumed from it; submitit's logs name the hosts
    for task in (0, 1):
        out = run_submit("logs", run, "--task", task, check=True).stdout
        saved = re.findall(r"SIGUSR2 received: checkpoint saved at step (\d+)", out)
        assert saved == [str(PAUSE_AT)], out[-2000:]
        assert f"resuming from {run / 'checkpoints' / 'last.ckpt'} (step {PAUSE_AT})" in out, out[-2000:]
        hosts = set(re.findall(rf"hostname=([^,\s]+), local_rank=0\(1\), node={task}\(2\), global_rank={task}\(2\)", out))
        assert hosts == {starts[task]["host"]}, (hosts, out[-2000:])

    # every step once per rank, the same number of batches per epoch on both ranks, disjoint shards
    batches = {}
    for path in sorted(trace.glob("batch_r*_run*_s*.pt")):
        rank = int(re.search(r"batch_r(\d)", path.name).group(1))
        record = torch.load(path, weights_only=True)
        assert (rank, record["step"]) not in batches, path
        batches[rank, record["step"]] = record
    assert sorted(batches) == [(r, s) for r in (0, 1) for s in range(TOTAL_STEPS)]
    for rank in (0, 1):
        per_epoch = Counter(batches[rank, s]["epoch"] for s in range(TOTAL_STEPS))
        assert per_epoch == {e: BATCHES_PER_EPOCH for e in range(EPOCHS)}, per_epoch
        shards = {int(key.removeprefix("train")) // SAMPLES_PER_SHARD
                  for s in range(TOTAL_STEPS) for key in batches[rank, s]["batch"]["key"]}
        assert shards and all(shard % 2 == rank for shard in shards), (rank, sorted(shards))
    keys = [{k for s in range(TOTAL_STEPS) for k in batches[r, s]["batch"]["key"]} for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]

    # one checkpoint file, written by rank 0 only (on USR2 and at the end)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "last.json"]
    assert not (trace / "writes_r1.jsonl").exists()
    writes = [json.loads(line) for line in (trace / "writes_r0.jsonl").read_text().splitlines()]
    assert [(w["run"], w["step"], Path(w["path"]).name) for w in writes] == [(0, PAUSE_AT, "last.ckpt"),
                                                                            (1, TOTAL_STEPS, "last.ckpt")]
    assert {w["host"] for w in writes} == {starts[0]["host"]}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == TOTAL_STEPS  # the step of an uninterrupted run: EPOCHS x BATCHES_PER_EPOCH

    # the weights: both ranks equal, the checkpoint holds them, and a single process on the same
    # global batches reaches them within TOLERANCE
    init = torch.load(trace / "init_r0.pt", weights_only=True)
    w0, w1 = (torch.load(trace / f"final_r{r}.pt", weights_only=True) for r in (0, 1))
    params = [k for k in w0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 20
    assert all(torch.equal(w0[k], w1[k]) and torch.equal(ckpt["state_dict"][k], w0[k]) for k in params)
    single = _single_process_weights(overrides, batches, init, run, tmp_path / "single")
    differences = {k: (single[k] - w0[k]).abs().max().item() for k in params}
    moved = max((w0[k] - init[k]).abs().max().item() for k in params)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= TOLERANCE, (worst, differences[worst])
    assert moved > 100 * TOLERANCE, moved
