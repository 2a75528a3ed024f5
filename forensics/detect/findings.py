"""Typed findings of a backdoor scan: per-image evidence, flagged labels, trigger candidates, victims.

Everything here is plain data so the CLI writes it as JSON, the report draws it, and the repair
methods read it back from ``report.json`` without the scan having to run again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from forensics.core.images import Box


class Record:
    """Plain data that reports as a JSON-able dict of its fields."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]


@dataclass
class ImageEvidence(Record):
    """What the scan saw in one probe image."""

    index: int
    image: str
    predicted: str
    confidence: float
    true_label: str | None
    object_view_label: str  # CLIP's prediction once everything outside the oracle's objects is blanked
    object_view_support: float  # P(predicted label | object view)
    region_labels: list[dict]  # per oracle region: box, oracle score, CLIP label and probability for its crop
    grounded: bool  # some oracle region (or the object view) supports the whole-image prediction
    hijack_drop: float  # share of the predicted label's probability removed by occluding one small window
    hijack_box: Box | None  # where that window (refined) sits, in model-input pixels
    hijack_flips: bool  # occluding that window changes the prediction
    outside_mass: float  # share of occlusion attribution falling outside every object region
    discrepancy: float  # 0..1, higher = the prediction rests on something that is not an object
    captured: bool = False  # the prediction was taken over by a small non-object region
    triggered: bool | None = None  # ground truth from the probe set when known


@dataclass
class FlaggedLabel(Record):
    """A label that ungrounded, small-region predictions pile onto."""

    label: str
    score: float
    captured: int
    predicted: int
    explanation: str


@dataclass
class TriggerCandidate(Record):
    """A reconstructed trigger: the aggregate of the hijacking crops, with its verification."""

    label: str
    pattern: str  # image file (relative to the report folder)
    size: float  # side as a fraction of the image side
    n_crops: int
    verified_asr: float  # flip rate to ``label`` when pasted on clean images of other classes
    n_verified: int
    crops: list[str] = field(default_factory=list)


@dataclass
class InvertedTrigger(Record):
    """A trigger recovered by optimisation (a mask blending a pattern into the image), with its verification."""

    label: str
    method: str  # the detector that inverted it (e.g. "invertune", "cbpt")
    mask_area: float  # mean mask value: the share of the image the trigger overwrites
    verified_asr: float  # flip rate to ``label`` when stamped on clean images of other classes
    n_verified: int
    verified_on: str = ""  # which images the flip rate was measured on
    pattern: str | None = None  # image file (relative to the report folder) when written
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Victim(Record):
    """A probe image whose prediction the trigger captured, with where the trigger was localized."""

    index: int
    image: str
    label: str
    box: Box
    grounded_label: str
    discrepancy: float


@dataclass
class Findings:
    """The scan's result across the probe set."""

    flagged_labels: list[FlaggedLabel]
    triggers: list[TriggerCandidate]
    victims: list[Victim]
    images: list[ImageEvidence]
    metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    inverted: list[InvertedTrigger] = field(default_factory=list)  # triggers recovered by optimisation
    label_evidence: dict[str, Any] = field(default_factory=dict)  # per-label scores, by detector's own grouping
    # in-memory results for the pipeline (images, maps, per-image records, trigger tensors); never serialised
    artefacts: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The JSON-able findings (report.json's keys); artefacts are left out."""
        return {
            "flagged_labels": [f.to_dict() for f in self.flagged_labels],
            "triggers": [t.to_dict() for t in self.triggers],
            "victims": [v.to_dict() for v in self.victims],
            "images": [e.to_dict() for e in self.images],
            "metrics": self.metrics,
            "settings": self.settings,
            **({"inverted_triggers": [t.to_dict() for t in self.inverted]} if self.inverted else {}),
            **({"label_evidence": self.label_evidence} if self.label_evidence else {}),
        }


def skipped(reason: str, settings: dict[str, Any]) -> Findings:
    """The findings of a detector that could not run on this probe set (too few images or classes), saying why."""
    return Findings([], [], [], [], metrics={"skipped": reason}, settings=settings)
