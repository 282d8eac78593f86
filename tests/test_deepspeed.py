"""DeepSpeed on CPU: the config we build (parsed by DeepSpeed itself), the strategy wiring, the
BatchNorm-under-bf16 fix (through DeepSpeed's own module cast), EMA teachers, and the one-line
errors where DeepSpeed cannot run (it needs CUDA). A real run needs a GPU: see docs/cluster.md."""

import copy
import types

import pytest
import torch
from torch import nn

from conftest import run_submit
from selfsup.core.errors import UserError
from selfsup.launch.config import compose
from selfsup.launch.strategies import (
    build_strategy,
    check_strategy,
    deepspeed_config,
    teacher_modules,
    TeachersInFP32,
)
from selfsup.ssl.ema import ema_update_

TINY = ["rotnet", "resnet_tiny", "data=digits", "data.batch_size=16", "data.num_workers=0"]


def _cfg(*overrides):
    return compose("rotnet", "resnet_tiny", list(overrides))


def _parsed(config: dict):
    """DeepSpeed's own parse of our dict (Lightning adds gradient_accumulation_steps itself)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig({**config, "gradient_accumulation_steps": 1})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_from_our_config(stage):
    cfg = _cfg(f"strategy=deepspeed_stage_{stage}", "trainer.precision=bf16-mixed", "optim.clip_grad=1.5",
               "data.batch_size=48")
    config = deepspeed_config(cfg)
    assert config["zero_optimization"]["stage"] == stage
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["gradient_clipping"] == 1.5
    assert config["train_micro_batch_size_per_gpu"] == 48
    assert "gradient_accumulation_steps" not in config  # Lightning sets it from accumulate_grad_batches
    assert "offload_optimizer" not in config["zero_optimization"] and "data_types" not in config
    parsed = _parsed(config)
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled and parsed.gradient_clipping == 1.5
    assert parsed.train_micro_batch_size_per_gpu == 48


def test_deepspeed_config_fp32_fp16_offload_and_extra():
    plain = deepspeed_config(_cfg("strategy=deepspeed_stage_2"))
    assert "bf16" not in plain and "fp16" not in plain and plain["gradient_clipping"] == 0.0
    fp16 = deepspeed_config(_cfg("strategy=deepspeed_stage_2", "trainer.precision=16-mixed"))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    offload = deepspeed_config(_cfg("strategy=deepspeed_stage_3", "strategy.offload_optimizer=true",
                                    "strategy.offload_parameters=true"))
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert _parsed(offload).zero_config.offload_optimizer.device == "cpu"
    extra = deepspeed_config(_cfg("strategy=deepspeed_stage_2", "strategy.extra={zero_optimization: {reduce_bucket_size: 500}}"))
    assert extra["zero_optimization"]["reduce_bucket_size"] == 500 and extra["zero_optimization"]["stage"] == 2
    with pytest.raises(UserError, match="stage 3"):
        deepspeed_config(_cfg("strategy=deepspeed_stage_2", "strategy.offload_parameters=true"))


def _deepspeed_cast(module: nn.Module, config: dict) -> None:
    """DeepSpeed's own cast of a module at engine start (params to bf16; buffers per data_types)."""
    from deepspeed.runtime.config import DtypeEnum
    from deepspeed.runtime.engine import DeepSpeedEngine

    parsed = _parsed(config)
    buffer_dtype = DtypeEnum(parsed.buffer_dtype).value if parsed.buffer_dtype else None
    DeepSpeedEngine._cast_module_mixed_precision(types.SimpleNamespace(module=module), torch.bfloat16, buffer_dtype, False)


def test_batchnorm_under_deepspeed_bf16_runs_with_our_config():
    """The GPU failure "Expected running_mean to have type BFloat16 but got Float", reproduced with
    DeepSpeed's own cast on CPU, and fixed by the config we build for BatchNorm models."""
    from selfsup.backbones import create_backbone
    from selfsup.launch.strategies import has_batchnorm

    cfg = _cfg("strategy=deepspeed_stage_2", "trainer.precision=bf16-mixed")
    net = create_backbone("resnet_tiny")
    assert has_batchnorm(net)
    x = torch.randn(4, 3, 32, 32).bfloat16()

    broken = copy.deepcopy(net).train()
    _deepspeed_cast(broken, deepspeed_config(cfg, batchnorm=False))
    with pytest.raises(RuntimeError, match="(?i)bfloat16|float"):
        broken(x)

    fixed = copy.deepcopy(net).train()
    config = deepspeed_config(cfg, batchnorm=True)
    assert config["data_types"] == {"buffer_dtype": "bf16"}
    _deepspeed_cast(fixed, config)
    out = fixed(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_strategy_wiring_builds_lightning_deepspeed_strategy():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from selfsup.ssl import method_class

    cfg = _cfg("strategy=deepspeed_stage_2", "trainer.precision=bf16-mixed", "optim.clip_grad=2.0")
    module = method_class("rotnet")(cfg, num_classes=10)
    strategy = build_strategy(cfg, module)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config == deepspeed_config(cfg, batchnorm=True)
    assert strategy.config["zero_optimization"]["stage"] == 2 and strategy.config["gradient_clipping"] == 2.0

    from selfsup.launch.train import build_trainer

    trainer = build_trainer(cfg, __import__("pathlib").Path("/tmp/unused"), module=module)
    assert isinstance(trainer.strategy, DeepSpeedStrategy)
    assert any(type(c).__name__ == "_TeachersInFP32" for c in trainer.callbacks)


def test_deepspeed_on_cpu_is_a_one_line_error_before_anything_runs(tmp_path):
    proc = run_submit("pretrain", *TINY, "strategy=deepspeed_stage_2", f"run_dir={tmp_path}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "needs CUDA" in proc.stderr and "strategy=ddp" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was written
    # and on Slurm without GPUs: refused before submitting (no controller needed)
    proc = run_submit("pretrain", *TINY, "strategy=deepspeed_stage_1", "cluster=slurm", f"run_dir={tmp_path}", "--dry-run")
    assert proc.returncode == 2 and "gpus_per_node" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="trainer.accelerator=cpu"):
        check_strategy(_cfg("strategy=deepspeed_stage_3", "trainer.accelerator=cpu"))
    check_strategy(_cfg("strategy=deepspeed_stage_2", "cluster=slurm", "gpus_per_node=8"), submit_to_slurm=True)


class _WithTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)


def test_teachers_are_found_and_refused_under_zero3():
    model = _WithTeacher()
    assert teacher_modules(model) == [model.teacher]
    model.teachers = lambda: [(model.teacher, model.student)]  # a method declares its (student, teacher) pairs
    assert teacher_modules(model) == [model.student]
    with pytest.raises(UserError, match="ZeRO-3"):
        build_strategy(_cfg("strategy=deepspeed_stage_3"), _WithTeacher())


def test_ema_update_accumulates_in_fp32_from_a_bf16_student():
    """An EMA kept in bf16 stops moving at momentum 0.996; ours (teacher in fp32) does not."""
    student = nn.Linear(8, 8).bfloat16()
    with torch.no_grad():
        student.weight.fill_(1.0078125)  # one bf16 step above 1.0
        student.bias.fill_(1.0078125)
    teacher_fp32 = nn.Linear(8, 8)
    teacher_bf16 = nn.Linear(8, 8).bfloat16()
    for t in (teacher_fp32, teacher_bf16):
        with torch.no_grad():
            t.weight.fill_(1.0)
            t.bias.fill_(1.0)
    for _ in range(100):
        ema_update_(teacher_fp32, student, 0.996)
        ema_update_(teacher_bf16, student, 0.996)
    assert torch.all(teacher_bf16.weight == 1.0)  # stuck: every update rounds away
    expected = 1.0 + 0.0078125 * (1 - 0.996 ** 100)
    assert torch.allclose(teacher_fp32.weight, torch.full_like(teacher_fp32.weight, expected), atol=1e-6)


def test_teachers_back_to_fp32_after_deepspeed_cast():
    """What TeachersInFP32 does after DeepSpeed's set-up: teachers fp32 again, bf16 inputs accepted."""
    model = _WithTeacher()
    model.bfloat16()  # what DeepSpeed's engine does to every parameter
    callback = TeachersInFP32()
    trainer = types.SimpleNamespace(strategy=type("DeepSpeedStrategy", (), {})())
    callback.on_fit_start(trainer, model)
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.student.parameters())
    out = model.teacher(torch.randn(3, 4).bfloat16())
    assert out.dtype == torch.float32
    callback.on_fit_end(trainer, model)
    with pytest.raises(RuntimeError):
        model.teacher(torch.randn(3, 4).bfloat16())  # the hook is gone
