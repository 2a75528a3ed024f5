"""Repair methods by name."""
from __future__ import annotations

from ..errors import ForensicsError
from .base import Defense, RepairData, RepairResult
from .abd import ABD
from .cleanclip import CleanCLIP
from .cbpt import CBPT
from .invertune import InverTune
from .oracle_finetune import OracleGuidedFinetune

DEFENSES: dict[str, type[Defense]] = {OracleGuidedFinetune.name: OracleGuidedFinetune, InverTune.name: InverTune, CBPT.name: CBPT,
                                       CleanCLIP.name: CleanCLIP, ABD.name: ABD}


def build_defense(name: str, **settings) -> Defense:
    if name not in DEFENSES:
        raise ForensicsError(f"unknown repair method {name!r}; choose one of {', '.join(DEFENSES)}")
    return DEFENSES[name](**settings)


__all__ = ["DEFENSES", "Defense", "RepairData", "RepairResult", "build_defense"]
