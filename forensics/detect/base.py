"""The detector interface: a suspect model and a probe set in, typed :class:`Findings` out; one registry for all.

``run(model, probe, progress) -> Findings``. What a pipeline needs beyond the JSON-able findings
(the loaded images, attribution maps, reconstructed trigger tensors) rides along in ``Findings.artefacts``,
so reports and the compact set are drawn from memory, never re-read from disk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from forensics.core.data import ProbeSet
from forensics.core.models import SuspectModel
from forensics.core.progress import Progress
from forensics.core.registry import Registry
from forensics.detect.findings import Findings

DETECTORS: Registry = Registry("detector")
"""Registered detector classes by name (``@DETECTORS.register``)."""


class Detector(ABC):
    """One way of finding a backdoor; ``name`` is its registry key."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    # whether it takes ``shard=True`` and then, run by every process of a launcher, does its share of the work and
    # gathers the rest (the one-process findings on every rank); the others run on rank 0 alone
    shardable: ClassVar[bool] = False

    @abstractmethod
    def run(self, model: SuspectModel, probe: ProbeSet, progress: Progress | None = None) -> Findings:
        """Examine ``model`` on ``probe``: per-label evidence, trigger candidates, victims and metrics."""
