"""Self-supervised methods. The table below is the one place a method is named; it stays cheap to
import (no torch) so that the CLI can validate a command line before anything heavy loads."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from selfsup.core.errors import UserError, unknown_choice


@dataclass(frozen=True)
class MethodEntry:
    target: str  # "module:Class"
    families: tuple[str, ...]  # backbone families the method accepts
    summary: str


METHODS: dict[str, MethodEntry] = {
    "rotnet": MethodEntry("selfsup.ssl.rotnet:RotNet", ("convnet", "vit"), "predict the rotation (0/90/180/270) of every image"),
    "obow": MethodEntry("selfsup.ssl.obow.method:OBoW", ("convnet",), "online bag-of-visual-words: EMA teacher, multi-crop student"),
    "tov_vicreg": MethodEntry("selfsup.ssl.tov_vicreg.method:TOVVICReg", ("vit", "convnet"),
                              "VICReg + temporal order verification on 3-frame stacks (Atari episodes)"),
    "spark": MethodEntry("selfsup.ssl.spark.method:SparK", ("convnet",), "sparse masked modelling: reconstruct masked patches"),
    "sit": MethodEntry("selfsup.ssl.sit.method:SiT", ("vit",),
                       "SiT v1: rotation + contrastive tokens, reconstruction of corrupted views, learned loss weights"),
}


def method_entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise unknown_choice("method", name, METHODS)
    return METHODS[name]


def check_pair(method: str, backbone: str) -> None:
    from selfsup.backbones import get_spec

    entry, spec = method_entry(method), get_spec(backbone)
    if spec.family not in entry.families:
        raise UserError(
            f"{method} does not accept {backbone} (a {spec.family}): it needs a {' or '.join(entry.families)} backbone"
        )


def method_class(name: str):
    module, cls = method_entry(name).target.split(":")
    return getattr(importlib.import_module(module), cls)
