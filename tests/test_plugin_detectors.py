"""Plug-in detectors: a detector is one class (its ``examine`` and what its findings claim); the template does the
skips, image loading and timing, ``all`` runs every registered one, and the verdict is a vote that names none."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from forensics.core.data import ProbeItem, ProbeSet
from forensics.detect import DETECTORS, Detector, all_detectors, build_detector
from forensics.detect.claims import STRONG, WEAK, Evidence, LabelClaim, TriggerOption
from forensics.detect.findings import Findings, FlaggedLabel, InvertedTrigger, TriggerCandidate
from forensics.detect.verdict import merge
from forensics.pipelines.scan import detector_names


@dataclass
class MajoritySettings:
    share: float = 0.5  # a label predicted for more than this share of the probe is named
    templates: str = "short"

    def to_dict(self) -> dict:
        return {"share": self.share, "templates": self.templates}


class MajorityLabel(Detector):
    """A toy detector for the plug-in contract: names the label the model gives most of the probe images."""

    name = "majority-label"
    settings_cls = MajoritySettings
    vote_rank = 5  # trusted before every built-in detector, so a tie shows the rank decides
    min_images = 4
    seen_images: list[torch.Tensor] = []

    def __init__(self, oracle: object = None, settings: MajoritySettings | None = None):
        self.settings = settings or MajoritySettings()

    def examine(self, model, probe, images, progress=None) -> Findings:
        from forensics.core.zeroshot import class_text_embeddings, image_embeddings

        type(self).seen_images.append(images)
        names = list(probe.class_names)
        predicted = (image_embeddings(model, images) @ class_text_embeddings(model, names).t()).argmax(1)
        counts = torch.bincount(predicted, minlength=len(names))
        top = int(counts.argmax())
        share = float(counts[top]) / len(probe)
        flagged = [FlaggedLabel(names[top], share, int(counts[top]), int(counts[top]), "most images")]
        return Findings(flagged if share > self.settings.share else [], [], [], [], metrics={"share": share})

    @classmethod
    def evidence(cls, findings: Findings, probe: ProbeSet) -> Evidence:
        return Evidence(
            cls.name,
            [
                LabelClaim(f.label, STRONG, f"'{f.label}' takes {f.score:.0%} of the probe", {"share": f.score - 0.5})
                for f in findings.flagged_labels
            ],
        )


@pytest.fixture(scope="module")
def tiny_model():
    from forensics.core.models import new_model
    from forensics.core.tokenizer import WordTokenizer

    return new_model("tiny-rn", tokenizer=WordTokenizer.from_corpus(["a photo of a a b c"]), seed=0)


@pytest.fixture
def majority_registered():
    DETECTORS.register(MajorityLabel)
    MajorityLabel.seen_images = []
    yield MajorityLabel
    DETECTORS._entries.pop(MajorityLabel.name)


def _probe(n: int = 6) -> ProbeSet:
    return ProbeSet("toy", [ProbeItem(f"img{i}.png", i % 3) for i in range(n)], ["a", "b", "c"])


def test_a_registered_detector_joins_all_and_builds_from_its_name(majority_registered):
    assert "majority-label" in all_detectors() and "majority-label" in detector_names("all")
    detector = build_detector("majority-label", settings={"share": "0.8"})
    assert isinstance(detector, MajorityLabel) and detector.settings.share == 0.8


def test_the_template_skips_a_small_probe_saying_why_and_times_a_run(majority_registered, tiny_model, tmp_path):
    from PIL import Image

    items = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(path)
        items.append(ProbeItem(str(path), i % 3))
    small = build_detector("majority-label").run(tiny_model, ProbeSet("toy", items[:3], ["a", "b", "c"]))
    assert small.metrics == {"skipped": "needs at least 4 probe images"} and MajorityLabel.seen_images == []
    probe = ProbeSet("toy", items, ["a", "b", "c"]).sharing_loaded_images()
    messages = []
    findings = build_detector("majority-label").run(tiny_model, probe, lambda f, m: messages.append(f))
    assert findings.metrics["seconds"] >= 0 and 0 < findings.metrics["share"] <= 1
    # the template decoded the probe once at the model's size and handed the detector those pixels
    (seen,) = MajorityLabel.seen_images
    assert seen.shape == (5, 3, tiny_model.image_size, tiny_model.image_size)
    assert seen is probe.load_images(tiny_model.image_size)
    assert messages == sorted(messages) and all(0 <= m <= 1 for m in messages)


def _inversion(label: str, alignment: float) -> Findings:
    stats = {"family": "local", "candidate": True, "anomaly": 4.5, "alignment": alignment}
    return Findings(
        [FlaggedLabel(label, 4.5, 0, 3, f"a small trigger for '{label}'")],
        [],
        [],
        [],
        metrics={"thresholds": {"anomaly": 2.0, "alignment": 0.46}},
        inverted=[InvertedTrigger(label, "trigger-inversion/local", 0.02, 0.97, 30, stats=stats)],
    )


def _majority(label: str | None) -> Findings:
    flagged = [FlaggedLabel(label, 0.9, 5, 5, "most images")] if label else []
    return Findings(flagged, [], [], [])


def test_the_verdict_is_a_vote_over_every_detectors_claims(majority_registered):
    probe = _probe()
    oracle = Findings(
        [FlaggedLabel("c", 5.0, 4, 6, "captured by a small window")],
        [TriggerCandidate("c", "t.png", 0.1, 4, 0.95, 10)],
        [],
        [],
    )
    # two detectors name 'c', one names 'b': the plug-in's vote counts like any other
    v = merge(
        {"trigger-inversion": _inversion("b", 0.30), "oracle-guided": oracle, "majority-label": _majority("c")}, probe
    )
    assert (v.verdict, v.target) == ("backdoored", "c")
    assert v.reasons == ["'c' takes 90% of the probe", "captured by a small window"]  # in vote-rank order
    assert v.trigger["detector"] == "oracle-guided" and v.trigger["verified_asr"] == 0.95
    # one vote each: the lowest vote_rank wins the tie (the plug-in's 5 before the inversion's 10)
    assert merge({"trigger-inversion": _inversion("b", 0.30), "majority-label": _majority("c")}, probe).target == "c"
    # ... and without it, the inversion's label; its trigger is the inversion's, family local
    v = merge({"trigger-inversion": _inversion("b", 0.30), "majority-label": _majority(None)}, probe)
    assert (v.target, v.family, v.trigger["detector"]) == ("b", "local", "trigger-inversion")


def test_claims_carry_each_features_margin_past_its_threshold():
    v = merge({"trigger-inversion": _inversion("b", 0.30)}, _probe())
    (claim,) = v.claims["trigger-inversion"]
    assert claim["strength"] == STRONG and claim["margins"] == pytest.approx({"anomaly": 2.5, "alignment": 0.16})
    oracle = Findings([FlaggedLabel("c", 5.0, 4, 6, "x")], [TriggerCandidate("c", "t.png", 0.1, 4, 0.6, 10)], [], [])
    (claim,) = merge({"oracle-guided": oracle}, _probe()).claims["oracle-guided"]
    assert claim["strength"] == WEAK and claim["margins"] == pytest.approx({"verified_flip": -0.2})


def test_a_detector_without_claims_is_shown_and_counts_for_nothing(majority_registered):
    class Silent(Detector):
        name = "silent"

        def examine(self, model, probe, images, progress=None):  # pragma: no cover - never run here
            raise AssertionError

    findings = _majority("c")
    assert Silent.evidence(findings, _probe()) == Evidence("silent")
    v = merge({"trigger-inversion": _inversion("b", 0.30), "unknown-detector": findings}, _probe())
    assert v.target == "b" and "unknown-detector" in v.evidence


def test_a_fallback_trigger_shows_only_when_no_first_choice_names_the_target():
    option = TriggerOption("x", "b", 0.9, {"stats": {"family": "global"}}, fallback=True)
    assert option.family == "global"
    with pytest.raises(ValueError, match="strength"):
        LabelClaim("b", "certain", "why")


def test_a_plug_in_detectors_evidence_is_stored_and_replayed_like_the_built_in_ones(majority_registered):
    from forensics.detect.evidence import Cuts, ScanEvidence, evidence_of, replay

    results = {"majority-label": _majority("c"), "trigger-inversion": _inversion("b", 0.30)}
    stored = evidence_of({"majority-label": _majority("c")}, ["a", "b", "c"])
    assert stored == {"majority-label": {"flags": [FlaggedLabel("c", 0.9, 5, 5, "most images").to_dict()]}}
    row = ScanEvidence("toy", "clean", "c", ["a", "b", "c"], evidence_of(results, ["a", "b", "c"]))
    assert replay(row, Cuts.calibrated()).target == "c"  # its claim replays (this toy inversion stored no triggers)
    DETECTORS._entries.pop(MajorityLabel.name)
    try:  # stored by a detector no longer installed: left out of the replay, not an error
        assert replay(row, Cuts.calibrated()).target is None
    finally:
        DETECTORS.register(MajorityLabel)
