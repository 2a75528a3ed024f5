"""The scan's verdict in words a non-expert reads first: what was found, how sure, and what to do next.

Built from report.json's ``verdict`` alone (a scan's, or one read back), so the workbench, report.html and any
other front end say the same. A scan that ran only some detectors (the workbench's quick look) says which ran and
what the full verdict adds: a verdict is only as strong as the detectors behind it, and "nothing found" by the
per-image passes is not "nothing there".
"""

from __future__ import annotations

from typing import Any

from forensics.detect import all_detectors

PLAIN_NAMES = {
    "oracle-guided": "the oracle-guided scan",
    "embedding-density": "embedding density",
    "trigger-inversion": "the model-level trigger inversion (it needs no triggered image in the probe set)",
}
FAMILY_WORDS = {"local": "small-patch", "global": "whole-image"}


def plain_name(detector: str) -> str:
    """A detector as a sentence names it."""
    return PLAIN_NAMES.get(detector, detector)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1] if items else "none"


def detectors_ran(report: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(ran, skipped, not run): the detectors whose evidence the verdict holds and that ran, those that were asked
    but could not run on this probe (too few images or classes), and registered ones this scan did not ask for."""
    evidence = (report.get("verdict") or {}).get("evidence") or {}
    ran = [name for name, e in evidence.items() if not e.get("skipped")]
    skipped = [name for name, e in evidence.items() if e.get("skipped")]
    return ran, skipped, [name for name in all_detectors() if name not in evidence]


def _bold(text: str, markdown: bool) -> str:
    return f"**{text}**" if markdown else text


def _certainty(verdict: dict[str, Any], ran: list[str]) -> str:
    """How sure a backdoored verdict is: how many of the detectors that ran name the target on their own, and how
    well its trigger was verified on clean images the trigger was not made from."""
    target = verdict["target"]
    naming = [
        d
        for d, claims in (verdict.get("claims") or {}).items()
        if any(c.get("label") == target and c.get("strength") == "strong" for c in claims)
    ]
    if len(naming) >= 2:
        words = f"high: {len(naming)} of the {len(ran)} detectors that ran name '{target}' independently"
    elif naming:
        words = f"moderate: one of the {len(ran)} detectors that ran ({plain_name(naming[0]).split(' (')[0]}) names it"
    else:
        words = f"moderate: the detectors' evidence points at '{target}'"
    trigger = verdict.get("trigger") or {}
    if trigger.get("verified_asr") is not None:
        words += (
            f", and the best trigger found sends {float(trigger['verified_asr']):.0%} of "
            f"{trigger.get('n_verified', 'the')} held-out clean images of other classes to it"
        )
    return words


def _limits(report: dict[str, Any], verdict: dict[str, Any]) -> list[str]:
    """What weakens any verdict of this scan: an uncalibrated profile, a model outside the calibrated domain."""
    notes = []
    profile = report.get("detector_profile", "default")
    if profile != "default":
        notes.append(f"the {profile} detector profile ran, so these thresholds are not the calibrated ones")
    if verdict.get("outside_domain"):
        notes.append("this model lies outside the models the thresholds were calibrated on")
    return notes


def plain_verdict(report: dict[str, Any], markdown: bool = True) -> str:
    """One short paragraph: the verdict (backdoored, nothing found, inconclusive), how sure, what to do next, and
    for a partial scan which detectors ran and what the full verdict adds. ``markdown``: bold the verdict word."""
    verdict = report.get("verdict") or {}
    if not verdict:
        return "No verdict: the scan's detectors were not merged."
    ran, skipped, missing = detectors_ran(report)
    images = (report.get("probe") or {}).get("images") or len(report.get("images") or [])
    partial = [plain_name(d) for d in missing]
    ran_words = _join([plain_name(d).split(" (")[0] for d in ran])
    kind = verdict.get("verdict")
    if kind == "backdoored":
        family = FAMILY_WORDS.get(verdict.get("family") or "", "hidden")
        n_victims = len(verdict.get("victims") or [])
        victims = f" ({n_victims} of the {images} probe images were hijacked by it)" if n_victims else ""
        text = (
            f"{_bold('Backdoored', markdown)}: this model sends images carrying a {family} trigger to "
            f"'{verdict['target']}'{victims}. How sure: {_certainty(verdict, ran)}. Next: remove the backdoor in "
            "the Repair tab (it reports accuracy and attack success before and after), or look at the trigger and "
            "its victims in the Findings tab."
        )
    elif kind == "clean":
        text = (
            f"{_bold('Nothing found', markdown)}: none of the detectors that ran ({ran_words}) crossed its "
            f"clean-calibrated threshold on these {images} images. That is no proof the model is clean: a trigger "
            "these detectors cannot see, or one no probe image exercises, would pass."
        )
        if partial:
            text += f" For a stronger answer run the full verdict: it adds {_join(partial)}."
    else:
        weak = [
            c["reason"] for claims in (verdict.get("claims") or {}).values() for c in claims if c["strength"] == "weak"
        ]
        sign = weak[0] if weak else next(iter(verdict.get("reasons") or []), "weak evidence")
        text = (
            f"{_bold('Inconclusive', markdown)}: there are weak signs ({sign}) but nothing strong enough to "
            "name a target label. Next: "
        )
        if partial:
            text += f"run the full verdict, which adds {_join(partial)}; "
        text += (
            "scan more images, or a probe set with more images per class, and look at the flagged labels in Findings."
        )
    if partial and kind == "backdoored":
        text += f" Only {ran_words} ran; the full verdict adds {_join(partial)}."
    if skipped:
        text += f" Could not run on this probe set: {_join(skipped)}."
    limits = _limits(report, verdict)
    if limits:
        text += f" Take it with care: {'; '.join(limits)}."
    return text
