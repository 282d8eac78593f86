"""SiT v1 as a method: the recipes, one step of the module, a real run (TensorBoard, checkpoint), the
export of the plain ViT into timm, one step of the vit_b recipe, one-line errors, and that it learns."""

import itertools
import json

import pytest
import timm
import torch
import yaml

from conftest import image_tags, read_scalars, run_submit
from selfsup import export
from selfsup.core.errors import UserError
from selfsup.launch.config import compose
from selfsup.ssl import METHODS, method_class
from selfsup.ssl.sit.loss import TASKS


def tiny(*overrides, backbone="vit_tiny_test"):
    cfg = compose("sit", backbone, ["method.online_probe=false", *overrides])
    return method_class("sit")(cfg)


def two_view_batch(b=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"view1": torch.randn(b, 3, size, size, generator=g), "view2": torch.randn(b, 3, size, size, generator=g),
            "label": torch.full((b,), -1)}


# ---- recipes -----------------------------------------------------------------------------------


def test_vit_b_dry_run_shows_the_official_recipe(tmp_path):
    proc = run_submit("pretrain", "sit", "vit_b", f"run_dir={tmp_path}", "--dry-run", check=True)
    cfg = yaml.safe_load(proc.stdout)
    assert not any(tmp_path.iterdir())
    assert cfg["backbone"] == {"name": "vit_b", "kwargs": {"drop_path_rate": 0.1}, "channels_last": False}
    m = cfg["method"]
    assert (m["version"], m["export_token"], m["contrastive_dim"], m["temperature"], m["uncertainty_init"]) == (
        "v1", "contrastive", 512, 0.5, 1.0)
    assert m["corruption"] == {"noise_budget": 0.3, "replace_budget": 0.3, "min_frac": 0.05, "max_block_frac": 0.25,
                               "max_kernel": 15, "sigma_range": [0.1, 5.1]}
    assert m["views"] == {"crop_scale": [0.08, 1.0], "color_jitter": 0.4, "interpolation": "bicubic"}
    assert (cfg["data"]["image_size"], cfg["data"]["batch_size"]) == (224, 72)
    o = cfg["optim"]
    assert (o["name"], o["lr"], o["scale_lr"], o["base_batch"], o["betas"], o["eps"], o["weight_decay"]) == (
        "adamw", 5e-4, True, 512, [0.9, 0.999], 1e-8, 0.05)
    assert (o["warmup_epochs"], o["warmup_start_ratio"], o["min_lr_ratio"], o["clip_grad"]) == (5, 0.002, 0.02, None)
    assert cfg["trainer"]["max_epochs"] == 501 and cfg["trainer"]["precision"] == "auto"


def test_vit_b_recipe_builds_v1_shapes():
    cfg = compose("sit", "vit_b", ["data=/tmp/unused-shards/x.tar"])
    module = method_class("sit")(cfg)
    net = module.backbone.net
    assert net.pos_embed.shape == (1, 197, 768) and module.sit_token.shape == (1, 1, 768)  # 196 + 2 positions in all
    assert net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # linear drop-path up to 0.1
    assert net.norm.eps == 1e-6 and net.blocks[0].attn.qkv.bias is not None
    assert module.rotation_head.out_features == 4 and module.contrastive_head.out_features == 512
    deconv = module.reconstruction_head.deconv
    assert (deconv.in_channels, deconv.out_channels, deconv.kernel_size, deconv.stride) == (768, 3, (16, 16), (16, 16))
    assert module.uncertainty.tolist() == [1.0, 1.0, 1.0]


def test_vit_t_cpu_recipe_is_32px_patch_4():
    cfg = compose("sit", "vit_t", [])
    assert dict(cfg.backbone.kwargs) == {"drop_path_rate": 0.0, "img_size": 32, "patch_size": 4}
    assert cfg.data.image_size == 32 and cfg.trainer.precision == "auto"
    module = method_class("sit")(cfg)
    tokens = module.encode(torch.randn(2, 3, 32, 32))
    assert tokens["reconstruction"].shape == (2, 3, 32, 32) and tokens["exported_token"].shape == (2, 192)


def test_demo_data_keeps_each_recipes_resolution():
    # no data given: a backbone's own `demo:` applies after the demo data's 32 px
    assert compose("sit", "vit_b", []).data.image_size == 224
    assert compose("sit", "vit_s", []).data.image_size == 224
    assert compose("sit", "vit_t", []).data.image_size == 32
    assert compose("sit", "vit_b", ["data=/tmp/unused-shards/x.tar"]).data.image_size == 224
    # data named explicitly: its 32 px against a ViT built for 224 is a one-line error before training
    with pytest.raises(UserError, match=r"data.image_size=32 but vit_b is built for 224 px"):
        method_class("sit")(compose("sit", "vit_b", ["data=fashion_mnist"]))


def test_sit_accepts_only_vits():
    assert METHODS["sit"].families == ("vit",)
    with pytest.raises(UserError, match="sit does not accept resnet_tiny"):
        compose("sit", "resnet_tiny", [])


# ---- the module --------------------------------------------------------------------------------


def test_one_step_shapes_terms_and_gradients_everywhere():
    torch.manual_seed(0)
    module = tiny()
    out = module.pretext_step(two_view_batch(b=6))
    terms = out["terms"]
    assert set(TASKS) <= set(terms)
    assert terms["contrastive"].item() == pytest.approx(torch.log(torch.tensor(11.0)).item(), abs=0.05)  # ~ln(2B - 1)
    assert terms["rotation"].item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.1)
    assert out["features"].shape == (6, 32)
    assert out["pictures"]["reconstruction"].shape == out["pictures"]["clean"].shape == (6, 3, 32, 32)
    assert terms["factor_rotation"].item() == pytest.approx(0.3679, abs=1e-4)
    assert terms["factor_reconstruction"].item() == pytest.approx(0.6065, abs=1e-4)
    expected = sum(terms[f"factor_{t}"] * terms[t] + 0.5 * terms[f"s_{t}"] for t in TASKS)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss"].backward()
    missing = [n for n, p in module.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert missing == []  # the extra token, CLS, every head and the three s_t all learn
    # d/ds_t = -a_t e^{-a_t s_t} L_t + 1/2
    for i, (task, a) in enumerate(zip(TASKS, (1.0, 1.0, 0.5), strict=True)):
        want = -a * terms[f"factor_{task}"].item() * terms[task].item() + 0.5
        assert module.uncertainty.grad[i].item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_a_short_last_batch_and_class_labels_are_not_used():
    module = tiny().eval()
    batch = two_view_batch(b=3)
    torch.manual_seed(1)
    a = module.pretext_step(batch)
    torch.manual_seed(1)
    b = module.pretext_step({**batch, "label": torch.tensor([0, 1, 2])})
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["pictures"]["corrupted"], b["pictures"]["corrupted"])


def test_the_loss_sees_corrupted_inputs_and_clean_targets():
    module = tiny().eval()
    batch = two_view_batch(b=4)
    torch.manual_seed(2)
    out = module.pretext_step(batch)["pictures"]
    from selfsup.ssl.sit.corruption import rotate_v1

    assert torch.equal(out["clean"], rotate_v1(batch["view1"], out["rotation"]))  # the clean rotated view
    assert not torch.equal(out["corrupted"], out["clean"])
    recon = module.encode(out["corrupted"])["reconstruction"]
    assert torch.allclose(recon, out["reconstruction"], atol=1e-5)  # reconstructed from the corrupted input


@pytest.mark.parametrize("export_token", ["contrastive", "rotation"])
def test_export_token_picks_which_sit_token_is_timms_cls(export_token):
    module = tiny(f"method.export_token={export_token}").eval()
    cls_index = 1  # the method's own token first, timm's CLS token second
    assert getattr(module, f"{export_token}_index") == cls_index
    with torch.no_grad():
        tokens = module.encode(torch.randn(2, 3, 32, 32))
        on_cls = module.rotation_head if export_token == "rotation" else module.contrastive_head
        output = tokens["rotation_logits"] if export_token == "rotation" else tokens["contrastive"]
    assert torch.allclose(output, on_cls(tokens["exported_token"]), atol=1e-6)


def test_no_weight_decay_on_tokens_biases_norms_and_learned_weights():
    module = tiny()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in module.parameter_groups()}
    named = dict(module.named_parameters())
    for name in ("sit_token", "uncertainty", "backbone.net.cls_token", "backbone.net.pos_embed",
                 "rotation_head.bias", "backbone.net.norm.weight"):
        assert id(named[name]) in groups["no_decay"], name
    for name in ("rotation_head.weight", "contrastive_head.weight", "reconstruction_head.deconv.weight",
                 "backbone.net.blocks.0.attn.qkv.weight"):
        assert id(named[name]) in groups["decay"], name


def test_bad_values_are_one_line_errors_naming_the_choices(tmp_path):
    with pytest.raises(UserError) as excinfo:
        tiny("method.export_token=cls")
    message = str(excinfo.value)
    assert "'cls'" in message and "contrastive" in message and "rotation" in message and "\n" not in message
    with pytest.raises(UserError, match="'v2'.*valid: v1"):
        tiny("method.version=v2")
    with pytest.raises(UserError, match="noise_budget=1.5"):
        tiny("method.corruption.noise_budget=1.5")
    with pytest.raises(UserError, match="class token"):
        tiny("backbone.kwargs.class_token=false", "backbone.kwargs.global_pool=avg")
    # real shards, so the error cannot depend on whether an earlier test built the demo data
    shards = small_split("train", 64, tmp_path / "shards")
    proc = run_submit("pretrain", "sit", "vit_tiny_test", "method.views.interpolation=cubic", "trainer.max_steps=1",
                      "data.num_workers=0", f"data={shards}", f"run_dir={tmp_path}", in_process=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "'cubic'" in lines[0] and "bicubic" in lines[0] and "bilinear" in lines[0]


# ---- real runs -----------------------------------------------------------------------------------


def test_run_logs_terms_weights_pictures_and_exports_the_plain_vit(tmp_path):
    """A short real run of the vit_t CPU recipe; the export loads strictly into timm's ViT (the keys of a
    plain timm ViT, none of SiT's) and gives the same features as the trained backbone."""
    run_submit("pretrain", "sit", "vit_t", "trainer.max_steps=3", "data.batch_size=8", "data.num_workers=0",
               "images_every_n_steps=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
               f"run_dir={tmp_path}", "run_name=r", check=True, timeout=900, in_process=True)
    run = tmp_path / "r"
    scalars = read_scalars(run / "tb")
    for tag in ["train/loss", "train/rotation_acc", *[f"train/{p}_{t}" for p in ("s", "factor") for t in TASKS],
                *[f"train/{t}" for t in TASKS], "online_probe/top1"]:
        assert tag in scalars, (tag, sorted(scalars))
    assert "sit/clean_corrupted_reconstructed" in image_tags(run / "tb")

    out = export.export_backbone(run, tmp_path / "vit_t.safetensors")
    weights, meta = export.load_export(out)
    assert meta["method"] == "sit" and meta["timm_name"] == "vit_tiny_patch16_224"
    assert json.loads(meta["timm_kwargs"]) == {"drop_path_rate": 0.0, "img_size": 32, "patch_size": 4}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4)
    assert set(weights) == set(model.state_dict())  # a plain ViT: no SiT token, no heads, no learned weights
    model.load_state_dict(weights, strict=True)
    model.eval()

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module = method_class("sit")(compose("sit", "vit_t", []), num_classes=10)  # the online probe's 10 classes
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        timm_features = model(x)
        ours = module.backbone(x)
    assert torch.equal(weights["cls_token"], module.backbone.net.cls_token.detach())
    assert not torch.equal(ckpt["state_dict"]["sit_token"], torch.zeros_like(ckpt["state_dict"]["sit_token"]))
    assert (timm_features - ours).abs().max().item() < 1e-5
    # and those are the trained weights, not an init
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4).eval()
    with torch.no_grad():
        assert (fresh(x) - timm_features).abs().max().item() > 1e-3


def test_one_training_step_of_the_vit_b_recipe_at_small_resolution(tmp_path):
    """The official recipe (vit_b, AdamW, LR scaled by the batch, warm-up, drop-path 0.1, precision
    auto), only at 32 px (2 x 2 patches of 16 px) and 4 images, one optimizer step."""
    run_submit("pretrain", "sit", "vit_b", "image_size=32", "backbone.kwargs.img_size=32", "batch_size=4",
               "data.num_workers=0", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
               "trainer.log_every_n_steps=1", f"run_dir={tmp_path}", "run_name=r", check=True, timeout=900, in_process=True)
    run = tmp_path / "r"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 5e-4 and cfg["backbone"]["kwargs"]["drop_path_rate"] == 0.1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1
    scalars = read_scalars(run / "tb")
    assert all(torch.isfinite(torch.tensor(v)) for _, v in scalars["train/loss"])
    # v1's LR rule: 5e-4 x 4 / 512 at the peak, warm-up from 0.2 % of it
    assert scalars["lr-AdamW/decay"][0][1] == pytest.approx(5e-4 * 4 / 512 * 0.002, rel=1e-5)
    # one AdamW step, with a gradient for every parameter of the module (ViT-B, SiT token, heads, s_t)
    state = ckpt["optimizer_states"][0]
    n_params = sum(len(g["params"]) for g in state["param_groups"])
    assert n_params == len(ckpt["state_dict"]) and len(state["state"]) == n_params
    assert all(float(s["step"]) == 1 and s["exp_avg"].abs().max() > 0 for s in state["state"].values())


# ---- helpers -------------------------------------------------------------------------------------


def small_split(split: str, n: int, folder) -> str:
    """The first `n` Fashion-MNIST images of `split` as one real shard."""
    from selfsup.data.shards import builtin_samples, write_shards

    samples, _, classes = builtin_samples("fashion_mnist", split)
    write_shards(itertools.islice(samples, n), folder, prefix=split, total=n, classes=classes)
    return str(folder / f"{split}-000000.tar")
