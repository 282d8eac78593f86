"""selfsup.export: checkpoints (fake, real Lightning, DeepSpeed ZeRO layout) -> safetensors that load
strictly into timm (and torchvision for ResNets), Hugging Face hub folders that
`timm.create_model("local-dir:...", pretrained=True)` loads, and one-line errors for bad sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import selfsup.backbones.small  # noqa: F401  (timm must know the selfsup_* names to rebuild them here)
from selfsup import export
from selfsup.backbones import backbone_names, create_backbone
from selfsup.core.errors import UserError
from selfsup.launch.cli import main

CONVNET_INPUT_PX = 64  # small inputs keep the big convnets fast; weights do not depend on input size


def selfsup_metadata(backbone, method="testmethod", config_hash="cafe1234", backbone_kwargs=None, config=None) -> dict:
    meta = {
        "method": method,
        "backbone": backbone.name,
        "backbone_kwargs": dict(backbone_kwargs or {}),
        "timm_name": backbone.timm_name,
        "timm_kwargs": dict(backbone.timm_kwargs),
        "config_hash": config_hash,
    }
    if config is not None:  # what a method records: the run's whole config
        meta["config"] = config
    return meta


def run_config(mean: float, std: float, image_size: int = 32) -> dict:
    """The parts of a run's config that an hf export reads."""
    return {"data": {"name": "digits", "train": None, "image_size": image_size, "batch_size": 16,
                     "mean": [mean] * 3, "std": [std] * 3},
            "trainer": {"devices": 1, "num_nodes": 1}}


def fake_checkpoint(backbone, global_step=7, **meta) -> dict:
    """A checkpoint in the contract's format: backbone under `backbone.net.`, plus a method head
    that must not be exported."""
    state_dict = OrderedDict((f"backbone.net.{k}", v) for k, v in backbone.net.state_dict().items())
    state_dict["head.weight"] = torch.randn(3, backbone.num_features)
    state_dict["head.bias"] = torch.zeros(3)
    return {
        "epoch": 0,
        "global_step": global_step,
        "pytorch-lightning_version": L.__version__,
        "state_dict": state_dict,
        "selfsup": selfsup_metadata(backbone, **meta),
    }


def save_fake_checkpoint(backbone, path: Path, **kwargs) -> Path:
    torch.save(fake_checkpoint(backbone, **kwargs), path)
    return path


def input_batch(backbone, batch=1) -> torch.Tensor:
    if backbone.family == "vit":  # a ViT (or CCT) takes the image size it was built for
        embed = getattr(backbone.net, "patch_embed", None)
        height, width = embed.img_size if embed is not None else (backbone.net.img_size,) * 2
    else:
        height = width = CONVNET_INPUT_PX
    return torch.randn(batch, 3, height, width)


def assert_same_outputs(model: nn.Module, backbone, x: torch.Tensor) -> None:
    model.eval()
    backbone.eval()
    with torch.no_grad():
        diff = (model(x) - backbone(x)).abs().max().item()
    assert diff < 1e-5, diff


def assert_one_line_user_error(excinfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------------------------------------
# every registered backbone -> timm


@pytest.mark.parametrize("name", backbone_names())
def test_every_backbone_exports_to_timm_strictly(name, tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    checkpoint = save_fake_checkpoint(backbone, tmp_path / "model.ckpt")

    out = export.export_backbone(checkpoint, tmp_path / f"{name}.safetensors")

    weights, metadata = export.load_export(out)
    assert set(weights) == set(backbone.net.state_dict())  # timm's names, and no head
    with torch.device("meta"):  # skips a random init that the load overwrites (seconds for the big ones)
        model = timm.create_model(
            metadata["timm_name"], pretrained=False, num_classes=0, **json.loads(metadata["timm_kwargs"])
        )
    model.load_state_dict(weights, strict=True, assign=True)  # a tensor left on meta would fail the forward
    if any(t.is_meta for t in model.buffers()):  # non-persistent buffers (CCT's sinusoidal positions) need a real build
        model = timm.create_model(metadata["timm_name"], pretrained=False, num_classes=0,
                                  **json.loads(metadata["timm_kwargs"]))
        model.load_state_dict(weights, strict=True)
    assert_same_outputs(model, backbone, input_batch(backbone))


# ---------------------------------------------------------------------------------------------
# torchvision format


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnet_keys_are_torchvision_keys(name):
    timm_keys = set(timm.create_model(name, pretrained=False, num_classes=0).state_dict())
    torchvision_keys = set(getattr(torchvision.models, name)().state_dict())
    assert torchvision_keys - timm_keys == {"fc.weight", "fc.bias"}
    assert timm_keys <= torchvision_keys


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_export_loads_with_only_fc_missing(name, tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    checkpoint = save_fake_checkpoint(backbone, tmp_path / "model.ckpt")

    out = export.export_backbone(checkpoint, tmp_path / "tv.safetensors", fmt="torchvision")

    weights, metadata = export.load_export(out)
    assert metadata["format"] == "torchvision"
    model = getattr(torchvision.models, name)()
    assert export.load_into_torchvision(model, weights) == ["fc.bias", "fc.weight"]
    model.fc = nn.Identity()
    assert_same_outputs(model, backbone, input_batch(backbone))
    assert_same_outputs(export.create_timm_model_from_export(out), backbone, input_batch(backbone))


@pytest.mark.parametrize("name", ["convnext_tiny_test", "vit_tiny_test", "resnet_tiny"])
def test_torchvision_format_refuses_other_networks(name, tmp_path):
    checkpoint = save_fake_checkpoint(create_backbone(name), tmp_path / "model.ckpt")
    with pytest.raises(UserError) as excinfo:
        export.export_backbone(checkpoint, tmp_path / "tv.safetensors", fmt="torchvision")
    assert_one_line_user_error(excinfo, "torchvision")
    assert not (tmp_path / "tv.safetensors").exists()


def test_torchvision_format_refuses_a_resnet_of_another_shape(tmp_path):
    checkpoint = save_fake_checkpoint(create_backbone("resnet18", in_chans=1), tmp_path / "model.ckpt")
    with pytest.raises(UserError) as excinfo:
        export.export_backbone(checkpoint, tmp_path / "tv.safetensors", fmt="torchvision")
    assert_one_line_user_error(excinfo, "wrong shape", "conv1.weight")


def test_load_into_torchvision_refuses_anything_but_a_missing_classifier():
    weights = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    del weights["layer4.1.bn2.bias"]
    with pytest.raises(UserError) as excinfo:
        export.load_into_torchvision(torchvision.models.resnet18(), weights)
    assert_one_line_user_error(excinfo, "1 missing", "layer4.1.bn2.bias")


# ---------------------------------------------------------------------------------------------
# metadata, selection of the backbone's keys, writing


def test_metadata_round_trips(tmp_path):
    overrides = {"img_size": 48, "patch_size": 8}
    backbone = create_backbone("vit_tiny_test", **overrides).eval()
    checkpoint = save_fake_checkpoint(
        backbone, tmp_path / "model.ckpt", global_step=1234, method="rotnet", config_hash="0123abcd",
        backbone_kwargs=overrides,
    )

    out = export.export_backbone(checkpoint, tmp_path / "vit.safetensors")

    _, metadata = export.load_export(out)
    assert metadata == {
        "method": "rotnet",
        "backbone": "vit_tiny_test",
        "backbone_kwargs": json.dumps(overrides, sort_keys=True),
        "timm_name": "vit_tiny_patch16_224",
        "timm_kwargs": json.dumps(backbone.timm_kwargs, sort_keys=True),
        "global_step": "1234",
        "config_hash": "0123abcd",
        "format": "timm",
    }
    assert json.loads(metadata["timm_kwargs"])["img_size"] == 48
    model = export.create_timm_model_from_export(out)  # rebuilt from the metadata alone
    assert_same_outputs(model, backbone, input_batch(backbone))


@pytest.mark.long
def test_a_fresh_interpreter_loads_exports_of_selfsup_networks(tmp_path):
    """A user's fresh interpreter has imported neither selfsup.backbones.small nor .cct:
    create_timm_model_from_export registers both itself, and an hf folder's model card says what to
    import. One subprocess checks the ResNet and CCT files and the CCT folder's card, run as written
    on a 32 px image (so timm's resize is the identity and only the normalisation acts)."""
    from PIL import Image

    checks, expected = [], {}
    for name in ("resnet_tiny", "cct_tiny_test"):
        torch.manual_seed(0)
        backbone = create_backbone(name).eval()
        checkpoint = save_fake_checkpoint(backbone, tmp_path / f"{name}.ckpt")
        out = export.export_backbone(checkpoint, tmp_path / f"{name}.safetensors")
        x = input_batch(backbone)
        with torch.no_grad():
            expected[name] = (x, backbone(x))
        checks.append(f"model = create_timm_model_from_export({str(out)!r}).eval()\n"
                      f"x, want = expected[{name!r}]\n"
                      "assert (model(x) - want).abs().max() < 1e-5\n")
    folder = export.export_hf(save_fake_checkpoint(backbone, tmp_path / "run.ckpt", config=run_config(0.4, 0.2)),
                              tmp_path / "hf")
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    image.save(tmp_path / "image.png")
    pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        expected["card"] = backbone((pixels - 0.4) / 0.2)
    torch.save(expected, tmp_path / "expected.pt")
    card = (folder / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    assert "import selfsup.backbones.cct" in snippet
    script = (
        "import sys, torch\n"
        "from PIL import Image\n"
        "from selfsup.export import create_timm_model_from_export\n"
        "assert not {'selfsup.backbones.small', 'selfsup.backbones.cct'} & set(sys.modules)\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad():\n"
        + "".join("".join(f"    {line}\n" for line in check.splitlines()) for check in checks)
        + f"image = Image.open({str(tmp_path / 'image.png')!r}).convert('RGB')\n"
        "torch.set_grad_enabled(False)\n"
        + snippet
        + "assert (features - expected['card']).abs().max() < 1e-4, (features - expected['card']).abs().max()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])


def test_create_timm_model_names_what_does_not_fit(tmp_path):
    backbone = create_backbone("resnet_tiny")
    out = export.export_backbone(save_fake_checkpoint(backbone, tmp_path / "m.ckpt"), tmp_path / "m.safetensors")
    weights, metadata = export.load_export(out)
    del weights["conv1.weight"]
    from safetensors.torch import save_file

    save_file(weights, tmp_path / "broken.safetensors", metadata=metadata)
    with pytest.raises(UserError) as excinfo:
        export.create_timm_model_from_export(tmp_path / "broken.safetensors")
    assert_one_line_user_error(excinfo, "1 missing", "conv1.weight")


def test_backbone_keys_lose_wrapper_prefixes_and_heads_are_dropped():
    tensor = torch.zeros(1)
    checkpoint = {
        "state_dict": {
            "backbone.net.conv1.weight": tensor,
            "_forward_module.backbone.net.bn1.weight": tensor,
            "module._forward_module.backbone.net.fc.bias": tensor,
            "head.weight": tensor,
            "module.projector.0.weight": tensor,
            "teacher.backbone.net.conv1.weight": tensor,
        }
    }
    assert set(export.backbone_state_dict(checkpoint)) == {"conv1.weight", "bn1.weight", "fc.bias"}


def test_a_checkpoint_without_backbone_weights_is_a_user_error():
    with pytest.raises(UserError) as excinfo:
        export.backbone_state_dict({"state_dict": {"head.weight": torch.zeros(1)}})
    assert_one_line_user_error(excinfo, "backbone.net.")


def test_export_replaces_the_file_atomically(tmp_path, monkeypatch):
    backbone = create_backbone("resnet_tiny")
    checkpoint = save_fake_checkpoint(backbone, tmp_path / "m.ckpt")
    out = export.export_backbone(checkpoint, tmp_path / "out" / "m.safetensors")
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.safetensors"]  # no temporary left
    before = out.read_bytes()

    def fail_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        export.export_backbone(checkpoint, out)
    assert out.read_bytes() == before  # the old export is intact
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.safetensors"]


def test_tied_weights_export(tmp_path):
    """Two names for one tensor (tied weights) survive torch.save; safetensors refuses shared memory."""
    checkpoint = fake_checkpoint(create_backbone("resnet_tiny"))
    state_dict = checkpoint["state_dict"]
    state_dict["backbone.net.bn1.bias"] = state_dict["backbone.net.bn1.weight"]
    torch.save(checkpoint, tmp_path / "tied.ckpt")
    weights, _ = export.load_export(export.export_backbone(tmp_path / "tied.ckpt", tmp_path / "tied.safetensors"))
    assert torch.equal(weights["bn1.bias"], state_dict["backbone.net.bn1.weight"])


def test_an_unknown_format_or_output_name_is_a_user_error(tmp_path):
    checkpoint = save_fake_checkpoint(create_backbone("resnet_tiny"), tmp_path / "m.ckpt")
    with pytest.raises(UserError) as excinfo:
        export.export_backbone(checkpoint, tmp_path / "m.safetensors", fmt="onnx")
    assert_one_line_user_error(excinfo, "onnx", "timm")
    with pytest.raises(UserError) as excinfo:
        export.export_backbone(checkpoint, tmp_path / "m.pt")
    assert_one_line_user_error(excinfo, "m.pt", ".safetensors")


# ---------------------------------------------------------------------------------------------
# bad sources: one-line UserErrors naming the path


def test_a_truncated_checkpoint_is_a_user_error(tmp_path):
    whole = save_fake_checkpoint(create_backbone("resnet_tiny"), tmp_path / "whole.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError) as excinfo:
        export.load_checkpoint(truncated)
    assert_one_line_user_error(excinfo, str(truncated), "truncated")


def test_a_text_file_is_a_user_error(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("these are not weights\nsecond line\n")
    with pytest.raises(UserError) as excinfo:
        export.load_checkpoint(text)
    assert_one_line_user_error(excinfo, str(text), "not a PyTorch checkpoint")


def test_a_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as excinfo:
        export.export_backbone(tmp_path / "runs" / "nope", tmp_path / "m.safetensors")
    assert_one_line_user_error(excinfo, str(tmp_path / "runs" / "nope"), "no such file")


def test_an_empty_file_is_a_user_error(tmp_path):
    (tmp_path / "empty.ckpt").touch()
    with pytest.raises(UserError) as excinfo:
        export.load_checkpoint(tmp_path / "empty.ckpt")
    assert_one_line_user_error(excinfo, "empty")


def test_a_checkpoint_without_selfsup_metadata_is_a_user_error(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"backbone.net.conv1.weight": torch.zeros(1)}, "global_step": 3}, path)
    with pytest.raises(UserError) as excinfo:
        export.load_checkpoint(path)
    assert_one_line_user_error(excinfo, str(path), "selfsup metadata")


def test_a_checkpoint_with_incomplete_selfsup_metadata_is_a_user_error(tmp_path):
    checkpoint = fake_checkpoint(create_backbone("resnet_tiny"))
    del checkpoint["selfsup"]["timm_name"]
    torch.save(checkpoint, tmp_path / "m.ckpt")
    with pytest.raises(UserError) as excinfo:
        export.load_checkpoint(tmp_path / "m.ckpt")
    assert_one_line_user_error(excinfo, "timm_name")


class NotAllowlisted:
    pass


def test_a_checkpoint_holding_arbitrary_objects_is_refused_in_one_line(tmp_path):
    checkpoint = fake_checkpoint(create_backbone("resnet_tiny"))
    checkpoint["hyper_parameters"] = {"thing": NotAllowlisted()}
    torch.save(checkpoint, tmp_path / "m.ckpt")
    with pytest.raises(UserError) as excinfo:
        export.load_checkpoint(tmp_path / "m.ckpt")
    assert_one_line_user_error(excinfo, "NotAllowlisted", "weights_only")


def test_omegaconf_hyperparameters_and_paths_load_weights_only(tmp_path):
    from omegaconf import OmegaConf

    checkpoint = fake_checkpoint(create_backbone("resnet_tiny"))
    checkpoint["hyper_parameters"] = OmegaConf.create({"lr": 0.1, "data": {"root": "/d", "sizes": [32, 64]}, "x": None})
    checkpoint["data_root"] = Path("/data/shards")
    torch.save(checkpoint, tmp_path / "m.ckpt")
    loaded = export.load_checkpoint(tmp_path / "m.ckpt")
    assert loaded["hyper_parameters"].data.sizes == [32, 64]
    assert loaded["data_root"] == Path("/data/shards")


def test_a_folder_that_is_no_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UserError) as excinfo:
        export.load_checkpoint(tmp_path / "photos")
    assert_one_line_user_error(excinfo, str(tmp_path / "photos"), "run folder", "DeepSpeed")


def test_a_folder_with_a_latest_file_but_no_zero_shards_is_a_user_error(tmp_path):
    folder = tmp_path / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    with pytest.raises(UserError) as excinfo:
        export.load_checkpoint(folder)
    assert_one_line_user_error(excinfo, str(folder), "not a readable DeepSpeed ZeRO checkpoint")


# ---------------------------------------------------------------------------------------------
# a real Lightning checkpoint


class TinyMethod(L.LightningModule):
    """The shape of a selfsup method as far as export cares: `self.backbone` plus a head."""

    def __init__(self):
        super().__init__()
        self.backbone = create_backbone("resnet_tiny")
        self.head = nn.Linear(self.backbone.num_features, 4)

    def training_step(self, batch, batch_idx):
        (images,) = batch
        return self.head(self.backbone(images)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        images = torch.randn(8, 3, 16, 16)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["selfsup"] = selfsup_metadata(self.backbone, method="tiny")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(the trained TinyMethod, its run folder): two real Lightning steps, the checkpoint at
    checkpoints/last.ckpt. The checkpoint records no config: the run folder's config.yaml holds it."""
    from omegaconf import OmegaConf

    from selfsup.core.run_folder import write_run_config

    torch.manual_seed(0)
    method = TinyMethod()
    root = tmp_path_factory.mktemp("tiny")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    trainer.fit(method)
    run = root / "runs" / "tiny-resnet_tiny"
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    write_run_config(run, OmegaConf.create(run_config(0.25, 0.5)))
    return method, run


def test_a_real_lightning_checkpoint_exports_to_timm(tiny_run, tmp_path, monkeypatch):
    method, run = tiny_run

    load_calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        load_calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    out = export.export_backbone(run, tmp_path / "tiny.safetensors")  # a run folder as the source
    monkeypatch.undo()

    assert load_calls == [True]
    weights, metadata = export.load_export(out)
    assert metadata["global_step"] == "2" and metadata["method"] == "tiny"
    assert not any(key.startswith("head") for key in weights)
    model = timm.create_model("selfsup_resnet_tiny", pretrained=False, num_classes=0)
    model.load_state_dict(weights, strict=True)
    for key, tensor in method.backbone.net.state_dict().items():  # the trained weights, not an init
        assert torch.equal(weights[key], tensor), key
    assert_same_outputs(model, method.backbone, torch.randn(2, 3, 16, 16))


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO checkpoints
#
# Lightning's DeepSpeed strategy needs CUDA, so these tests write a ZeRO stage-2 folder by hand in the
# layout that deepspeed's zero_to_fp32 reads: `latest` names the tag ("checkpoint", as Lightning
# uses), `<tag>/mp_rank_00_model_states.pt` holds the module (in bf16, as training keeps it), buffer
# names, parameter shapes per optimizer group and Lightning's client state, and one
# `<tag>/*_optim_states.pt` per data-parallel rank holds that rank's slice of each group's flat fp32
# master weights.


def write_zero2_checkpoint(folder: Path, module: nn.Module, client_state: dict, world_size: int = 2) -> None:
    tag = folder / "checkpoint"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    named = list(module.named_parameters())
    groups = [[(n, p) for n, p in named if p.ndim > 1], [(n, p) for n, p in named if p.ndim <= 1]]
    buffer_names = [name for name, _ in module.named_buffers()]
    model_states = {
        "module": {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in module.state_dict().items()},
        "buffer_names": buffer_names,
        "param_shapes": [OrderedDict((n, p.shape) for n, p in group) for group in groups],
        "frozen_param_shapes": None,
        "shared_params": {},
        "ds_version": "0.19.8",
        **client_state,
    }
    torch.save(model_states, tag / "mp_rank_00_model_states.pt")
    slices = [_rank_slices(group, world_size) for group in groups]  # [group][rank]
    for rank in range(world_size):
        optimizer_state = {
            "zero_stage": 2,
            "partition_count": [world_size] * len(groups),
            "single_partition_of_fp32_groups": [group_slices[rank] for group_slices in slices],
        }
        torch.save({"optimizer_state_dict": optimizer_state}, tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


def _rank_slices(group, world_size: int) -> list[torch.Tensor]:
    flat = torch.cat([p.detach().float().flatten() for _, p in group])
    padded_length = -(-flat.numel() // (2 * world_size)) * (2 * world_size)  # ZeRO-2 aligns to 2 * world size
    flat = torch.cat([flat, flat.new_zeros(padded_length - flat.numel())])
    return list(flat.chunk(world_size))


def test_a_zero_checkpoint_folder_exports_the_fp32_master_weights(tmp_path):
    torch.manual_seed(0)
    method = TinyMethod()
    for buffer in method.backbone.net.buffers():  # running statistics that differ from their init
        if buffer.is_floating_point():
            buffer.uniform_(0.5, 1.5)
    client_state = {"epoch": 1, "global_step": 5, "pytorch-lightning_version": L.__version__,
                    "selfsup": selfsup_metadata(method.backbone, method="tiny")}
    run = tmp_path / "runs" / "tiny-ds"
    write_zero2_checkpoint(run / "checkpoints" / "last.ckpt", method, client_state)

    out = export.export_backbone(run, tmp_path / "ds.safetensors")

    weights, metadata = export.load_export(out)
    assert metadata["global_step"] == "5"
    expected = method.backbone.net.state_dict()
    assert set(weights) == set(expected)
    for key, tensor in expected.items():  # parameters exact: from the fp32 groups, not the bf16 module
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(weights[key], tensor, atol=1e-2, rtol=1e-2)  # saved in bf16
        else:
            assert torch.equal(weights[key], tensor), key
    model = export.create_timm_model_from_export(out)  # loads strictly
    assert torch.equal(model.state_dict()["layer4.0.conv2.weight"], expected["layer4.0.conv2.weight"])

    zero_folder = run / "checkpoints" / "last.ckpt"  # the ZeRO folder itself is a source too
    direct, _ = export.load_export(export.export_backbone(zero_folder, tmp_path / "direct.safetensors"))
    assert all(torch.equal(direct[key], weights[key]) for key in weights)


# ---------------------------------------------------------------------------------------------
# Hugging Face hub folders (--format hf)


def hf_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_test", "resnet_tiny", "convnet4", "cct_tiny_test"])
def test_an_hf_folder_loads_with_local_dir_alone(name, tmp_path):
    """timm's ResNet and ViT, and selfsup's own networks (registered with timm by their modules,
    imported at the top of this file): `pretrained=True` and the folder are all timm needs."""
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    checkpoint = save_fake_checkpoint(backbone, tmp_path / "m.ckpt", global_step=5, config=run_config(0.3, 0.4))

    folder = export.export_hf(checkpoint, tmp_path / "hf")

    assert hf_files(folder) == ["README.md", "config.json", "model.safetensors"]
    assert hf_files(tmp_path) == ["hf", "m.ckpt"]  # no temporary folder left beside it
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    loaded = model.state_dict()
    for key, tensor in backbone.net.state_dict().items():  # the weights, not timm's random init
        assert torch.equal(loaded[key], tensor), key
    assert_same_outputs(model, backbone, input_batch(backbone))
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == backbone.timm_name and config["num_classes"] == 0
    assert config["model_args"] == json.loads(json.dumps(backbone.timm_kwargs))
    data_config = timm.data.resolve_model_data_config(model)  # what timm's transforms will do
    assert tuple(data_config["input_size"]) == (3, 32, 32)
    assert data_config["mean"] == [0.3] * 3 and data_config["std"] == [0.4] * 3
    assert data_config["crop_pct"] == 1.0 and data_config["interpolation"] == "bilinear"
    _, metadata = export.load_export(folder / "model.safetensors")  # the weights file is a selfsup export too
    assert metadata["format"] == "hf" and metadata["global_step"] == "5"


def test_an_hf_folder_takes_a_new_classifier(tmp_path):
    backbone = create_backbone("vit_tiny_test").eval()
    folder = export.export_hf(save_fake_checkpoint(backbone, tmp_path / "m.ckpt", config=run_config(0.5, 0.5)),
                              tmp_path / "hf")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=7).eval()
    assert model(input_batch(backbone, batch=2)).shape == (2, 7)
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], backbone.net.state_dict()["blocks.1.mlp.fc2.weight"])


def write_probe_result(run: Path, global_step: int) -> dict:
    """probe.json as `submit probe` writes it: the classification target's record (scored here on
    separable random features: the features of a real probe take too long for this test)."""
    from selfsup.eval.probe import probe_config
    from selfsup.eval.targets import get_target

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 4
    split = {}
    for name, n in (("train", 120), ("test", 60)):
        labels = torch.arange(n) % 3
        split[name] = {"all": (centres[labels] + torch.randn(n, 8, generator=generator), labels)}
    cfg = probe_config(["data=digits"], None)
    record = get_target("classification").evaluate(split, cfg)
    record.update({"eval_target": "classification", "target": str(run), "global_step": global_step,
                   "data": {"name": "digits"}, "probe": {}})
    (run / "probe.json").write_text(json.dumps(record, indent=1))
    return record


def test_submit_export_hf_of_a_real_run_writes_a_model_card(tiny_run, tmp_path, capsys):
    method, run = tiny_run
    record = write_probe_result(run, global_step=2)
    out = tmp_path / "tiny-hf"

    assert main(["export", str(run), "--format", "hf", "-o", str(out)]) == 0

    assert "local-dir:" in capsys.readouterr().out
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert_same_outputs(model, method.backbone, torch.randn(2, 3, 16, 16))  # the trained weights
    pretrained_cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert pretrained_cfg["mean"] == [0.25] * 3 and pretrained_cfg["std"] == [0.5] * 3  # from config.yaml
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert "# resnet_tiny pretrained with tiny" in card
    assert "| steps trained | 2 " in card and "| data | `digits` |" in card
    assert f"{record['linear']['top1']:.2f}" in card and f"{record['knn']['top1']:.2f}" in card
    assert "probe of the run at step 2, data=digits" in card
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in card
    assert "import selfsup.backbones.small" in card


def test_an_hf_export_of_a_checkpoint_file_reads_its_run_folder(tiny_run, tmp_path):
    method, run = tiny_run
    folder = export.export_hf(run / "checkpoints" / "last.ckpt", tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["pretrained_cfg"]["std"] == [0.5] * 3


def test_an_hf_export_needs_the_run_config(tmp_path):
    loose = save_fake_checkpoint(create_backbone("resnet_tiny"), tmp_path / "loose.ckpt")  # records no config
    with pytest.raises(UserError) as excinfo:
        export.export_hf(loose, tmp_path / "hf")
    assert_one_line_user_error(excinfo, str(loose), "image size and normalisation", "run folder")
    assert not (tmp_path / "hf").exists()


def test_an_hf_export_refuses_a_network_timm_cannot_build(tmp_path):
    backbone = create_backbone("resnet_tiny")
    checkpoint = fake_checkpoint(backbone, config=run_config(0.5, 0.5))
    checkpoint["selfsup"]["timm_name"] = "selfsup_not_a_network"
    torch.save(checkpoint, tmp_path / "m.ckpt")
    with pytest.raises(UserError) as excinfo:
        export.export_hf(tmp_path / "m.ckpt", tmp_path / "hf")
    assert_one_line_user_error(excinfo, "selfsup_not_a_network", "resnet_tiny", "cct_tiny_test", "vit_tiny_test")


class PlainNet(nn.Module):
    def __init__(self, num_classes=0, **_):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.num_features = 4


@timm.models.register_model
def plain_net_without_pretrained_cfg(pretrained=False, **kwargs):
    """A network timm builds without build_model_with_cfg, so it never loads pretrained weights."""
    return PlainNet(**kwargs)


def test_an_hf_export_refuses_a_network_that_ignores_pretrained(tmp_path):
    backbone = create_backbone("resnet_tiny")
    checkpoint = fake_checkpoint(backbone, config=run_config(0.5, 0.5))
    checkpoint["selfsup"]["timm_name"] = "plain_net_without_pretrained_cfg"
    checkpoint["state_dict"] = {f"backbone.net.{k}": v for k, v in PlainNet().state_dict().items()}
    torch.save(checkpoint, tmp_path / "m.ckpt")
    with pytest.raises(UserError) as excinfo:
        export.export_hf(tmp_path / "m.ckpt", tmp_path / "hf")
    assert_one_line_user_error(excinfo, "plain_net_without_pretrained_cfg", "pretrained config", "--format timm")


def submit_refused(capsys, *args) -> str:
    code = main(["export", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_submit_export_refusals_are_one_line(tmp_path, capsys):
    checkpoint = save_fake_checkpoint(create_backbone("resnet_tiny"), tmp_path / "m.ckpt", config=run_config(0.5, 0.5))
    line = submit_refused(capsys, checkpoint, "--format", "onnx", "-o", tmp_path / "x")
    assert "'onnx'" in line and "hf, timm, torchvision" in line
    assert "without .safetensors" in submit_refused(capsys, checkpoint, "--format", "hf", "-o", tmp_path / "x.safetensors")
    (tmp_path / "run").mkdir()  # a folder without a checkpoint
    line = submit_refused(capsys, tmp_path / "run", "--format", "hf", "-o", tmp_path / "out")
    assert str(tmp_path / "run") in line and "checkpoints/last.ckpt" in line
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    line = submit_refused(capsys, checkpoint, "--format", "hf", "-o", taken)
    assert str(taken) in line and "--force" in line
    assert hf_files(taken) == ["notes.txt"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()

    assert main(["export", str(checkpoint), "--format", "hf", "-o", str(taken), "--force"]) == 0
    assert hf_files(taken) == ["README.md", "config.json", "model.safetensors"]
    (tmp_path / "empty").mkdir()  # an empty folder needs no --force
    assert main(["export", str(checkpoint), "--format", "hf", "-o", str(tmp_path / "empty")]) == 0


def test_an_hf_folder_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    checkpoint = save_fake_checkpoint(create_backbone("resnet_tiny"), tmp_path / "m.ckpt", config=run_config(0.5, 0.5))
    folder = export.export_hf(checkpoint, tmp_path / "out" / "hf")
    before = {name: (folder / name).read_bytes() for name in hf_files(folder)}

    def fail_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        export.export_hf(checkpoint, folder, force=True)
    with pytest.raises(OSError, match="disk full"):
        export.export_hf(checkpoint, tmp_path / "out" / "new")
    assert {name: (folder / name).read_bytes() for name in hf_files(folder)} == before  # the old folder, intact
    assert hf_files(tmp_path / "out") == ["hf"]  # no new folder, no temporary one
