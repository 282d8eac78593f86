"""The continual job: tasks in order in one process; after each task its state is checkpointed
(atomically) together with the metrics so far; a rerun resumes at the first task not finished.

Per task, a Lightning fit with manual optimisation (two optimisers, as in ConTraCon's code): AdamW with cosine
warm restarts (stepped per epoch) for every trainable tensor but the classifier, plain constant-LR SGD
for the classifier; label-smoothing cross-entropy over the task's own classes. The task's weights at
its best validation check (a split carved from its train split) are kept.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, RandomSampler

from selfsup.backbones import create_backbone
from selfsup.continual import metrics as M
from selfsup.continual.config import check_settings, task_id_rules
from selfsup.continual.data import ArrayDataset, TaskArrays, TaskStream, normalise, train_transform
from selfsup.continual.model import ContinualTransformer
from selfsup.continual.taskid import class_gaussian, classify_all_tasks, mahalanobis_distance, make_views
from selfsup.core.atomic import write_atomic, write_text_atomic
from selfsup.core.config_hash import config_hash
from selfsup.core.errors import UserError
from selfsup.ssl.callbacks import RunProgressBar

CHECKPOINT = "continual.pt"


# ---- the model -------------------------------------------------------------------------------
def init_export(cfg: DictConfig) -> tuple[dict | None, dict]:
    """(weights, metadata) of the export that task 1 starts from (continual.init), or (None, {})."""
    if not cfg.continual.init:
        return None, {}
    from selfsup.export import load_export

    return load_export(cfg.continual.init)


def backbone_kwargs(cfg: DictConfig, meta: dict) -> dict:
    """The backbone's constructor arguments: the config's backbone.kwargs over the export's."""
    return {**json.loads(meta.get("backbone_kwargs", "{}")), **OmegaConf.to_container(cfg.backbone.kwargs, resolve=True)}


def build_model(cfg: DictConfig) -> ContinualTransformer:
    init = cfg.continual.init
    weights, meta = init_export(cfg)
    kwargs = backbone_kwargs(cfg, meta)
    backbone = create_backbone(cfg.backbone.name, **kwargs)
    if weights is not None:
        if meta["timm_name"] != backbone.timm_name:
            raise UserError(f"init={init}: an export of {meta['timm_name']} cannot start a {backbone.timm_name} ({cfg.backbone.name})")
        try:
            backbone.net.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise UserError(f"init={init}: the weights do not fit {cfg.backbone.name} with {kwargs}: {str(err).splitlines()[0]}") from None
        print(f"selfsup: task 1 starts from {init} ({meta.get('method', '?')}, step {meta.get('global_step', '?')})")
    return ContinualTransformer(backbone, kernel_size=cfg.continual.kernel_size)


# ---- training one task ------------------------------------------------------------------------
class TaskModule(pl.LightningModule):
    def __init__(self, model: ContinualTransformer, task: int, cfg: DictConfig, steps_per_epoch: int):
        super().__init__()
        self.model = model
        self.task = task
        self.c = cfg.continual
        self.steps_per_epoch = steps_per_epoch
        self.automatic_optimization = False
        self.best_acc = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self._correct = self._seen = self._batches = 0

    def configure_optimizers(self):
        trainable = self.model.train_only(self.task)
        head = list(self.model.tasks[self.task].head.parameters())
        head_ids = {id(p) for p in head}
        rest = [p for p in trainable if id(p) not in head_ids]
        lr = self.c.first_task_lr if (self.task == 0 and self.c.first_task_lr) else self.c.lr
        adamw = torch.optim.AdamW(rest, lr=lr, weight_decay=self.c.weight_decay)
        sgd = torch.optim.SGD(head, lr=self.c.head_lr, momentum=self.c.head_momentum)
        restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(adamw, T_0=max(1, task_epochs(self.c, self.task) // 2),
                                                                        eta_min=self.c.min_lr)
        return [adamw, sgd], [restarts]

    def training_step(self, batch, batch_idx):
        x, y = batch
        adamw, sgd = self.optimizers()
        self._batches += 1
        if self.c.warmup_steps and self._batches <= self.c.warmup_steps:  # linear warm-up of AdamW's LR
            for group in adamw.param_groups:
                group["lr"] = group["initial_lr"] * self._batches / self.c.warmup_steps
        logits = self.model(x, self.task)
        loss = F.cross_entropy(logits, y, label_smoothing=self.c.label_smoothing)
        adamw.zero_grad(set_to_none=True)
        sgd.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        adamw.step()
        sgd.step()
        acc = (logits.argmax(-1) == y).float().mean()
        tag = f"task{self.task + 1}"
        self.log_dict({f"{tag}/train_loss": loss.detach(), f"{tag}/train_acc": acc, f"{tag}/lr": adamw.param_groups[0]["lr"]},
                      prog_bar=False, batch_size=len(y))
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=len(y))
        return loss

    def on_train_epoch_end(self):
        self.lr_schedulers().step()

    def on_validation_epoch_start(self):
        self._correct = self._seen = 0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._correct += int((self.model(x, self.task).argmax(-1) == y).sum())
        self._seen += len(y)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking or not self._seen:
            return
        acc = self._correct / self._seen
        self.log(f"task{self.task + 1}/val_acc", acc, prog_bar=True)
        if acc > self.best_acc:  # keep the weights of the best check (ties: the earlier one)
            self.best_acc = acc
            self.best_state = {k: v.detach().clone() for k, v in self._trained().items()}

    def _trained(self) -> dict[str, torch.Tensor]:
        prefixes = [f"tasks.{self.task}."] + (["backbone."] if self.task == 0 else [])
        return {k: v for k, v in self.model.state_dict().items() if k.startswith(tuple(prefixes))}

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state, strict=False)


def task_epochs(c, task: int) -> int:
    return int(c.first_task_epochs) if task == 0 and c.first_task_epochs else int(c.epochs)


def task_time_limit(c, task: int, tasks: int) -> dict | None:
    """`continual.train_minutes` (a budget for the training of all tasks) shared in proportion to the
    tasks' epochs; None: no limit (each task runs its epochs)."""
    if not c.get("train_minutes"):
        return None
    weights = [task_epochs(c, t) for t in range(tasks)]
    return {"seconds": 60.0 * c.train_minutes * weights[task] / sum(weights)}


def task_trainer(cfg: DictConfig, task: int, stream_tasks: int, steps: int, logger, callbacks=()) -> pl.Trainer:
    """The Trainer of one task of `steps` batches per epoch (benchmarks/gpu_suite.py times its steps)."""
    c = cfg.continual
    checks = max(1, int(c.val_checks_per_epoch))
    progress = [RunProgressBar(f"task {task + 1}/{stream_tasks}")] if cfg.trainer.enable_progress_bar else []
    return pl.Trainer(
        max_epochs=task_epochs(c, task), max_time=task_time_limit(c, task, stream_tasks), accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision,
        logger=logger, enable_checkpointing=False, num_sanity_val_steps=0, enable_model_summary=False,
        enable_progress_bar=cfg.trainer.enable_progress_bar, callbacks=[*progress, *callbacks], log_every_n_steps=cfg.trainer.log_every_n_steps,
        val_check_interval=(1.0 if checks == 1 else max(1, steps // checks)), default_root_dir=str(logger.root_dir),
    )


def train_task(model: ContinualTransformer, task: int, train: TaskArrays, val: TaskArrays, cfg: DictConfig,
               logger, stream_tasks: int = 1) -> dict:
    c, d = cfg.continual, cfg.data
    pl.seed_everything(cfg.seed + 1000 * task, workers=True, verbose=False)
    per_epoch = min(c.samples_per_epoch or len(train), len(train))
    sampler = RandomSampler(range(len(train)), replacement=False, num_samples=per_epoch)
    loader = DataLoader(ArrayDataset(train, train_transform(c.augment, d.image_size, d.mean, d.std)),
                        batch_size=d.batch_size, sampler=sampler, num_workers=d.num_workers, drop_last=len(train) > d.batch_size,
                        persistent_workers=d.num_workers > 0)
    val = val.take(c.val_samples, seed=c.val_seed)
    val_loader = DataLoader(ArrayDataset(val, normalise(d.mean, d.std)), batch_size=cfg.eval.batch_size)
    steps = len(loader)
    module = TaskModule(model, task, cfg, steps)
    trainer = task_trainer(cfg, task, stream_tasks, steps, logger)
    model.train()  # (Lightning keeps the modes it finds; evaluation left the model in eval mode)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader)
    if trainer.interrupted:
        raise KeyboardInterrupt
    planned = task_epochs(c, task) * steps
    if module._batches < planned:  # stopped by the time budget: validate the last weights too
        print(f"selfsup: task {task + 1}: time budget reached after {module._batches}/{planned} steps", flush=True)
        trainer.validate(module, val_loader, verbose=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    module.restore_best()
    for p in model.parameters():
        p.requires_grad_(False)
    images = module._batches * d.batch_size
    return {"val_acc": module.best_acc, "train_seconds": seconds, "train_cpu_seconds": cpu, "train_images": images,
            "images_per_second": images / max(seconds, 1e-9), "steps": module._batches}


# ---- task statistics and evaluation ----------------------------------------------------------
@torch.no_grad()
def pooled_features(model: ContinualTransformer, images: torch.Tensor, task: int, cfg: DictConfig) -> torch.Tensor:
    norm = normalise(cfg.data.mean, cfg.data.std)
    device = next(model.parameters()).device
    bs = cfg.eval.batch_size
    return torch.cat([model.pooled(norm(images[i:i + bs]).to(device), task).float().cpu() for i in range(0, len(images), bs)])


@torch.no_grad()
def fit_task_gaussian(model: ContinualTransformer, task: int, train: TaskArrays, cfg: DictConfig) -> None:
    """Once task `task` is trained: the Gaussian of its network's pooled features on (a fixed subset
    of) its own clean training images, kept in its state for task identification."""
    c = cfg.continual
    model.eval()
    sample = train.take(c.gaussian_samples, seed=c.val_seed)
    state = model.tasks[task]
    means, precision = class_gaussian(pooled_features(model, sample.images, task, cfg), sample.labels,
                                      state.num_classes, c.gaussian_shrinkage)
    state.class_means.copy_(means)
    state.feature_precision.copy_(precision)


@torch.no_grad()
def entropy_cil(model: ContinualTransformer, sub: TaskArrays, j: int, upto: int, cfg: DictConfig) -> tuple[int, int]:
    """(right task, right task and class) over `sub`, test images of task j: ConTraCon's rule."""
    e, d = cfg.eval, cfg.data
    device = next(model.parameters()).device
    views = e.clean_views + e.augmented_views
    per_batch = max(1, e.batch_size // views)
    right_task = right_both = 0
    for i in range(0, len(sub), per_batch):
        imgs = sub.images[i:i + per_batch]
        x = make_views(imgs, d.mean, d.std, e.clean_views, e.augmented_views,
                       generator_seed=e.seed * 1_000_003 + 7919 * j + i).to(device)
        task_ids, pred, _, _ = classify_all_tasks(model, x, upto + 1, e.clean_views)
        ok_task = task_ids.cpu() == j
        right_task += int(ok_task.sum())
        right_both += int((ok_task & (pred.cpu() == sub.labels[i:i + per_batch])).sum())
    return right_task, right_both


@torch.no_grad()
def mahalanobis_cil(model: ContinualTransformer, sub: TaskArrays, upto: int, cfg: DictConfig, j: int) -> tuple[int, int]:
    """(right task, right task and class) over `sub`: every task's network scores the clean image by
    the distance of its pooled features to its own Gaussian; the nearest task classifies."""
    device = next(model.parameters()).device
    distances, preds = [], []
    for t in range(upto + 1):
        state = model.tasks[t]
        z = pooled_features(model, sub.images, t, cfg)
        distances.append(mahalanobis_distance(z, state.class_means.cpu(), state.feature_precision.cpu()))
        preds.append(state.head(z.to(device)).argmax(-1).cpu())
    task_ids = torch.stack(distances).argmin(dim=0)
    pred = torch.stack(preds).gather(0, task_ids[None]).squeeze(0)
    ok_task = task_ids == j
    return int(ok_task.sum()), int((ok_task & (pred == sub.labels)).sum())


@torch.no_grad()
def evaluate(model: ContinualTransformer, stream: TaskStream, upto: int, cfg: DictConfig) -> dict:
    """After task `upto`: task-incremental accuracy on every task seen (the task given), and for each
    task-identification rule, class-incremental accuracy + task-identification accuracy."""
    e, d = cfg.eval, cfg.data
    model.eval()
    device = next(model.parameters()).device
    norm = normalise(d.mean, d.std)
    out: dict = {"til": [], "til_samples": []}
    for j in range(upto + 1):
        test = stream.test(j).take(e.test_samples_per_task, seed=e.seed)
        correct = 0
        for i in range(0, len(test), e.batch_size):
            x = norm(test.images[i:i + e.batch_size]).to(device)
            correct += int((model(x, j).argmax(-1).cpu() == test.labels[i:i + e.batch_size]).sum())
        out["til"].append(correct / len(test))
        out["til_samples"].append(len(test))
        for rule in task_id_rules(cfg):
            suffix = "" if rule == "entropy" else f"_{rule}"
            if rule == "entropy":
                sub = stream.test(j).take(e.cil_samples_per_task, seed=e.seed + 1)
                right_task, right_both = entropy_cil(model, sub, j, upto, cfg)
            else:
                sub = stream.test(j).take(e.density_samples_per_task, seed=e.seed + 1)
                right_task, right_both = mahalanobis_cil(model, sub, upto, cfg, j)
            out.setdefault(f"cil{suffix}", []).append(right_both / len(sub))
            out.setdefault(f"task_id{suffix}", []).append(right_task / len(sub))
            out.setdefault(f"cil{suffix}_samples", []).append(len(sub))
    return out


# ---- checkpoints -------------------------------------------------------------------------------
def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def checkpoint_dict(model, cfg, stream: TaskStream, rows: list[dict], steps: int) -> dict:
    b = model.backbone
    return {
        "state_dict": model.state_dict(),  # backbone.net.* (task 0, frozen) + tasks.<t>.* (per task)
        "tasks_done": len(rows),
        "task_classes": stream.task_classes,
        "task_sizes": [model.tasks[t].num_classes for t in range(len(rows))],
        "results": rows,
        "global_step": steps,
        "selfsup": {"method": cfg.method.name, "backbone": b.name,
                    "backbone_kwargs": OmegaConf.to_container(cfg.backbone.kwargs, resolve=True),
                    "timm_name": b.timm_name, "timm_kwargs": b.timm_kwargs, "config_hash": config_hash(cfg)},
    }


# ---- the job --------------------------------------------------------------------------------
def check_continual(cfg: DictConfig) -> None:
    """What can be checked before the run folder is made, cheapest first: numbers, the task-
    identification rules, the augmentations, the backbone against the image size, and the task
    split of the data's classes."""
    from selfsup.backbones.meta import meta_backbone

    check_settings(cfg)
    train_transform(cfg.continual.augment, cfg.data.image_size, cfg.data.mean, cfg.data.std)
    _, meta = init_export(cfg)
    meta_backbone(cfg, backbone_kwargs(cfg, meta)).check_image_size(int(cfg.data.image_size))
    TaskStream(cfg)  # last: the first use of a built-in dataset writes its shards


def run_continual(cfg: DictConfig, run_dir: str | Path) -> dict:
    from lightning.pytorch.loggers import TensorBoardLogger

    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / CHECKPOINT
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    task_id_rules(cfg)  # a bad rule fails now, not after the first task has trained
    stream = TaskStream(cfg)
    model = build_model(cfg)
    rows: list[dict] = []
    steps = 0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["task_classes"] != stream.task_classes:
            raise UserError(f"{ckpt_path}: its tasks {ckpt['task_classes']} differ from this config's {stream.task_classes}")
        for size in ckpt["task_sizes"]:
            model.add_task(size)
        model.load_state_dict(ckpt["state_dict"], strict=True)
        rows, steps = list(ckpt["results"]), int(ckpt["global_step"])
        if len(rows) < stream.tasks:
            print(f"selfsup: resuming at task {len(rows) + 1}/{stream.tasks} (tasks 1-{len(rows)} restored from {ckpt_path})", flush=True)
    for p in model.parameters():
        p.requires_grad_(False)
    logger = TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False)
    names = stream.class_names
    for task in range(len(rows), stream.tasks):
        classes = stream.task_classes[task]
        print(f"selfsup: task {task + 1}/{stream.tasks}: classes {', '.join(f'{c} ({names[c]})' for c in classes)}", flush=True)
        write_text_atomic(run_dir / "progress.json", json.dumps({"task": task + 1, "state": "training", "time": time.time()}) + "\n")
        train, val = stream.train_val(task)
        model.add_task(len(classes))
        info = train_task(model, task, train, val, cfg, logger, stream.tasks)
        if task == 0:
            model.finish_first_task()
        fit_task_gaussian(model, task, train, cfg)
        steps += info["steps"]
        row = {"task": task + 1, "params": model.task_parameters(task) if task else sum(
            p.numel() for p in model.backbone.parameters()) + model.task_parameters(0), **info}
        start, cpu_start = time.perf_counter(), time.process_time()
        row.update(evaluate(model, stream, task, cfg))
        row.update(eval_seconds=time.perf_counter() - start, eval_cpu_seconds=time.process_time() - cpu_start)
        rows.append(row)
        checkpoint = checkpoint_dict(model, cfg, stream, rows, steps)
        write_atomic(ckpt_path, lambda temporary: torch.save(checkpoint, temporary))
        summary = M.summarise(rows, stream.task_classes)
        write_text_atomic(run_dir / "metrics.json", json.dumps(summary, indent=1) + "\n")
        log_task(logger, summary, row, task)
        print(f"selfsup: task {task + 1} done: best validation accuracy {100 * info['val_acc']:.1f}%, "
              f"{info['images_per_second']:.0f} train images/s, checkpoint {ckpt_path}", flush=True)
        print(M.table(summary), flush=True)
    write_text_atomic(run_dir / "progress.json", json.dumps({"task": len(rows), "state": "done", "time": time.time()}) + "\n")
    summary = M.summarise(rows, stream.task_classes)
    return {"summary": summary, "run_dir": str(run_dir), "skipped_samples": stream.skipped}


def log_task(logger, summary: dict, row: dict, task: int) -> None:
    tb = logger.experiment
    step = task + 1
    for key, title in M.MATRICES.items():
        avg = summary[f"average_{key}"][task]
        if avg is not None:
            tb.add_scalar(f"continual/average_{key}", avg, step)
        if row.get(key):
            for j, v in enumerate(row[key]):
                tb.add_scalar(f"continual/{key}/task{j + 1}", v, step)
            picture = M.matrix_picture(summary[key], title)
            tb.add_image(f"continual/{key}_matrix", picture, step, dataformats="HWC")
    for key in M.FORGETTING:
        if summary[f"forgetting_{key}"][task] is not None:
            tb.add_scalar(f"continual/forgetting_{key}", summary[f"forgetting_{key}"][task], step)
    tb.add_scalar("continual/params_added", row["params"], step)
    tb.flush()


