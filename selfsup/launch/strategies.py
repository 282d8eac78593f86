"""`strategy=` -> a Lightning strategy: `auto`, `ddp`, `deepspeed_stage_1|2|3`, `fsdp`.

DeepSpeed
---------
`deepspeed_config(cfg)` is a pure function from our config to DeepSpeed's config dict: ZeRO stage,
bf16 (fp16) when `trainer.precision` is bf16-mixed (16-mixed), `gradient_clipping` from
`optim.clip_grad`, optional CPU offload (`strategy.offload_optimizer`, `strategy.offload_parameters`
for stage 3) and `strategy.extra` merged on top. `train_micro_batch_size_per_gpu` is the per-GPU
batch; `gradient_accumulation_steps` is left to Lightning (from trainer.accumulate_grad_batches).
Lightning's DeepSpeed strategy runs only on CUDA GPUs: `check_strategy` says so in one line before
anything is built or submitted.

BatchNorm under DeepSpeed bf16. DeepSpeed (0.19) casts the parameters to bf16 but keeps the buffers
in fp32, so a BatchNorm layer meets bf16 weights and fp32 running statistics and fails in the first
forward ("Expected running_mean to have type BFloat16 but got Float"). For models with BatchNorm the
config asks DeepSpeed to cast the buffers too (`data_types.buffer_dtype = bf16`): BN then runs in
bf16 throughout, with bf16 running statistics (about 3 significant digits; fine for the running
means and variances of a pretraining run). The alternative, plain DDP with `trainer.precision=
bf16-mixed` (autocast; BN in fp32), is what we recommend for ResNets, which are small enough for DDP.

EMA teachers and several optimizers
-----------------------------------
Methods keep one optimizer (several parameter groups, each with its own LR / weight decay, as
ssl/base.py builds them): DeepSpeed drives exactly one optimizer, and Lightning refuses more.
A method declares its EMA teachers with `teachers() -> [(student, teacher), ...]`; a teacher's
parameters have `requires_grad=False` (so it is in no optimizer group: DeepSpeed's engine never steps
it), the base updates it once per optimizer step with `selfsup.ssl.ema.ema_update_` under
`torch.no_grad()`, and it is saved with the module's state_dict. Under DDP nothing more is needed
(every rank applies the same update to identical weights). Under DeepSpeed two things are wrong
without care, and `TeachersInFP32` fixes them:
- bf16: DeepSpeed casts every parameter to bf16, teachers included, and an EMA with momentum 0.996
  kept in bf16 (8 mantissa bits) stops moving: each step's change (0.4 % of the difference) rounds
  away. `TeachersInFP32` casts the teachers back to fp32 right after DeepSpeed's set-up (before a
  checkpoint is restored into them) and casts their floating inputs to fp32 with a forward pre-hook;
  `ema_update_` accumulates in the teacher's dtype (fp32) from the bf16 student.
- ZeRO-3 (and FSDP full sharding) partition every parameter, teachers included, so an element-wise
  EMA would see empty shards: methods with EMA teachers are refused there (use stage 1 or 2: the
  optimizer states are what ZeRO saves most on at these model sizes).
`teacher_modules(module)` lists the teachers of `module.teachers()`; for a module without that
method, every sub-module whose parameters all have requires_grad=False counts as one.
"""

from __future__ import annotations

import copy
import logging

from omegaconf import DictConfig, OmegaConf

from selfsup.core.errors import UserError

log = logging.getLogger(__name__)

CUDA_ONLY = ("deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp")


def is_deepspeed(cfg: DictConfig) -> bool:
    return str(cfg.strategy.name).startswith("deepspeed")


def check_strategy(cfg: DictConfig, *, submit_to_slurm: bool = False) -> None:
    """A one-line UserError for a strategy that cannot run where the job will run."""
    name = cfg.strategy.name
    if name not in CUDA_ONLY:
        return
    why = (f"strategy={name} needs CUDA GPUs (Lightning's "
           f"{'DeepSpeed' if is_deepspeed(cfg) else 'FSDP'} strategy runs only on CUDA)")
    if submit_to_slurm:
        if not int(cfg.cluster.get("gpus_per_node") or 0):
            raise UserError(f"{why}: set gpus_per_node=N (on CPUs use strategy=ddp)")
        return
    if cfg.trainer.accelerator == "cpu":
        raise UserError(f"{why}, but trainer.accelerator=cpu (on CPUs use strategy=ddp)")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{why}; this machine has none (on CPUs use strategy=ddp)")


def sync_batchnorm(cfg: DictConfig) -> bool:
    """`strategy.sync_batchnorm` (or a method's `method.sync_batchnorm`): BatchNorm statistics over the
    global batch. GPUs only: torch's DDP refuses SyncBatchNorm on CPU, so there it is off (one line)."""
    wanted = bool(cfg.strategy.get("sync_batchnorm", False) or cfg.method.get("sync_batchnorm", False))
    if not wanted:
        return False
    accelerator = str(cfg.trainer.accelerator)
    if accelerator == "cpu" or accelerator == "auto" and not _cuda_available():
        print("selfsup: SyncBatchNorm needs GPUs (torch's DDP refuses it on CPU): BatchNorm statistics stay per rank",
              flush=True)
        return False
    return True


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg: DictConfig, *, batchnorm: bool = False) -> dict:
    """DeepSpeed's config dict for this run (pure: no torch, no DeepSpeed)."""
    s = cfg.strategy
    stage = int(s.stage)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"strategy.stage={stage}: ZeRO stages are 0, 1, 2 and 3")
    zero: dict = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_scatter": True,
        "allgather_partitions": True,
        "allgather_bucket_size": 200_000_000,
        "reduce_bucket_size": 200_000_000,
    }
    if s.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.get("offload_parameters"):
        if stage != 3:
            raise UserError(f"strategy.offload_parameters=true needs ZeRO stage 3 (strategy=deepspeed_stage_3), not {stage}")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # timm's optimizers (AdamW, LAMB, LARS) are client optimizers
        "train_micro_batch_size_per_gpu": int(cfg.data.batch_size),
        "gradient_clipping": float(cfg.optim.clip_grad or 0.0),
    }
    precision = str(cfg.trainer.precision)
    half = None
    if precision.startswith("bf16"):
        config["bf16"] = {"enabled": True}
        half = "bf16"
    elif precision.startswith("16"):
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
        half = "fp16"
    if half and batchnorm:
        config["data_types"] = {"buffer_dtype": half}  # BN running stats in the parameters' dtype
    extra = s.get("extra")
    if extra:
        config = _deep_merge(config, OmegaConf.to_container(extra, resolve=True))
    if "gradient_accumulation_steps" in config:
        raise UserError("strategy.extra: leave gradient_accumulation_steps out (set trainer.accumulate_grad_batches)")
    return config


def has_batchnorm(module) -> bool:
    from torch import nn

    return module is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def teacher_modules(module) -> list:
    """The method's EMA teachers: the teachers of `module.teachers()` (student, teacher pairs) if it
    defines it, else every maximal sub-module whose parameters all have requires_grad=False."""
    if module is None:
        return []
    if callable(getattr(module, "teachers", None)):
        return [teacher for _, teacher in module.teachers()]
    found, inside = [], set()
    for name, sub in module.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        params = list(sub.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append(sub)
            inside.add(name)
    return found


def _block_classes() -> set:
    """timm's repeated blocks: the FSDP wrapping units."""
    classes = set()
    for path, names in (("timm.models.resnet", ("BasicBlock", "Bottleneck")),
                        ("timm.models.convnext", ("ConvNeXtBlock",)),
                        ("timm.models.vision_transformer", ("Block",))):
        try:
            mod = __import__(path, fromlist=list(names))
        except ImportError:
            continue
        classes |= {getattr(mod, n) for n in names if hasattr(mod, n)}
    return classes


def build_strategy(cfg: DictConfig, module=None):
    name = cfg.strategy.name
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=cfg.strategy.get("find_unused_parameters", False),
                           static_graph=cfg.strategy.get("static_graph", False))
    if is_deepspeed(cfg):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        teachers = teacher_modules(module)
        if int(cfg.strategy.stage) == 3 and teachers:
            raise UserError(f"strategy={name}: ZeRO-3 partitions every parameter, the EMA teacher's too "
                            "(use strategy=deepspeed_stage_2 for methods with EMA teachers)")
        batchnorm = has_batchnorm(module)
        if batchnorm and str(cfg.trainer.precision).startswith(("bf16", "16")):
            print(f"selfsup: DeepSpeed {cfg.trainer.precision} with BatchNorm: BN runs in half precision with half-"
                  "precision running statistics (for BN in fp32 use strategy=ddp, which autocasts)", flush=True)
        return DeepSpeedStrategy(config=deepspeed_config(cfg, batchnorm=batchnorm))
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        s = cfg.strategy
        if teacher_modules(module) and s.sharding_strategy != "NO_SHARD":
            raise UserError("strategy=fsdp shards every parameter, the EMA teacher's too "
                            "(use strategy=ddp or deepspeed_stage_2 for methods with EMA teachers)")
        return FSDPStrategy(sharding_strategy=s.sharding_strategy, cpu_offload=bool(s.cpu_offload),
                            auto_wrap_policy=_block_classes() or None)
    raise UserError(f"unknown strategy {name!r} (auto, ddp, deepspeed_stage_1/2/3, fsdp)")


def strategy_callbacks(cfg: DictConfig) -> list:
    return [TeachersInFP32()] if is_deepspeed(cfg) else []


def _fp32_inputs(module, args, kwargs):
    import torch

    def cast(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32 else x

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


_TEACHERS_CALLBACK = None


def TeachersInFP32():  # noqa: N802 - a class, defined on first use (no Lightning import at CLI start-up)
    """Under DeepSpeed half precision: EMA teachers back to fp32 after DeepSpeed's set-up (which cast
    them) and before a checkpoint is restored into them; their floating inputs cast to fp32."""
    global _TEACHERS_CALLBACK
    if _TEACHERS_CALLBACK is None:
        import lightning.pytorch as pl

        class _TeachersInFP32(pl.Callback):
            __doc__ = TeachersInFP32.__doc__

            def __init__(self):
                self._hooks = []
                self.teachers = []

            def on_fit_start(self, trainer, pl_module) -> None:
                if type(trainer.strategy).__name__ != "DeepSpeedStrategy":
                    return
                for teacher in teacher_modules(pl_module):
                    teacher.float()
                    self._hooks.append(teacher.register_forward_pre_hook(_fp32_inputs, with_kwargs=True))
                    self.teachers.append(teacher)

            def on_fit_end(self, trainer, pl_module) -> None:
                for hook in self._hooks:
                    hook.remove()
                self._hooks = []

        _TEACHERS_CALLBACK = _TeachersInFP32
    return _TEACHERS_CALLBACK()
