"""Repair methods by name."""
from __future__ import annotations

from forensics.core.errors import ForensicsError
from forensics.defenses.base import Defense, RepairData, RepairResult
from forensics.defenses.abd import ABD
from forensics.defenses.cleanclip import CleanCLIP
from forensics.defenses.cbpt import CBPT
from forensics.defenses.invertune import InverTune
from forensics.defenses.oracle_finetune import OracleGuidedFinetune

DEFENSES: dict[str, type[Defense]] = {OracleGuidedFinetune.name: OracleGuidedFinetune, InverTune.name: InverTune, CBPT.name: CBPT,
                                       CleanCLIP.name: CleanCLIP, ABD.name: ABD}


def build_defense(name: str, **settings) -> Defense:
    if name not in DEFENSES:
        raise ForensicsError(f"unknown repair method {name!r}; choose one of {', '.join(DEFENSES)}")
    return DEFENSES[name](**settings)


__all__ = ["DEFENSES", "Defense", "RepairData", "RepairResult", "build_defense"]
