"""Typed evidence a detector hands the verdict: the labels it names strongly or weakly (each with its reason and the
measured margins past its thresholds), the flags it refutes, its trigger options; the verdict is a vote over these.

A detector turns its own findings into :class:`Evidence` (``Detector.evidence``), so :func:`forensics.detect.verdict.
merge` knows no detector by name: a new detector is one file whose class says what its findings claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forensics.detect.findings import Record

STRONG = "strong"  # names a target on its own (a calibrated threshold crossed, and verified where the detector can)
WEAK = "weak"  # worth a look, never a target: alone it makes the verdict inconclusive
REFUTED = "refuted"  # a flag the detector's own check contradicts: shown, counted for nothing
STRENGTHS = (STRONG, WEAK, REFUTED)


@dataclass
class LabelClaim(Record):
    """One label a detector names, how strongly, why, and by how much each feature passed its threshold."""

    label: str
    strength: str  # one of STRENGTHS
    reason: str
    # per feature: the signed distance past its threshold in the feature's own units (> 0: on the flagged side)
    margins: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strength not in STRENGTHS:
            raise ValueError(f"claim strength must be one of {', '.join(STRENGTHS)}, not {self.strength!r}")


@dataclass
class TriggerOption(Record):
    """A trigger a detector offers for ``label``: the verdict shows the best-verified one for its target."""

    detector: str
    label: str
    verified_asr: float  # flip rate to ``label`` on clean images of other classes
    record: dict[str, Any]  # the trigger as the report shows it (the detector's trigger record, with its method)
    # offered only when no detector has a first-choice option for the target (a trigger the detector found but
    # does not itself call a candidate, verified well enough to show for a target others named)
    fallback: bool = False

    @property
    def family(self) -> str:
        """local (a patch) or global (the whole image), as the trigger record says; patches by default."""
        return str(self.record.get("stats", {}).get("family", "local"))


@dataclass
class Evidence(Record):
    """What one detector's findings claim about the labels, for the verdict's vote."""

    detector: str
    claims: list[LabelClaim] = field(default_factory=list)
    triggers: list[TriggerOption] = field(default_factory=list)

    def labels(self, strength: str) -> list[str]:
        """The labels claimed at ``strength``, in the detector's order, each once."""
        return list(dict.fromkeys(c.label for c in self.claims if c.strength == strength))

    def reason_for(self, label: str) -> str | None:
        """The detector's reason for naming ``label`` strongly (its first such claim), if it does."""
        return next((c.reason for c in self.claims if c.strength == STRONG and c.label == label), None)
