"""Eval targets and built-in data are looked up by name: the probe, the stream and the commands name
no method and no dataset, and which eval target a run gets comes from its data config."""

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from selfsup.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GENERIC_MODULES = ("selfsup/eval/probe.py", "selfsup/data/stream.py", "selfsup/launch/commands.py")


def method_and_dataset_names() -> set[str]:
    from selfsup.continual.config import METHODS as CONTINUAL_METHODS
    from selfsup.continual.config import continual_data_names
    from selfsup.data.kinds import kind_names
    from selfsup.launch.config import available
    from selfsup.ssl import METHODS

    return {*METHODS, *CONTINUAL_METHODS, *kind_names(), *available("data"), *continual_data_names()}


def names_in(source: str, names: set[str]) -> set[str]:
    """The names that occur in `source` as whole identifiers or strings (`atari` in "atari", not in `atari_cache`)."""
    return {n for n in names if re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", source)}


def test_generic_modules_name_no_method_and_no_dataset():
    names = method_and_dataset_names()
    assert {"rotnet", "tov_vicreg", "contracon", "fashion_mnist", "digits", "atari", "atari_ram"} <= names
    # the check catches the special cases these modules once had
    assert names_in('if run_cfg.method.name == "tov_vicreg":', names) == {"tov_vicreg"}
    assert names_in('if data_cfg.name in ("atari", "atari_ram"):', names) == {"atari", "atari_ram"}
    assert names_in('data_choice = "fashion_mnist"', names) == {"fashion_mnist"}
    assert names_in("return atari_cache(split, cache_dir)", names) == set()
    for module in GENERIC_MODULES:
        assert names_in((ROOT / module).read_text(), names) == set(), module


def test_both_targets_are_registered():
    from selfsup.eval.targets import get_target, target_names

    assert {"classification", "atari_ram"} <= set(target_names())
    with pytest.raises(UserError, match="did you mean 'atari_ram'"):
        get_target("atari_rams")


def run_config(data: dict, method: str = "some_method") -> OmegaConf:
    return OmegaConf.create({"method": {"name": method},
                             "data": {"image_size": 84, "mean": [0.0] * 3, "std": [1.0] * 3, **data}})


@pytest.mark.parametrize(("overrides", "run", "data", "target"), [
    ([], None, "fashion_mnist", "classification"),  # the default data of configs/defaults.yaml
    (["data=atari_ram"], None, "atari_ram", "atari_ram"),
    (["data=atari"], None, "atari", "atari_ram"),
    (["data=digits"], None, "digits", "classification"),
    ([], {"name": "digits"}, "digits", "classification"),  # a run's own built-in data
    ([], {"name": "atari"}, "atari", "atari_ram"),
    # a run on shards: the eval target its data names, probed on that target's default data
    ([], {"name": "shards", "eval_target": "atari_ram"}, "atari_ram", "atari_ram"),
    ([], {"name": "shards", "eval_target": "classification"}, "fashion_mnist", "classification"),
    (["data.test=/x/test"], {"name": "shards", "eval_target": "atari_ram"}, "atari_ram", "atari_ram"),
    (["data=digits"], {"name": "shards", "eval_target": "atari_ram"}, "digits", "classification"),
    (["data.eval_target=atari_ram"], None, "fashion_mnist", "atari_ram"),
])
def test_the_eval_target_comes_from_the_data(overrides, run, data, target):
    from selfsup.eval.probe import probe_config

    cfg = probe_config(overrides, run_config(run) if run else None)
    assert (cfg.data.name, cfg.data.eval_target) == (data, target)


def test_a_run_saved_without_an_eval_target_gets_its_methods_declared_one():
    from selfsup.eval.probe import probe_config

    assert probe_config([], run_config({"name": "shards"}, method="tov_vicreg")).data.eval_target == "atari_ram"
    assert probe_config([], run_config({"name": "shards"}, method="rotnet")).data.eval_target == "classification"


def test_each_target_makes_its_own_pixel_baseline():
    from selfsup.eval.targets import get_target

    gray = torch.rand(2, 1, 32, 32).expand(2, 3, 32, 32)
    assert torch.equal(get_target("classification").pixels()(gray), gray[:, 0].flatten(1))
    stacks = torch.rand(2, 3, 84, 84)  # 3 frames
    assert torch.equal(get_target("atari_ram").pixels()(stacks), stacks[:, -1].flatten(1))


def test_results_are_typed_by_their_target():
    from selfsup.eval.targets import get_target

    target = get_target("classification")
    record = {"linear": {"top1": 90.0, "top5": 99.0, "chosen": {"weight_decay": 1e-4}},
              "knn": {"top1": 80.0, "top5": 95.0, "k": 20, "temperature": 0.07},
              "train_samples": 10, "test_samples": 5, "feature_dim": 8}
    result = target.result_type(target.name, record)
    assert result.eval_target == "classification" and result["linear"]["top1"] == 90.0
    assert "k-NN" in result.table("x") and result.scalars()["probe/knn_top1"] == 80.0
    assert json.loads(json.dumps(result.record)) == record


def test_builtin_data_is_found_by_name(tmp_path):
    from selfsup.data.kinds import find_kind, kind_names
    from selfsup.data.stream import resolve_split

    assert find_kind("atari_ram") is find_kind("atari") and find_kind("shards") is None
    assert {"fashion_mnist", "digits", "atari"} <= set(kind_names())
    folder = resolve_split(OmegaConf.create({"name": "digits", "cache_dir": str(tmp_path)}), "test")
    assert Path(folder) == tmp_path / "shards" / "digits" / "test" and (Path(folder) / "index.json").exists()
    with pytest.raises(UserError, match="atari"):  # the error lists every built-in dataset
        resolve_split(OmegaConf.create({"name": "shards"}), "test")
