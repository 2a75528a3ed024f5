"""The attack lab: backdoor triggers for CLIP and a tool to poison an image-caption data set.

Build attacks by name (``build_attack("badnet", size=0.1)``) or from a stored dict
(``attack_from_dict(json.load(...)["attack"])``); every attack round-trips through ``to_dict``.
"""

from __future__ import annotations

from typing import Any, Mapping

from forensics.attacks.badnet import BadNet
from forensics.attacks.base import ATTACKS, POSITIONS, Attack, Box, register, to_pil, to_tensor
from forensics.attacks.blended import Blended
from forensics.attacks.filter import Filter
from forensics.attacks.optimized_patch import OptimizedPatch, train_optimized_patch
from forensics.attacks.poison import poison_dataset
from forensics.attacks.sig import SIG
from forensics.attacks.wanet import WaNet
from forensics.core.errors import ForensicsError

__all__ = [
    "ATTACKS",
    "POSITIONS",
    "Attack",
    "Box",
    "BadNet",
    "Blended",
    "Filter",
    "WaNet",
    "SIG",
    "OptimizedPatch",
    "attack_from_dict",
    "build_attack",
    "list_attacks",
    "poison_dataset",
    "register",
    "to_pil",
    "to_tensor",
    "train_optimized_patch",
]


def list_attacks() -> list[str]:
    """Names of the registered attacks, sorted."""
    return ATTACKS.names()


def build_attack(name: str, **params: Any) -> Attack:
    """Build a registered attack from its name and keyword parameters.

    Unknown names or parameters raise ForensicsError.
    """
    return ATTACKS.build(name, **params)


def attack_from_dict(d: Mapping[str, Any]) -> Attack:
    """Rebuild an attack from ``Attack.to_dict()`` output (``{"attack": name, **params}``)."""
    if not isinstance(d, Mapping) or "attack" not in d:
        raise ForensicsError("an attack description must be a mapping with an 'attack' key naming the attack")
    params = {k: v for k, v in d.items() if k != "attack"}
    return build_attack(d["attack"], **params)
