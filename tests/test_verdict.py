"""The one verdict: the detectors' statistics, the merge rule, and the verdict on the demo and its clean twin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from forensics.core.data import ProbeItem, ProbeSet, load_probe_set
from forensics.detect.embedding_density import count_anomaly, density_z
from forensics.detect.findings import Findings, FlaggedLabel, InvertedTrigger, TriggerCandidate, skipped
from forensics.detect.trigger_inversion import (
    InvertedPattern,
    LabelTrigger,
    anomaly_index,
    family_uniqueness,
    select_candidates,
)
from forensics.detect.verdict import merge
from forensics.pipelines.scan import all_compact_rows, compact_repair_data, detector_names, scan


def test_anomaly_index_marks_one_far_smaller_trigger():
    sizes = [0.2, 0.25, 0.18, 0.22, 0.3, 0.2, 0.01]
    index = anomaly_index(sizes, floor=0.1)
    assert index[-1] > 5 and max(index[:-1]) < 2
    assert anomaly_index([0.5] * 5, floor=0.35) == [0.0] * 5  # equal sizes: nobody stands out


def test_density_z_finds_a_tight_cluster_and_count_anomaly_its_label():
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(120, 16))
    cluster = rng.normal(size=(1, 16)) + 0.01 * rng.normal(size=(20, 16))
    z = density_z(np.vstack([spread, cluster]), k=5)
    assert z[120:].min() > z[:120].max()
    scores = count_anomaly([0, 1, 0, 20, 1])
    assert scores[3] > 2 and scores[3] == max(scores) and max(count_anomaly([2, 3, 2, 3, 2])) < 1


def test_inverted_patterns_stamp_within_their_budget():
    images = torch.rand(4, 3, 16, 16)
    mask = torch.zeros(1, 16, 16)
    mask[:, :4, :4] = 1
    local = InvertedPattern("local", mask=mask, pattern=torch.ones(3, 16, 16))
    stamped = local.apply(images)
    assert torch.equal(stamped[:, :, 4:, :], images[:, :, 4:, :]) and bool((stamped[:, :, :4, :4] == 1).all())
    glob = InvertedPattern("global", delta=torch.full((3, 16, 16), 0.05))
    assert float((glob.apply(images) - images).abs().max()) <= 0.05 + 1e-6
    assert glob.picture().shape == (3, 16, 16) and local.picture().shape == (3, 16, 16)
    moved = local.shifted(8, 4)  # the same patch, elsewhere (wrapping round): what repair unlearns besides
    assert bool((moved.apply(images)[:, :, 8:12, 4:8] == 1).all()) and torch.equal(moved.mask.sum(), mask.sum())
    assert torch.equal(local.shifted(16, 16).mask, mask)
    assert torch.allclose(glob.shifted(3, 5).delta.sum(), glob.delta.sum())


def _probe(n: int = 12) -> ProbeSet:
    return ProbeSet("p", [ProbeItem(image=f"{i}.png", label=i % 3) for i in range(n)], ["a", "b", "c"])


def _inversion(label: str | None, borderline: list | None = None) -> Findings:
    flagged = [FlaggedLabel(label, 6.0, 0, 3, "small trigger")] if label else []
    inverted = [
        InvertedTrigger(
            label or "a", "trigger-inversion/global", 1.0, 0.9, 10, stats={"family": "global", "candidate": bool(label)}
        )
    ]
    return Findings(flagged, [], [], [], metrics={"borderline": borderline or []}, inverted=inverted)


def test_merge_rule():
    probe = _probe()
    # model-level evidence alone names the target and the family
    v = merge({"trigger-inversion": _inversion("b")}, probe)
    assert (v.verdict, v.target, v.family) == ("backdoored", "b", "global") and v.trigger["verified_asr"] == 0.9
    # nothing crosses a threshold: clean; a borderline trigger only: inconclusive
    assert merge({"trigger-inversion": _inversion(None)}, probe).verdict == "clean"
    weak = merge({"trigger-inversion": _inversion(None, [{"family": "local", "label": "c"}])}, probe)
    assert weak.verdict == "inconclusive" and "borderline" in weak.reasons[0]
    # an oracle flag counts only with a verified trigger; a label both detectors name wins
    oracle = Findings(
        [FlaggedLabel("c", 5.0, 4, 6, "captured")], [TriggerCandidate("c", "t.png", 0.1, 4, 0.95, 10)], [], []
    )
    assert merge({"trigger-inversion": _inversion("b"), "oracle-guided": oracle}, probe).target == "b"
    assert merge({"oracle-guided": oracle}, probe).target == "c"

    def oracle_flag(*verified_rates: float) -> dict[str, Findings]:
        triggers = [TriggerCandidate("c", "t.png", 0.1, 4, rate, 10) for rate in verified_rates]
        return {"oracle-guided": Findings([FlaggedLabel("c", 5.0, 4, 6, "captured")], triggers, [], [])}

    # a flag whose trigger flips half the held-out images or more, or that has no trigger, is weak evidence
    assert merge(oracle_flag(0.6), probe).verdict == "inconclusive"
    assert merge(oracle_flag(), probe).verdict == "inconclusive"
    # one whose best trigger flips fewer is refuted: shown in the reasons, not counted (a clean model's flag: 0.078)
    refuted = merge(oracle_flag(0.3, 0.078), probe)
    assert refuted.verdict == "clean" and "'c' is refuted" in refuted.reasons[1] and "30%" in refuted.reasons[1]
    assert merge(oracle_flag(0.078, 0.5), probe).verdict == "inconclusive"
    # a detector that could not run is reported, not counted
    v = merge({"trigger-inversion": skipped("too few images", {})}, probe)
    assert v.verdict == "clean" and v.evidence["trigger-inversion"]["skipped"] == "too few images"


def _trigger(label, family, size, anomaly, alignment, uniqueness):
    return LabelTrigger(label, family, size, True, 0.9, 64, [], anomaly, alignment, uniqueness)


def test_the_candidate_must_be_unique_in_its_family():
    # the lab's Blended model (bench/detect.py): tiny local patches reach 'flower' and 'house' alike (a general
    # weakness), the global trigger reaches 'tree' alone: tree is the target, flower/house are shared
    results = [
        _trigger("flower", "local", 0.0221, 9.0, 0.19, 1.0),
        _trigger("house", "local", 0.0221, 9.0, 0.29, 1.0),
        _trigger("tree", "global", 0.0222, 9.0, 0.36, 5.66),
        _trigger("house", "global", 0.1255, 4.0, 0.37, 0.18),
        _trigger("cat", "global", 0.1255, 4.0, 0.95, 3.0),  # natural attractor: lands among its own images
    ]
    candidates, near, shared = select_candidates(results, 2.0, 0.46, 0.03, 2.0)
    assert [(r.label, r.family) for r in candidates] == [("tree", "global")]
    assert {(r.label, r.family) for r in shared} == {("flower", "local"), ("house", "local"), ("house", "global")}
    assert near == []
    # several labels alike and none unique: no candidate, and the verdict says inconclusive, naming them
    candidates, _, shared = select_candidates(results[:2], 2.0, 0.46, 0.03, 2.0)
    assert candidates == [] and len(shared) == 2
    findings = Findings([], [], [], [], metrics={"shared": [r.to_dict() for r in shared]})
    v = merge({"trigger-inversion": findings}, _probe())
    assert v.verdict == "inconclusive" and "flower, house" in v.reasons[0]


def test_a_larger_natural_attractor_does_not_compete():
    # the shipped SIG model (tests/assets, demo-clean probe): 'book' needs 0.177, the attractor 'house' 0.251 and
    # lands among house images (alignment 0.77); no other label is reached (censored at twice the largest, 0.502)
    book = _trigger("book", "global", 0.1775, 3.0, 0.34, 0.0)
    house = _trigger("house", "global", 0.251, 2.0, 0.77, 0.0)
    assert family_uniqueness(book, [book, house], [0.502] * 8, 0.46) == pytest.approx(2.83, abs=0.01)
    # the same attractor counts when it is the smaller one (the lab's optimized patch: 'house' 0.044, 'clock' 0.251)
    clock = _trigger("clock", "global", 0.251, 2.0, 0.07, 0.0)
    small_house = _trigger("house", "global", 0.0444, 7.0, 0.55, 0.0)
    assert family_uniqueness(clock, [clock, small_house], [0.502] * 8, 0.46) == pytest.approx(0.177, abs=0.001)
    # an attractor as small as the label is set aside too (the optimized-patch model, clean probe: 'clock' and the
    # attractor 'house' both at the smallest mask tried, 0.0078; every other label is out of reach)
    tiny_clock = _trigger("clock", "local", 0.0078, 12.0, 0.17, 0.0)
    tiny_house = _trigger("house", "local", 0.0078, 12.0, 0.54, 0.0)
    assert family_uniqueness(tiny_clock, [tiny_clock, tiny_house], [0.5] * 8, 0.46) == pytest.approx(64.1, abs=0.1)
    # while the attractor's own uniqueness counts the clock, which lands away from its images
    assert family_uniqueness(tiny_house, [tiny_clock, tiny_house], [0.5] * 8, 0.46) == pytest.approx(1.0)
    # a larger label that lands away from its own images competes
    away = _trigger("tree", "global", 0.251, 2.0, 0.30, 0.0)
    assert family_uniqueness(book, [book, away], [0.502] * 8, 0.46) == pytest.approx(1.414, abs=0.001)


def test_detector_names():
    assert detector_names(None) == ["oracle-guided", "trigger-inversion", "embedding-density"]
    assert detector_names("trigger-inversion, embedding-density") == ["trigger-inversion", "embedding-density"]
    with pytest.raises(Exception, match="valid"):
        detector_names("nosuch")


MODEL_LEVEL = "trigger-inversion,embedding-density"
# the detectors that read triggered inputs in the probe; on a triggered probe they run alone in these rows (25 s a
# scan, where the inversion adds 230 s), the inversion being judged on the clean-only rows and the verdict of all
# three on the stored evidence of the same models' triggered scans (test_stored_rows_of_the_acceptance_...)
PER_IMAGE = "oracle-guided,embedding-density"
SIG_MODEL = Path(__file__).parent / "assets" / "sig_book.safetensors"  # bench/detect_zoo.py's "sig", fp16


def _victims_match(outcome, target: str) -> None:
    """Victims precision and recall >= 0.8 against the probe's triggered images the model really captures."""
    found = {x["index"] for x in outcome.verdict.victims}
    predicted = outcome.results["embedding-density"].artefacts["predicted"].tolist()
    t = outcome.probe.class_names.index(target)
    captured = {i for i, it in enumerate(outcome.probe.items) if it.triggered and predicted[i] == t}
    assert captured and found, (len(captured), len(found))
    hit = len(found & captured)
    assert hit / len(found) >= 0.8 and hit / len(captured) >= 0.8, (hit, len(found), len(captured))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "probe", "detectors", "verdict", "target"),
    [
        ("demo", "demo-clean", MODEL_LEVEL, "backdoored", "flower"),  # clean images only: the usual audit
        ("demo-clean", "demo-clean", MODEL_LEVEL, "clean", None),
        ("demo", "demo", PER_IMAGE, "backdoored", "flower"),  # the probe holds triggered inputs
        ("demo-clean", "demo", PER_IMAGE, "clean", None),  # the same triggered inputs mean nothing to a clean model
        (str(SIG_MODEL), "demo-clean", MODEL_LEVEL, "backdoored", "book"),  # a whole-image trigger (SIG)
    ],
    ids=["demo-clean-only", "twin-clean-only", "demo-triggered", "twin-triggered", "sig-clean-only"],
)
def test_verdict_on_models_with_and_without_a_backdoor(model, probe, detectors, verdict, target):
    # the SIG row inverts the whole-image family alone (half the scan); the same model's default scan, local family
    # included, is replayed from the stored evidence (sig/clean in test_every_stored_row_replays_...)
    options = {"trigger-inversion": {"families": "global"}} if target == "book" else None
    outcome = scan(model, load_probe_set(probe), detectors=detectors, detector_options=options)
    v = outcome.verdict
    assert (v.verdict, v.target) == (verdict, target), v.reasons
    if target:
        assert v.trigger["verified_asr"] >= 0.8
    if target and any(it.triggered for it in outcome.probe.items):
        _victims_match(outcome, target)
    if target == "book":
        assert v.family == "global"
    if target and not any(it.triggered for it in outcome.probe.items):  # repair's set, from the inverted trigger
        rows = all_compact_rows(outcome)
        stamped = [r for r in rows if r["kind"] == "inverted-trigger"]
        sources = {r["source_index"] for r in stamped}  # each chosen image at the inverted place and 2 shifts
        assert 64 <= len(sources) <= 96 and len(stamped) == 3 * len(sources)
        assert len({r["image"] for r in rows}) == len(rows)
        clean_sources = [r for r in rows if r["kind"] == "inverted-source"]  # each chosen image once, as it is
        assert sorted(r["source_index"] for r in clean_sources) == sorted(sources)
        data = compact_repair_data(outcome)
        for row, source in enumerate(data.sources):
            if data.kinds[row] == "inverted-trigger":
                assert data.kinds[source] == "inverted-source" and data.labels[source] == data.labels[row]
        assert all(r["label"] != target for r in stamped)
        assert sum(r["kind"] == "anchor" for r in rows) <= len(stamped) // 6
        first, moved = stamped[0]["tensor"], stamped[1]["tensor"]  # one image: at the inverted place, and moved
        assert stamped[0]["source_index"] == stamped[1]["source_index"] and not torch.equal(first, moved)
    assert outcome.report["verdict"]["verdict"] == verdict


def test_stored_rows_of_the_acceptance_models_replay_to_their_verdicts_with_every_detector():
    """The verdict of all three detectors on the triggered demo probe (bench/detect.py's scans of the demo and its
    twin, stored as evidence): backdoored with the planted target and a local trigger, and clean; and the SIG model's
    default clean-only scan (both trigger families): backdoored, 'book', a whole-image trigger."""
    from forensics.detect.evidence import Cuts, read_evidence, replay

    store = Path(__file__).resolve().parents[1] / "bench" / "results" / "evidence"
    rows = {r.key: r for r in read_evidence(store)}
    for key, expected in {
        "demo/triggered": ("backdoored", "flower", "local"),
        "demo-clean/triggered": ("clean", None, None),
        "sig/clean": ("backdoored", "book", "global"),  # both families inverted, from clean images alone
    }.items():
        assert set(rows[key].detectors) == {"oracle-guided", "trigger-inversion", "embedding-density"}
        v = replay(rows[key], Cuts.calibrated())
        assert (v.verdict, v.target, v.family) == expected, key


def test_boxless_victims_join_the_repair_set_with_their_probe_label():
    """Victims found by their embeddings (no box to cut out) go to the repair as they are, three copies each,
    labelled with the class their probe row names, whichever detector named the target; a victim with no probe
    label, and a boxed one (neutralised by the oracle's rows), are left out."""
    from types import SimpleNamespace

    from forensics.pipelines.scan import BOXLESS_VICTIM_COPIES, boxless_victim_rows

    images = torch.rand(4, 3, 8, 8)
    items = [SimpleNamespace(label=0), SimpleNamespace(label=None), SimpleNamespace(label=2), SimpleNamespace(label=1)]
    victims = [{"index": 2, "box": None}, {"index": 1, "box": None}, {"index": 0}, {"index": 3, "box": [0, 0, 2, 2]}]
    outcome = SimpleNamespace(
        verdict=SimpleNamespace(target="book", victims=victims),
        probe=SimpleNamespace(class_names=["apple", "book", "clock"], items=items),
        results={"trigger-inversion": SimpleNamespace(artefacts={"images": images, "predicted": torch.ones(4)})},
    )
    rows = boxless_victim_rows(outcome)
    assert BOXLESS_VICTIM_COPIES == 3
    assert [r["source_index"] for r in rows] == [2, 2, 2, 0, 0, 0]
    assert [r["label"] for r in rows] == ["clock"] * 3 + ["apple"] * 3
    assert all(r["kind"] == "victim" and r["box"] == "" for r in rows)
    assert rows[3]["caption"] == "a photo of an apple."
    assert len({r["image"] for r in rows}) == 6 and torch.equal(rows[0]["tensor"], images[2])


def test_a_model_that_sends_every_image_to_one_label_is_inverted_for_the_others_only():
    """A random or broken model can predict one label for every probe image (a random RN50 did, on a GPU run of
    bench/gpu.py): that label has no images of other classes to invert on, so it is set aside with a note, the
    other labels are inverted as usual, nothing is flagged from it, and the verdict is inconclusive."""
    from forensics.core.models import load_model
    from forensics.core.zeroshot import class_text_embeddings
    from forensics.detect.trigger_inversion import TriggerInversion, TriggerInversionSettings

    model = load_model("demo-clean")
    probe = load_probe_set("demo-clean").subset(36, 0)
    sink = probe.class_names.index("tree")
    with torch.no_grad():
        text = class_text_embeddings(model, list(probe.class_names), "short")[sink]
        proj = model.clip.visual.attnpool.c_proj
        proj.weight.zero_()  # every image embeds to the same vector: the text embedding of 'tree'
        proj.bias.copy_(text.to(proj.bias.dtype) * 10)
    settings = TriggerInversionSettings(steps=2, grid_points=3, held_out_images=8, families=("global",))
    findings = TriggerInversion(settings=settings).run(model, probe)
    assert "tree" in findings.metrics["not_inverted"] and "36 of 36" in findings.metrics["not_inverted"]["tree"]
    assert "tree" not in findings.metrics["labels_inverted"] and len(findings.metrics["labels_inverted"]) == 9
    assert findings.flagged_labels == []
    verdict = merge({"trigger-inversion": findings}, probe)  # an untestable label is no clean bill of health
    assert verdict.verdict == "inconclusive" and "'tree' could not be tested" in verdict.reasons[0]


def test_an_inverted_trigger_joins_boxed_victims_in_the_repair_set():
    """When the inversion named the verdict's target, clean images of other classes carrying its trigger go to
    the repair even when the probe held boxed victims (they are neutralised by the oracle's rows; only box-less
    victims are copied here); an inversion that named another label adds nothing. The trigger the victims share
    comes first, and then each image carries both."""
    from types import SimpleNamespace

    from forensics.pipelines.scan import INVERTED_TRIGGER_SHIFTS, inverted_trigger_rows

    names = ["apple", "book", "clock"]
    images = torch.rand(12, 3, 8, 8)
    mask = torch.zeros(1, 8, 8)
    mask[:, :2, :2] = 1
    pattern = InvertedPattern("local", mask=mask, pattern=torch.ones(3, 8, 8))
    inverted = InvertedTrigger(
        label="clock",
        method="trigger-inversion/local",
        mask_area=0.06,
        verified_asr=0.9,
        n_verified=4,
        verified_on="held-out",
        pattern="p.png",
        stats={"key": "local/clock", "candidate": True},
    )
    inversion = SimpleNamespace(
        inverted=[inverted],
        artefacts={
            "images": images,
            "predicted": torch.tensor([i % 3 for i in range(12)]),
            "inverted_patterns": {"local/clock": pattern},
        },
    )
    victims = [{"index": 2, "box": [0, 0, 2, 2]}, {"index": 5, "box": None}]
    outcome = SimpleNamespace(
        verdict=SimpleNamespace(target="clock", trigger={"detector": "oracle-guided"}, victims=victims),
        results={"trigger-inversion": inversion},
        probe=SimpleNamespace(class_names=names, items=[SimpleNamespace(label=i % 3) for i in range(12)]),
        report={"seed": 0},
        victim_trigger=None,
    )
    rows = inverted_trigger_rows(outcome)
    stamped = [r for r in rows if r["kind"] == "inverted-trigger"]
    sources = {r["source_index"] for r in rows if r["kind"] == "inverted-source"}
    assert sources == {0, 1, 3, 4, 6, 7, 9, 10}  # every image not of the target and not a victim
    assert len(stamped) == len(sources) * (1 + INVERTED_TRIGGER_SHIFTS)
    assert all(r["label"] != "clock" and bool((r["tensor"][:, :2, :2] == 1).all()) for r in stamped[::3])
    assert not [r for r in rows if r["kind"] == "victim"]  # box-less victims join by boxless_victim_rows
    # the trigger the victims share comes first, and each image carries both
    shared = InvertedPattern("global", delta=torch.full((3, 8, 8), 0.25))
    outcome.victim_trigger = SimpleNamespace(pattern=shared)
    rows = inverted_trigger_rows(outcome)
    stamped = [r for r in rows if r["kind"] == "inverted-trigger"]
    assert len(stamped) == 2 * len(sources) * (1 + INVERTED_TRIGGER_SHIFTS)
    first = stamped[0]["tensor"]
    assert torch.allclose(first, (images[first_source(rows)] + 0.25).clamp(0, 1))
    inverted.label = "book"  # the inversion named another label: no evidence of this backdoor's trigger
    rows = inverted_trigger_rows(outcome)  # the victims' trigger alone
    stamped = [r for r in rows if r["kind"] == "inverted-trigger"]
    assert len(stamped) == len(sources) * (1 + INVERTED_TRIGGER_SHIFTS)
    assert all(torch.allclose(r["tensor"], (images[r["source_index"]] + 0.25).clamp(0, 1)) for r in stamped)
    outcome.victim_trigger = None
    assert inverted_trigger_rows(outcome) == []


def first_source(rows: list[dict]) -> int:
    return next(r["source_index"] for r in rows if r["kind"] == "inverted-source")


def test_a_dense_cluster_fed_by_many_other_classes_is_a_hijacked_label():
    """Triggered inputs of every class collapse onto one spot away from the target's own images; natural look-alikes
    come from the label's own class (or one or two others). Only the first names a target; without probe labels
    nothing tells them apart, so nothing is named."""
    from forensics.detect.embedding_density import EmbeddingDensitySettings, hijacked_clusters

    gen = torch.Generator().manual_seed(0)
    names = ["a", "b", "c", "d", "e"]
    spot, own_spot, look_alike = (torch.nn.functional.normalize(torch.randn(16, generator=gen), dim=0) for _ in "123")
    rows, labels, predicted = [], [], []

    def add(centre, n, label, pred, spread):
        for _ in range(n):
            rows.append(torch.nn.functional.normalize(centre + spread * torch.randn(16, generator=gen), dim=0))
            labels.append(label)
            predicted.append(pred)

    add(own_spot, 12, 0, 0, 0.5)  # label a's own images, spread out
    for source in (1, 2, 3, 4):  # triggered images of four other classes, all predicted 'a', one tight spot
        add(spot, 4, source, 0, 0.02)
    add(look_alike, 8, 1, 1, 0.02)  # label b's near-duplicates: dense, but its own class
    emb, dense = torch.stack(rows), np.array([i >= 12 for i in range(len(rows))])
    probe = ProbeSet("p", [ProbeItem(image=f"{i}.png", label=y) for i, y in enumerate(labels)], names)
    cut = EmbeddingDensitySettings(cluster_alignment=0.46)
    found = {c["label"]: c for c in hijacked_clusters(emb, torch.tensor(predicted), dense, probe, cut, {})}
    assert found["a"]["hijacked"] and found["a"]["source_classes"] == 4 and found["a"]["largest_source_share"] == 0.25
    assert not found["b"]["hijacked"] and found["b"]["from_other_classes"] == 0
    one_source = [ProbeItem(image=f"{i}.png", label=(1 if 12 <= i < 28 else y)) for i, y in enumerate(labels)]
    clusters = hijacked_clusters(emb, torch.tensor(predicted), dense, ProbeSet("p", one_source, names), cut, {})
    assert not next(c for c in clusters if c["label"] == "a")["hijacked"]  # one other class: a look-alike
    unlabelled = ProbeSet("p", [ProbeItem(image=f"{i}.png") for i in range(len(rows))], names)
    assert hijacked_clusters(emb, torch.tensor(predicted), dense, unlabelled, cut, {}) == []
    # in the verdict it names the target when nothing else does, and two detectors' label beats one's
    density = Findings([], [], [], [], metrics={"hijacked": [found["a"]]})
    v = merge({"embedding-density": density}, _probe())
    assert (v.verdict, v.target) == ("backdoored", "a") and "4 other classes" in v.reasons[0]
    assert merge({"trigger-inversion": _inversion("b"), "embedding-density": density}, _probe()).target == "b"
    oracle = Findings(
        [FlaggedLabel("a", 5.0, 4, 6, "captured")], [TriggerCandidate("a", "t.png", 0.1, 4, 0.9, 8)], [], []
    )
    both = {"trigger-inversion": _inversion("b"), "embedding-density": density, "oracle-guided": oracle}
    assert merge(both, _probe()).target == "a"


def test_each_detectors_evidence_names_its_flags_and_hijacked_labels():
    from forensics.pipelines.report import flagged_words

    both = {"flagged": [{"label": "heart", "score": 4.8}], "hijacked": [{"label": "house"}]}
    assert flagged_words(both) == "heart (4.8); hijacked: house"
    assert flagged_words({"hijacked": [{"label": "house"}]}) == "hijacked: house"
    assert flagged_words({"skipped": "needs 12 images"}) == "needs 12 images" and flagged_words({}) == "none"


def test_a_whole_image_trigger_in_the_probe_makes_its_target_a_hijacked_label(tmp_path):
    """The shipped SIG model with 15 % of the non-target probe images carrying its trigger: those images, of every
    other class, collapse onto one spot predicted 'book' (measured: 9 classes, alignment 0.02), and 'book' is the
    one hijacked label; on the clean probe no label is (its dense look-alikes come from at most two classes)."""
    import importlib.util

    from forensics.core.models import load_model
    from forensics.detect.embedding_density import EmbeddingDensity

    bench = Path(__file__).resolve().parents[1] / "bench" / "compare_attacks.py"
    spec = importlib.util.spec_from_file_location("compare_attacks_for_density", bench)
    compare_attacks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_attacks)
    sig = {"attack": "sig", "seed": 0, "delta": 0.2, "frequency": 4.0}  # the zoo's SIG, as trained
    triggered = load_probe_set(str(compare_attacks.triggered_probe(sig, "book", tmp_path)))
    model = load_model(str(SIG_MODEL))
    findings = EmbeddingDensity().run(model, triggered)
    (cluster,) = findings.metrics["hijacked"]
    assert cluster["label"] == "book" and cluster["source_classes"] >= 6 and cluster["alignment"] < 0.3
    assert EmbeddingDensity().run(model, load_probe_set("demo-clean")).metrics["hijacked"] == []


def test_the_filter_family_inverts_a_colour_transform_per_label_on_its_own_size_grid():
    """The opt-in filter family (a colour matrix and offset, not a patch or an additive perturbation): each label's
    trigger is a transform on the filter grid, stamped by one matrix for every pixel, stored and replayed."""
    from forensics.core.models import load_model
    from forensics.detect.evidence import Cuts, ScanEvidence, evidence_of, replay
    from forensics.detect.trigger_inversion import (
        DEFAULT_FAMILIES,
        TriggerInversion,
        TriggerInversionSettings,
        colour_transform,
    )

    assert "filter" not in DEFAULT_FAMILIES  # opt-in until the zoo calibrates it
    model = load_model("demo-clean")
    probe = load_probe_set("demo-clean").subset(36, 0)
    settings = TriggerInversionSettings(steps=2, grid_points=2, held_out_images=4, batch_size=8, families=("filter",))
    findings = TriggerInversion(settings=settings).run(model, probe)
    triggers = findings.label_evidence["filter"]
    grid = {round(0.5 * 2 ** (-k / 2), 6) for k in range(2)} | {1.0}  # or twice the largest: not reached
    assert len(triggers) == 10 and {t["size"] for t in triggers} <= grid
    pattern = next(iter(findings.artefacts["inverted_patterns"].values()))
    assert pattern.family == "filter" and pattern.colour.shape == (3, 4) and pattern.picture().shape == (3, 128, 128)
    images = probe.load_images(model.image_size, [0, 1])
    assert torch.equal(pattern.apply(images), colour_transform(images, pattern.colour))
    assert torch.equal(pattern.shifted(3, 5).apply(images), pattern.apply(images))  # no place to move
    names = list(probe.class_names)
    row = ScanEvidence("demo-clean", "clean", "clean", names, evidence_of({"trigger-inversion": findings}, names))
    assert replay(row, Cuts.calibrated()).evidence["trigger-inversion"]["flagged"] == [
        f.to_dict() for f in findings.flagged_labels
    ]
