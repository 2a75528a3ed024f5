"""The detector interface: a suspect model and a probe set in, typed :class:`Findings` out; one registry for all.

``run(model, probe, progress) -> Findings`` is a template: it skips (saying why) a probe set too small for the
detector, loads the probe images once (shared by every detector of a scan), times the run and reports progress;
a detector writes only :meth:`Detector.examine`. :meth:`Detector.evidence` says what its findings claim about the
labels (typed :class:`~forensics.detect.claims.Evidence`), and :meth:`Detector.victims` which images a target
captured, so the verdict is a vote that names no detector. What a pipeline needs beyond the JSON-able findings
(the loaded images, attribution maps, reconstructed trigger tensors) rides along in ``Findings.artefacts``,
so reports and the compact set are drawn from memory, never re-read from disk.

Each detector declares the dataclass of its knobs (``settings_cls``) and named profiles of them (``profiles``:
``quick`` is a cheap run for checking plumbing, never for judging detection); :func:`detector_settings` turns what a
front end passes (a mapping per detector name, a profile, the scan's seed and templates) into one settings object
per detector, refusing unknown names and wrong types in one line.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, fields, is_dataclass
from typing import Any, ClassVar

import torch

from forensics.core.data import ProbeSet
from forensics.core.errors import ForensicsError
from forensics.core.models import SuspectModel
from forensics.core.progress import Progress, sub_progress
from forensics.core.registry import Registry
from forensics.core.settings import build_settings
from forensics.detect.claims import Evidence
from forensics.detect.findings import Findings, FlaggedLabel, skipped

DETECTORS: Registry = Registry("detector")
"""Registered detector classes by name (``@DETECTORS.register``)."""

PROFILES = ("default", "quick")
"""Settings profiles every detector knows: its defaults, and a cheap run for plumbing (fewer steps and images)."""


class Detector(ABC):
    """One way of finding a backdoor; ``name`` is its registry key."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    settings_cls: ClassVar[type]  # the dataclass of its settings (built by :func:`detector_settings`)
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}  # profile name -> settings it changes (see PROFILES)
    run_order: ClassVar[int] = 100  # where ``all`` runs it (the cheap per-image evidence first, by convention)
    # whether it takes ``shard=True`` and then, run by every process of a launcher, does its share of the work and
    # gathers the rest (the one-process findings on every rank); the others run on rank 0 alone
    shardable: ClassVar[bool] = False
    # the verdict's tie-break: of labels named by equally many detectors, the one named by the lowest rank wins
    # (by convention a model-level test before per-image evidence, which needs suspicious inputs in the probe)
    vote_rank: ClassVar[int] = 100
    min_images: ClassVar[int] = 1  # fewer probe images than this: the detector is skipped, saying so
    min_classes: ClassVar[int] = 1  # fewer probe classes than this: skipped
    settings: Any

    def run(self, model: SuspectModel, probe: ProbeSet, progress: Progress | None = None) -> Findings:
        """Examine ``model`` on ``probe`` (the template: skip with the reason when the probe is too small, load the
        images once, :meth:`examine`, record the seconds taken)."""
        if len(probe) == 0:
            raise ForensicsError("the probe set is empty")
        if not probe.class_names:
            raise ForensicsError("the probe set names no classes")
        reason = self.cannot_run(probe)
        if reason is not None:
            return skipped(reason, asdict(self.settings) if is_dataclass(self.settings) else {})
        start = time.time()
        images = probe.load_images(model.image_size, progress=sub_progress(progress, 0.0, 0.05))
        findings = self.examine(model, probe, images, sub_progress(progress, 0.05, 1.0))
        findings.metrics["seconds"] = round(time.time() - start, 2)
        return findings

    def cannot_run(self, probe: ProbeSet) -> str | None:
        """Why this probe set is too small for the detector (None when it is not)."""
        if len(probe) < self.min_images or len(probe.class_names) < self.min_classes:
            classes = f" and {self.min_classes} classes" if self.min_classes > 1 else ""
            return f"needs at least {self.min_images} probe images{classes}"
        return None

    @abstractmethod
    def examine(
        self, model: SuspectModel, probe: ProbeSet, images: torch.Tensor, progress: Progress | None = None
    ) -> Findings:
        """Examine ``model`` on ``probe`` (``images``: the probe decoded at the model's size, shared with the scan's
        other detectors; never written into): per-label evidence, trigger candidates, victims and metrics."""

    @classmethod
    def evidence(cls, findings: Findings, probe: ProbeSet) -> Evidence:
        """What ``findings`` (this detector's, from a scan or read back) claim about the labels; none by default:
        a detector without calibrated claims is shown in the report and counts for nothing in the verdict."""
        return Evidence(cls.name)

    @classmethod
    def stored_evidence(cls, findings: Findings, classes: list[str]) -> dict[str, Any]:
        """The findings reduced to what the decision rests on, JSON-able and without images (the evidence store,
        :mod:`forensics.detect.evidence`); by default the flagged labels as recorded."""
        return {"flags": [f.to_dict() for f in findings.flagged_labels]}

    @classmethod
    def replayed(cls, stored: dict[str, Any], classes: list[str], cuts: Any) -> Findings:
        """Findings rebuilt from :meth:`stored_evidence` under the thresholds ``cuts`` (an evidence ``Cuts``), so a
        refit re-judges a scan without rescanning; by default the stored flags, which claim nothing."""
        return Findings([FlaggedLabel(**f) for f in stored.get("flags", [])], [], [], [])

    @classmethod
    def victims(cls, findings: Findings, probe: ProbeSet, target: str) -> list[dict[str, Any]]:
        """The probe images the ``target``'s trigger captured by this detector's findings (index, image, label, box);
        by default its findings' victims of that label."""
        return [v.to_dict() for v in findings.victims if v.label == target]


def profile_name(profile: str | None) -> str:
    """The profile as :data:`PROFILES` names it (``None`` is the default); an unknown one is a one-line error."""
    name = (profile or "default").strip().lower()
    if name not in PROFILES:
        raise ForensicsError(f"unknown detector profile {name!r}; valid: {', '.join(PROFILES)}")
    return name


def all_detectors() -> list[str]:
    """Every registered detector, in run order."""
    return sorted(DETECTORS.names(), key=lambda n: (DETECTORS.get(n).run_order, n))


def detector_settings(
    names: list[str],
    settings: Mapping[str, Any] | None = None,
    profile: str | None = None,
    common: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One settings object per detector in ``names``: its defaults, then ``profile``'s changes, then ``common``
    (e.g. the scan's seed and templates, for every detector that has such a field), then ``settings[name]``
    (a settings object, which replaces all of that, or a mapping of ``setting -> value``, strings parsed by type).

    ``settings`` may name only detectors among ``names`` (a setting for one that does not run is a mistake);
    names are matched as the registry matches them (case, ``_`` for ``-``, aliases)."""
    profile = profile_name(profile)
    given: dict[str, Any] = {}
    for raw, value in (settings or {}).items():
        name = DETECTORS.resolve(raw)
        if name not in names:
            raise ForensicsError(
                f"detector settings for {name!r}, which this scan does not run (detectors: {', '.join(names)})"
            )
        if not (isinstance(value, Mapping) or is_dataclass(value)):
            raise ForensicsError(f"detector settings for {name!r} must be a mapping of setting -> value")
        given[name] = value
    out = {}
    for name in names:
        cls = DETECTORS.get(name).settings_cls
        value = given.get(name)
        if is_dataclass(value) and not isinstance(value, type):
            if not isinstance(value, cls):
                raise ForensicsError(f"detector settings for {name!r} must be a {cls.__name__}")
            out[name] = value
            continue
        own = {f.name for f in fields(cls)}
        shared = {k: v for k, v in (common or {}).items() if k in own}
        where = f"detector setting {name}"
        resolved = build_settings(cls, DETECTORS.get(name).profiles.get(profile, {}), where)
        resolved = build_settings(cls, shared, where, base=resolved)
        out[name] = build_settings(cls, value or {}, where, base=resolved)
    return out


def build_detector(name: str, oracle: Any = None, settings: Any = None, shard: bool = False) -> Detector:
    """A registered detector from its name (unknown names give the valid ones) with its settings object (or a
    mapping of overrides) and, for a shardable one, ``shard``."""
    name = DETECTORS.resolve(name)
    cls = DETECTORS.get(name)
    if not isinstance(settings, cls.settings_cls):
        settings = detector_settings([name], {name: settings} if settings else None)[name]
    return cls(oracle=oracle, settings=settings, **({"shard": True} if shard and cls.shardable else {}))
