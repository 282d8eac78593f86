"""`trainer.precision=auto` and NHWC weights: what the CPU recipes rely on."""

import pytest
import torch

from selfsup.core.precision import native_bf16_in_cpuinfo, resolve_precision

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: \n"
ZEN2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nbugs\t\t: avx512_bf16_is_not_a_flag_here\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"


def test_native_bf16_is_read_from_the_flags_line_only():
    assert native_bf16_in_cpuinfo(ZEN4) and native_bf16_in_cpuinfo(SAPPHIRE_RAPIDS)
    assert not native_bf16_in_cpuinfo(ZEN2)
    assert not native_bf16_in_cpuinfo("")


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed", "64-true"])
def test_explicit_precisions_pass_through(explicit):
    assert resolve_precision(explicit, "cpu") == explicit


def test_auto_on_this_cpu(monkeypatch):
    import selfsup.core.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "32-true"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto") == "32-true"


def test_config_yaml_holds_the_resolved_precision_and_resume_resolves_again(tmp_path, monkeypatch):
    """config.yaml is the config the checkpoints' config_hash describes: precision resolved, the request kept."""
    import selfsup.core.precision as core_precision
    import selfsup.launch.precision as precision
    from selfsup.core.config_hash import config_hash
    from selfsup.core.run_folder import load_run_config, write_run_config
    from selfsup.launch.config import compose
    from selfsup.launch.run_config import resolve_run

    monkeypatch.setattr(core_precision, "cpu_has_native_bf16", lambda: False)
    overrides = ["data=digits", "trainer.accelerator=cpu", f"run_dir={tmp_path}", "run_name=r"]
    cfg, run_dir, resumed = resolve_run("rotnet", "resnet_tiny", overrides, compose)
    assert cfg.trainer.precision == "auto" and not resumed
    assert precision.resolve_run_precision(cfg)
    write_run_config(run_dir, cfg)
    saved = load_run_config(run_dir)
    assert saved.trainer.precision == "32-true" and saved.precision_requested == "auto"
    assert config_hash(saved) == config_hash(cfg)  # what SSLMethod.on_save_checkpoint records
    assert not precision.resolve_run_precision(saved)  # already resolved: unchanged
    monkeypatch.setattr(core_precision, "cpu_has_native_bf16", lambda: True)  # resumed on another machine
    cfg, _, resumed = resolve_run("rotnet", "resnet_tiny", [f"resume={run_dir}"], compose)
    assert resumed and cfg.trainer.precision == "auto" and "precision_requested" not in cfg
    assert precision.resolve_run_precision(cfg) and cfg.trainer.precision == "bf16-mixed"
    cfg, _, _ = resolve_run("rotnet", "resnet_tiny", [f"resume={run_dir}", "trainer.precision=32-true"], compose)
    assert cfg.trainer.precision == "32-true" and not precision.resolve_run_precision(cfg)


def test_channels_last_training_matches_nchw_training():
    """NHWC weights change the memory layout, not the maths: the same loss and gradients."""
    from selfsup.launch.config import compose
    from selfsup.ssl.rotnet import RotNet

    results = []
    for channels_last in (False, True):
        cfg = compose("rotnet", "resnet_tiny", ["data=digits", f"backbone.channels_last={str(channels_last).lower()}"])
        torch.manual_seed(0)
        method = RotNet(cfg)
        assert method.backbone.net.conv1.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.manual_seed(1)
        out = method.pretext_step({"image": torch.randn(8, 3, 16, 16), "label": torch.zeros(8, dtype=torch.long)})
        out["loss"].backward()
        results.append((out["loss"].item(), {n: p.grad.clone() for n, p in method.backbone.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-6, msg=name)
