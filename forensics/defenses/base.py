"""The repair interface: every defense turns a suspect model (+ findings + clean data) into a repaired model."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from forensics.core.models import SuspectModel

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
    captions: list[str] | None = None  # one per image when the clean budget is an image-caption set

    def captions_or_prompts(self) -> list[str]:
        """A caption per image: the given ones, else "a photo of a {class}." (caption-based defenses need text)."""
        if self.captions is not None:
            return list(self.captions)
        return [f"a photo of a {self.class_names[label]}." for label in self.labels]


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
    needs_findings: ClassVar[bool] = False  # True: needs a scan's compact set (kinds/patterns), not just clean data
    summary: ClassVar[str] = ""  # one line for lists and the UI

    @abstractmethod
    def repair(self, model: SuspectModel, data: RepairData, progress: Progress | None = None,
               should_stop: ShouldStop | None = None) -> RepairResult:
        """Return a repaired copy; the input model is left untouched."""
