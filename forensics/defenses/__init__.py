"""Repair methods by name: importing this package registers the five defenses in :data:`DEFENSES`."""

from __future__ import annotations

from typing import Any

from forensics.defenses.base import DEFENSES, Defense, Fitted, RepairData, RepairJob, RepairResult, stamped_sources

# isort: off
# import order is registration order, the order DEFENSES lists them in (CLI, UI, compare tables)
from forensics.defenses.oracle_finetune import OracleGuidedFinetune
from forensics.defenses.invertune import InverTune
from forensics.defenses.cbpt import CBPT
from forensics.defenses.cleanclip import CleanCLIP
from forensics.defenses.abd import ABD
# isort: on


def build_defense(name: str, **settings: Any) -> Defense:
    """The defense registered as ``name`` with ``settings``; an unknown name or setting is one ForensicsError line."""
    return DEFENSES.build(name, **settings)


__all__ = [
    "ABD",
    "CBPT",
    "CleanCLIP",
    "DEFENSES",
    "Defense",
    "Fitted",
    "InverTune",
    "OracleGuidedFinetune",
    "RepairData",
    "RepairJob",
    "RepairResult",
    "build_defense",
    "stamped_sources",
]
