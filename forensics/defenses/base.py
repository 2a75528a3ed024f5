"""The repair interface: every defense turns a suspect model (+ findings + clean data) into a repaired model."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..models import SuspectModel

Progress = Callable[[float, str], None]
ShouldStop = Callable[[], bool]


@dataclass
class RepairData:
    """What a defense may use: labelled images (in [0, 1] at model size), class names, templates, trigger patterns."""

    images: torch.Tensor
    labels: list[int]
    kinds: list[str]
    class_names: list[str]
    templates: str | list[str] = "short"
    patterns: list[torch.Tensor] = field(default_factory=list)  # reconstructed triggers (3 x h x w)
    flagged: list[str] = field(default_factory=list)


@dataclass
class RepairResult:
    model: SuspectModel
    samples_used: int
    history: list[dict]
    seconds: float
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class Defense(ABC):
    """One repair method; ``name`` is its registry key."""

    name: ClassVar[str]

    @abstractmethod
    def repair(self, model: SuspectModel, data: RepairData, progress: Progress | None = None,
               should_stop: ShouldStop | None = None) -> RepairResult:
        """Return a repaired copy; the input model is left untouched."""
