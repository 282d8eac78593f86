"""selfsup's speed figures for one GPU machine in one prepared run, inside a fixed time budget.

Three sections, each a markdown table (the machine line first), written to --out after every row:

1. methods: every method of selfsup.ssl.METHODS and ConTraCon (selfsup/continual: its first task,
   which trains the whole backbone, and a later task, which trains the re-weighting) at its standard
   size: 224 px, the paper's backbone (methods_step.py's REFERENCE; ConTraCon's ImageNet-100 CCT,
   cct_6_3x3), the recipe's per-GPU batch (at most --max-batch; ConTraCon: its own recipe's 256),
   bf16 autocast. Images/s and peak GPU memory of selfsup's training step, run as the trainer runs
   it (a real Lightning fit of selfsup's Trainer on one fixed batch that went through the method's
   view, already on the device), against a bare PyTorch loop of the same model, loss and optimizer
   on the same batch (framework_overhead.py's BareLoop): the ratio of their step times is the
   framework's overhead. FLOPs of one step (forward + backward) are counted with torch's
   FlopCounterMode; MFU = those FLOPs per second of selfsup's step / --peak-tflops (the H200's dense
   bf16 peak, 989, by default).
2. spark: SparK's sparse encoder against the paper's masked simulation (method.sparse_backend=masked)
   on the same batch and mask, encoder forward+backward and the full SparK step
   (spark_sparse_vs_masked.py's Workload), under the same autocast.
3. data: images/s of the training input pipeline with data.gpu_augment off and on (data_pipeline.py):
   shards -> workers -> the batch on the device after the view's batch stage.

The budget (--budget-s, 480 by default; the imports count) is shared among the sections (methods
62 %, spark 13 %, data 20 %, 5 % kept in reserve; what one leaves over goes to the next), and a
section's share among its items. Every item warms up, then times windows of steps between
torch.cuda.synchronize calls and gives medians; it ends early at its share of the time, and an
alarm ends it at twice its share (plus 20 s). An item that fails (out of memory at batch 1, an
error, the alarm) becomes a row that says why, and the others run; CUDA out-of-memory halves the
batch and tries again.

--tiny runs every code path small enough for a CPU (tests/test_benchmarks.py): the registry's test
networks at 32 px, batch 4, windows of one step, one CPU thread, SparK's decoder 32 wide, the data
section on SparK's view only; its figures check the machinery, they are not speed claims.

    python benchmarks/gpu_suite.py --out gpu_suite.md                  # the GPU machine, ~8 minutes
    python benchmarks/gpu_suite.py --tiny --out /tmp/tiny.md           # CPU check: tiny nets, 32 px
    python benchmarks/gpu_suite.py --tiny --only rotnet,spark --sections methods,spark
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts the imports too

import argparse  # noqa: E402
import gc  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import data_pipeline  # noqa: E402
import framework_overhead  # noqa: E402
import methods_step  # noqa: E402
import spark_sparse_vs_masked  # noqa: E402
from bench_common import machine_line, make_jpegs, median, photo_dataset  # noqa: E402
from selfsup.core.atomic import write_text_atomic  # noqa: E402
from selfsup.data import views  # noqa: E402
from selfsup.launch.config import compose  # noqa: E402
from selfsup.core.precision import resolve_precision  # noqa: E402
from selfsup.launch.precision import apply_precision  # noqa: E402
from selfsup.launch.train import build_trainer  # noqa: E402
from selfsup.ssl import METHODS, method_class  # noqa: E402

SECTIONS = {"methods": 0.62, "spark": 0.13, "data": 0.20}
RESERVE = 0.05
CONTINUAL = "contracon"
# the standard size of each case; the methods of METHODS not named here: methods_step.backbone_for
STANDARD = {CONTINUAL: "cct_6_3x3"}
TINY = {"rotnet": "resnet_tiny", "obow": "convnet4", "sit": "vit_tiny_test", "spark": "resnet_tiny",
        "tov_vicreg": "vit_tiny_test", CONTINUAL: "cct_tiny_test"}
CONTINUAL_BATCH = 256  # ConTraCon's own recipe (configs/continual/contracon.yaml)
CONTINUAL_CLASSES = 10  # ImageNet-100 in 10 tasks
SPARK_BACKBONES = ["convnext_b", "resnet50"]  # the paper's two
DATA_METHODS = ["spark", "obow"]
GIB = 2**30
TEXT_COLUMNS = {"method", "backbone", "measured", "precision", "device", "view", "gpu_augment", "augmentations run", "note"}


# ---- settings ----------------------------------------------------------------------------------
@dataclass
class Settings:
    device: torch.device
    tiny: bool
    precision: str  # resolved: bf16-mixed, 32-true, ...
    size: int
    batch: int | None  # None: each recipe's (at most max_batch)
    max_batch: int
    warmup: int
    steps: int  # per timed window
    repeats: int  # timed windows
    peak_tflops: float | None
    backbones: dict[str, str]
    spark_backbones: list[str]
    spark_batch: int
    spark_width: int | None  # None: the recipe's decoder width
    data_methods: list[str]
    data_images: int
    data_batches: int
    data_repeats: int
    data_overrides: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)

    @property
    def accelerator(self) -> str:
        return "gpu" if self.device.type == "cuda" else "cpu"

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16-mixed"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()


def settings_from(args) -> Settings:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    requested = args.precision or ("bf16-mixed" if device.type == "cuda" else "auto")
    precision = resolve_precision(requested, "gpu" if device.type == "cuda" else "cpu")
    chosen = dict(item.split("=", 1) for item in args.backbone)
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    if args.tiny:  # the least that still runs every code path: one step per window, SparK's decoder narrowed
        return Settings(device, True, precision, size=32, batch=args.batch or 4, max_batch=args.max_batch, warmup=1,
                        steps=1, repeats=args.repeats or 3, peak_tflops=peak, backbones={**TINY, **chosen},
                        spark_backbones=[chosen.get("spark", TINY["spark"])], spark_batch=2,
                        spark_width=32, data_methods=["spark"], data_images=32, data_batches=2, data_repeats=1,
                        data_overrides=["data.image_size=32", "data.batch_size=4", "data.num_workers=2"],
                        method_overrides={"spark": ["method.decoder_width=32"]})
    return Settings(device, False, precision, size=224, batch=args.batch, max_batch=args.max_batch, warmup=3, steps=5,
                    repeats=args.repeats or 5, peak_tflops=peak, backbones={**STANDARD, **chosen},
                    spark_backbones=[chosen["spark"]] if "spark" in chosen else SPARK_BACKBONES, spark_batch=64,
                    spark_width=None, data_methods=DATA_METHODS, data_images=512, data_batches=24, data_repeats=3)


# ---- time, memory, failures --------------------------------------------------------------------
class TimeLimit(Exception):
    pass


@contextmanager
def hard_limit(seconds: float):
    """Raise TimeLimit in this (main) thread after `seconds` (SIGALRM). An alarm already set (a test
    runner's timeout) is put back afterwards, less the time spent; if it is due sooner, it is left alone."""
    outer = signal.getitimer(signal.ITIMER_REAL)[0] if hasattr(signal, "setitimer") else 0.0
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer") or (
            outer and outer <= seconds):
        yield
        return

    def fire(signum, frame):
        raise TimeLimit(f"ended by its time limit ({seconds:.0f} s)")

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(0.01, outer - (time.monotonic() - start)))


class Budget:
    def __init__(self, seconds: float, started: float = STARTED):
        self.end = started + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def share(self, weight: float, weights_after: float) -> float:
        """Seconds for a part of `weight` when parts weighing `weights_after` (the reserve included) follow."""
        return max(0.0, self.left() * weight / (weight + weights_after))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":  # (a CPU's memory is not measured here, and a full collection costs CPU seconds)
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def shrinking_batch(run, batch: int, device: torch.device):
    """run(batch); on CUDA out-of-memory, free and run again at half the batch, down to 1.
    Returns (result, the batch it ran at, a note naming the batches that did not fit)."""
    too_big = []
    while True:
        try:
            return run(batch), batch, (f"out of memory at batch {', '.join(map(str, too_big))}" if too_big else "")
        except torch.cuda.OutOfMemoryError:
            pass  # leaving the except clause drops the traceback and the tensors its frames hold
        free_memory(device)
        too_big.append(batch)
        if batch == 1:
            raise torch.cuda.OutOfMemoryError(f"out of memory at batch {', '.join(map(str, too_big))}")
        batch = max(1, batch // 2)


def failure(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"failed: {type(err).__name__}: {text}"[:200].replace("|", "/")


# ---- the report --------------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    intro: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)


class Report:
    """The markdown file: the machine line, the run's settings, one table per section; rewritten
    (atomically) after every row, so a run cut short keeps what it measured."""

    def __init__(self, path: Path, header: list[str], budget: Budget, budget_s: float):
        self.path, self.header, self.budget, self.budget_s = path, header, budget, budget_s
        self.tables: dict[str, Table] = {}

    def table(self, key: str, table: Table) -> Table:
        self.tables[key] = table
        return table

    def render(self) -> str:
        used = self.budget_s - self.budget.left()
        lines = ["# selfsup GPU suite", "", *self.header, f"Wall time so far: {used:.0f} s of a {self.budget_s:.0f} s budget.", ""]
        for t in self.tables.values():
            lines += [f"## {t.title}", "", t.intro, "", "| " + " | ".join(t.columns) + " |",
                      "|" + "|".join("---" if c in TEXT_COLUMNS else "---:" for c in t.columns) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in t.rows]
            lines.append("")
        return "\n".join(lines)

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, self.render())


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---- 1. methods -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    label: str
    method: str
    backbone: str
    task: int = 0  # ConTraCon: 0 trains the whole backbone, 1 a later task's re-weighting


def method_cases(s: Settings, only: list[str] | None) -> list[Case]:
    cases = []
    for method in [*METHODS, CONTINUAL]:
        if only is not None and method not in only:
            continue
        if method == CONTINUAL:
            name = s.backbones[CONTINUAL]
            cases += [Case(f"{CONTINUAL} (task 1)", method, name, 0), Case(f"{CONTINUAL} (task 2+)", method, name, 1)]
        else:
            cases.append(Case(method, method, s.backbones.get(method) or methods_step.backbone_for(method, {})))
    return cases


class StepWindows:
    """Times windows of `steps` steps after `warmup` ones, with the device synchronised at every window
    boundary; ends after `repeats` windows or, once one is timed, after `seconds`. As a Lightning
    callback (`on_train_batch_start`) it sets trainer.should_stop; `run(step)` drives a plain loop."""

    def __init__(self, s: Settings, seconds: float):
        self.s, self.seconds = s, seconds
        self.per_step: list[float] = []
        self.batches = 0
        self.done = False
        self._start: float | None = None
        self._first: float | None = None

    def tick(self) -> bool:
        """Called before each step; False once enough is timed."""
        if self.done:
            return False
        n, s = self.batches, self.s
        self.batches += 1
        if n < s.warmup or (n - s.warmup) % s.steps:
            return True
        sync(s.device)
        now = time.perf_counter()
        if self._start is None:
            self._first = now
        else:
            self.per_step.append((now - self._start) / s.steps)
        if len(self.per_step) >= s.repeats or (self.per_step and now - self._first > self.seconds):
            self.done = True
            return False
        self._start = now
        return True

    def run(self, step) -> list[float]:
        while self.tick():
            step()
        return self.per_step

    def total_batches(self) -> int:
        return self.s.warmup + self.s.steps * self.s.repeats + 2

    def callback(self):
        import lightning.pytorch as pl

        windows = self

        class Windows(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if not windows.tick():
                    trainer.should_stop = True

        return Windows()


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def to_device(batch, device: torch.device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


@dataclass
class Timing:
    light: list[float]
    bare: list[float]
    light_peak: float | None
    bare_peak: float | None
    flops: int


def ssl_timing(case: Case, s: Settings, jpegs: list[bytes], batch: int, seconds: float) -> Timing:
    cfg = compose(case.method, case.backbone, methods_step.method_overrides(
        case.method, case.backbone, s.size, batch, s.precision, s.accelerator) + s.method_overrides.get(case.method, []))
    apply_precision(cfg)
    windows = StepWindows(s, 0.45 * seconds)
    cfg.trainer.max_steps = windows.total_batches()
    torch.manual_seed(0)
    module = method_class(case.method)(cfg)
    data = methods_step.make_batch(case.method, module, cfg, batch, jpegs)
    if data is None:
        raise RuntimeError("its view is not an image view: add a synthetic batch for it to methods_step.SYNTHETIC")
    data = to_device(data, s.device)
    reset_peak(s.device)
    with tempfile.TemporaryDirectory(prefix="selfsup-gpu-suite-") as run_dir:
        trainer = build_trainer(cfg, Path(run_dir), extra_callbacks=[windows.callback()], module=module)
        trainer.fit(module, train_dataloaders=methods_step.SameBatch(data, windows.total_batches()))
    light_peak = peak_gib(s.device)
    del trainer, module
    reset_peak(s.device)
    bare = framework_overhead.BareLoop(cfg, windows.total_batches(), s.device)
    bare_times = StepWindows(s, 0.35 * seconds).run(lambda: bare.step(data))
    bare_peak = peak_gib(s.device)
    return Timing(windows.per_step, bare_times, light_peak, bare_peak, count_flops(lambda: bare.step(data)))


def continual_timing(case: Case, s: Settings, jpegs: list[bytes], batch: int, seconds: float) -> Timing:
    from lightning.pytorch.loggers import TensorBoardLogger

    from selfsup.continual.config import compose as compose_continual
    from selfsup.continual.train import TaskModule, build_model, task_trainer

    windows = StepWindows(s, 0.45 * seconds)
    total = windows.total_batches()
    cfg = compose_continual(CONTINUAL, case.backbone, [
        f"data.image_size={s.size}", f"data.batch_size={batch}", f"backbone.kwargs.img_size={s.size}",
        "continual.epochs=1", "continual.first_task_epochs=1", "continual.train_minutes=null",
        "continual.val_checks_per_epoch=1", "trainer.enable_progress_bar=false",
        f"trainer.precision={s.precision}", f"trainer.accelerator={s.accelerator}"])

    def task_module() -> TaskModule:
        torch.manual_seed(0)
        model = build_model(cfg)
        model.add_task(CONTINUAL_CLASSES)
        if case.task:
            model.finish_first_task()
            model.add_task(CONTINUAL_CLASSES)
        return TaskModule(model, case.task, cfg, total)

    view = views.resized_crop_view(s.size, cfg.data.mean, cfg.data.std)
    images = methods_step.make_batch(case.method, SimpleNamespace(train_view=lambda: view), cfg, batch, jpegs)["image"]
    labels = torch.randint(0, CONTINUAL_CLASSES, (batch,), generator=torch.Generator().manual_seed(0))
    data = to_device((images, labels), s.device)
    module = task_module()
    reset_peak(s.device)
    with tempfile.TemporaryDirectory(prefix="selfsup-gpu-suite-") as run_dir:
        logger = TensorBoardLogger(run_dir, name="tb", version="", default_hp_metric=False)
        trainer = task_trainer(cfg, case.task, 1, total, logger, callbacks=[windows.callback()])
        trainer.fit(module, train_dataloaders=methods_step.SameBatch(data, total))
    light_peak = peak_gib(s.device)
    del trainer, module
    reset_peak(s.device)
    bare = task_module().to(s.device)
    (adamw, sgd), _ = bare.configure_optimizers()
    bare.train()
    smoothing = cfg.continual.label_smoothing

    def step() -> None:  # TaskModule.training_step without Lightning
        x, y = data
        with s.autocast():
            loss = F.cross_entropy(bare.model(x, case.task), y, label_smoothing=smoothing)
        adamw.zero_grad(set_to_none=True)
        sgd.zero_grad(set_to_none=True)
        loss.backward()
        adamw.step()
        sgd.step()

    bare_times = StepWindows(s, 0.35 * seconds).run(step)
    bare_peak = peak_gib(s.device)
    return Timing(windows.per_step, bare_times, light_peak, bare_peak, count_flops(step))


def default_batch(case: Case, s: Settings) -> int:
    if s.batch is not None:
        return s.batch
    if case.method == CONTINUAL:
        return min(CONTINUAL_BATCH, s.max_batch)
    cfg = compose(case.method, case.backbone, methods_step.method_overrides(
        case.method, case.backbone, s.size, None, s.precision, s.accelerator))
    return min(int(cfg.data.batch_size), s.max_batch)


METHOD_COLUMNS = ["method", "backbone", "px", "batch", "precision", "device", "selfsup images/s", "bare loop images/s",
                  "overhead (selfsup / bare time)", "selfsup peak GiB", "bare peak GiB", "GFLOP/image", "TFLOP/s",
                  "MFU", "note"]


def method_row(case: Case, s: Settings, jpegs: list[bytes], seconds: float) -> list[str]:
    first = [case.label, case.backbone, str(s.size)]
    batch = None
    try:
        batch = default_batch(case, s)
        timing_of = continual_timing if case.method == CONTINUAL else ssl_timing
        with hard_limit(2 * seconds + 20):
            t, batch, note = shrinking_batch(lambda b: timing_of(case, s, jpegs, b, seconds), batch, s.device)
    except Exception as err:  # noqa: BLE001 - one case's failure must not lose the others' rows
        free_memory(s.device)
        return [*first, str(batch or "-"), s.precision, s.device.type, *["-"] * 8, failure(err)]
    light, bare = median(t.light), median(t.bare)
    tflops = t.flops / light / 1e12
    mfu = f"{100 * tflops / s.peak_tflops:.1f}%" if s.peak_tflops else "n/a"
    if len(t.light) < s.repeats:
        note = "; ".join(filter(None, [note, f"{len(t.light)} of {s.repeats} windows (time share spent)"]))
    return [*first, str(batch), s.precision, s.device.type, fmt(batch / light), fmt(batch / bare), f"{light / bare:.3f}",
            fmt(t.light_peak, 2), fmt(t.bare_peak, 2), f"{t.flops / batch / 1e9:.2f}", f"{tflops:.3g}", mfu, note]


def methods_section(report: Report, s: Settings, only, seconds: float) -> None:
    end = time.monotonic() + seconds
    cases = method_cases(s, only)
    table = report.table("methods", Table(
        "1. Methods: selfsup's training step against a bare PyTorch loop",
        f"One fixed batch through each method's own view, on the device; selfsup: a Lightning fit of selfsup's "
        f"Trainer, bare: the same model, loss and optimizer in a plain loop. Median of up to {s.repeats} windows of "
        f"{s.steps} step{'s' if s.steps > 1 else ''} after {s.warmup} warm-up; images are dataset images per second. "
        f"FLOPs: forward + backward of one step (FlopCounterMode); "
        + (f"MFU against {s.peak_tflops:.0f} TFLOP/s." if s.peak_tflops else "no MFU without --peak-tflops."),
        METHOD_COLUMNS))
    jpegs = make_jpegs(16 if s.tiny else 64)
    for i, case in enumerate(cases):
        share = max(0.0, (end - time.monotonic()) / (len(cases) - i))
        print(f"gpu_suite: {case.label} on {case.backbone} ({share:.0f} s)", flush=True)
        if share < 1.0:
            table.rows.append([case.label, case.backbone, str(s.size), "-", s.precision, s.device.type, *["-"] * 8,
                               "skipped: the time budget is spent"])
        else:
            table.rows.append(method_row(case, s, jpegs, share))
        print("gpu_suite: " + " | ".join(table.rows[-1]), flush=True)
        report.flush()


# ---- 2. SparK: sparse vs masked ---------------------------------------------------------------
SPARK_COLUMNS = ["backbone", "measured", "px", "batch", "masked (s)", "sparse (s)", "sparse / masked",
                 "masked images/s", "sparse images/s", "masked peak GiB", "sparse peak GiB", "note"]


def spark_rows(name: str, s: Settings, batch: int, seconds: float) -> list[list[str]]:
    recipe = compose("spark", name, methods_step.method_overrides("spark", name, s.size, batch, s.precision, s.accelerator))
    args = SimpleNamespace(batch=batch, pixels=s.size, ratio=float(recipe.method.mask_ratio),
                           width=s.spark_width or int(recipe.method.decoder_width), conv_engines=["gather"])
    w = spark_sparse_vs_masked.Workload(name, args, s.device)
    steps = {"encoder fwd+bwd": w.encoder_step, "full step": w.full_step}
    rows = []
    with s.autocast():
        for what, step in steps.items():
            share = seconds * 0.8 / len(steps)
            start = time.perf_counter()
            spark_sparse_vs_masked.measure(w, step, 0, s.warmup, time.perf_counter)
            per_round = (time.perf_counter() - start) / max(1, s.warmup)
            repeats = max(1, min(s.repeats, int((share - per_round * s.warmup) / max(per_round, 1e-6))))
            times = spark_sparse_vs_masked.measure(w, step, repeats, 0, time.perf_counter)
            peaks = {}
            for variant in times:
                reset_peak(s.device)
                w.seconds(step, variant, time.perf_counter)
                peaks[variant] = peak_gib(s.device)
            masked, sparse = median(times["masked"]), median(times["sparse/gather"])
            rows.append([name, what, str(s.size), str(batch), f"{masked:.4f}", f"{sparse:.4f}", f"{sparse / masked:.2f}",
                         fmt(batch / masked), fmt(batch / sparse), fmt(peaks["masked"], 2), fmt(peaks["sparse/gather"], 2),
                         f"median of {repeats}"])
    return rows


def spark_section(report: Report, s: Settings, seconds: float) -> None:
    end = time.monotonic() + seconds
    names = s.spark_backbones
    table = report.table("spark", Table(
        "2. SparK: sparse encoder against the masked simulation",
        f"Same images, same mask (the recipe's ratio), same modules; `sparse` (visible sites only, gather engine) "
        f"against `masked` (the official encoder's dense ops then mask); {s.precision}, alternated repeat by repeat "
        f"after {s.warmup} warm-up. Peak memory: one step of each.", SPARK_COLUMNS))
    for i, name in enumerate(names):
        share = max(0.0, (end - time.monotonic()) / (len(names) - i))
        print(f"gpu_suite: spark sparse vs masked on {name} ({share:.0f} s)", flush=True)
        if share < 1.0:
            table.rows.append([name, "-", str(s.size), "-", *["-"] * 7, "skipped: the time budget is spent"])
            continue
        try:
            with hard_limit(2 * share + 20):
                rows, _, note = shrinking_batch(lambda b: spark_rows(name, s, b, share), s.spark_batch, s.device)
            for row in rows:
                row[-1] = "; ".join(filter(None, [row[-1], note]))
            table.rows += rows
        except Exception as err:  # noqa: BLE001 - one backbone's failure must not lose the others' rows
            free_memory(s.device)
            table.rows.append([name, "-", str(s.size), str(s.spark_batch), *["-"] * 7, failure(err)])
        report.flush()


# ---- 3. data ----------------------------------------------------------------------------------
DATA_COLUMNS = ["view", "gpu_augment", "augmentations run", "workers", "batch", "px", "images/s", "note"]


def data_rows(method: str, s: Settings, seconds: float) -> list[list[str]]:
    d = data_pipeline.method_setup(method, Path("/tmp"), s.data_overrides)[0].data  # the shard count follows the workers
    workers, batch, prefetch = d.num_workers, d.batch_size, d.get("prefetch_factor") or 2
    shards, _, _ = photo_dataset(s.data_images, max(16, workers))
    cfg, view = data_pipeline.method_setup(method, shards, s.data_overrides)
    warmup, timed = data_pipeline.loader_rounds(workers, prefetch, s.data_batches)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    start = time.perf_counter()
    while True:
        for mode in rates:
            it, close, dm = data_pipeline.pipeline_iter(cfg, view, mode == "on")
            rates[mode].append(data_pipeline.time_loader(
                lambda it=it, close=close: (it, close), lambda b, dm=dm: data_pipeline.finish_batch(dm, b, s.device),
                warmup, timed))
        done = len(rates["on"])
        per_repeat = (time.perf_counter() - start) / done
        if done >= s.data_repeats or time.perf_counter() - start + per_repeat > 0.8 * seconds:
            break
    where = {"off": "per image, workers", "on": "batched, GPU" if s.device.type == "cuda" else "batched, workers"}
    return [[method, mode, where[mode], str(workers), str(batch), str(cfg.data.image_size), fmt(median(r)),
             f"median of {len(r)}, {timed} batches after {warmup}"] for mode, r in rates.items()]


def data_section(report: Report, s: Settings, only, seconds: float) -> None:
    end = time.monotonic() + seconds
    methods = [m for m in s.data_methods if only is None or m in only]
    table = report.table("data", Table(
        "3. Data: the training input pipeline, gpu_augment off and on",
        f"{s.data_images} JPEGs cut from scikit-learn's photographs (benchmarks/bench_common.py) as shards -> "
        f"webdataset -> decode -> the method's view in the DataLoader workers -> the batch moved to {s.device.type} "
        f"-> the view's batch stage (with gpu_augment, the flips and colour augmentations there).", DATA_COLUMNS))
    for i, method in enumerate(methods):
        share = max(0.0, (end - time.monotonic()) / (len(methods) - i))
        print(f"gpu_suite: data pipeline of {method} ({share:.0f} s)", flush=True)
        if share < 1.0:
            table.rows.append([method, "-", "-", "-", "-", "-", "-", "skipped: the time budget is spent"])
            continue
        try:
            with hard_limit(2 * share + 20):
                table.rows += data_rows(method, s, share)
        except Exception as err:  # noqa: BLE001 - one view's failure must not lose the others' rows
            table.rows.append([method, "-", "-", "-", "-", "-", "-", failure(err)])
        report.flush()


# ---- main --------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run, imports included")
    parser.add_argument("--tiny", action="store_true", help="tiny backbones, 32 px, few steps: a check that runs on a CPU")
    parser.add_argument("--only", default=None, help="comma-separated methods (contracon included); the spark and "
                        "data sections follow (spark runs when spark is named, data for the views named)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=Path("gpu_suite.md"), help="the markdown results file")
    parser.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, auto on a CPU")
    parser.add_argument("--batch", type=int, default=None, help="every method's batch (default: its recipe's, "
                        "at most --max-batch; --tiny: 8)")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None, help="timed windows per measurement (default 5; --tiny 3)")
    parser.add_argument("--backbone", action="append", default=[], metavar="METHOD=BACKBONE")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's; --tiny: "
                        "1, which a machine shared with other jobs runs far better than 2 spinning threads)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: 989, an H200, on a GPU; none on a CPU)")
    args = parser.parse_args(argv)
    known = [*METHODS, CONTINUAL]
    args.only = [m.strip() for m in args.only.split(",") if m.strip()] if args.only else None
    for m in args.only or []:
        if m not in known:
            parser.error(f"--only {m}: not a method; choose from {', '.join(known)}")
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    for x in args.sections:
        if x not in SECTIONS:
            parser.error(f"--sections {x}: choose from {', '.join(SECTIONS)}")
    for item in args.backbone:
        if "=" not in item or item.split("=", 1)[0] not in known:
            parser.error(f"--backbone {item}: give METHOD=BACKBONE with METHOD one of {', '.join(known)}")
    return args


def main(argv=None, started: float | None = None) -> Report:
    args = parse_args(argv)
    budget = Budget(args.budget_s, STARTED if started is None else started)
    s = settings_from(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.tiny else threads))
    header = [
        f"Machine: {machine_line()}.",
        "",
        f"Command: `python benchmarks/gpu_suite.py {shlex.join(argv if argv is not None else sys.argv[1:])}`; "
        f"device {s.device.type}, {s.precision}, {'--tiny: tiny backbones, ' if s.tiny else ''}{s.size} px, "
        f"{torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() > 1 else ''}.",
    ]
    report = Report(args.out, header, budget, args.budget_s)
    try:
        report.flush()
        run_sections(report, s, args, budget)
    finally:
        torch.set_num_threads(threads)
    print(report.render(), flush=True)
    print(f"gpu_suite: written to {args.out}", flush=True)
    return report


def run_sections(report: Report, s: Settings, args, budget: Budget) -> None:
    sections = [x for x in SECTIONS if x in args.sections]
    if args.only is not None and "spark" not in args.only and "spark" in sections:
        sections.remove("spark")
    run = {"methods": lambda sec: methods_section(report, s, args.only, sec),
           "spark": lambda sec: spark_section(report, s, sec),
           "data": lambda sec: data_section(report, s, args.only, sec)}
    for i, name in enumerate(sections):
        seconds = budget.share(SECTIONS[name], sum(SECTIONS[x] for x in sections[i + 1:]) + RESERVE)
        try:
            run[name](seconds)
        except Exception as err:  # noqa: BLE001 - a section's own failure (outside its items) is reported too
            report.table(name, Table(name, failure(err), ["note"]))
        report.flush()


if __name__ == "__main__":
    main()
