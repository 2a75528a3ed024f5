"""The scan's pictures: each trigger at work on a clean probe image (with the model's answers), the victims with their
trigger box, each detector's per-label score against its threshold; written beside report.json, named in its
``pictures`` index, shown in report.html (escaped) and handed to the Findings tab."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from forensics.attacks import build_attack
from forensics.core.data import demo_backdoor, load_probe_set
from forensics.core.models import ModelRef
from forensics.detect.findings import Findings, InvertedTrigger
from forensics.detect.trigger_inversion import InvertedPattern
from forensics.pipelines.pictures import (
    boxed,
    oracle_label_scores,
    pictures_from_report,
    scan_pictures,
    score_figures,
)
from forensics.pipelines.report import threshold_words

LABEL = "flower<svg onload=alert(1)>"


@pytest.fixture(scope="module")
def demo():
    model = ModelRef("demo").load()
    probe = load_probe_set("demo").subset(40)
    return model, probe


def _checkerboard(size: int) -> torch.Tensor:
    spec = demo_backdoor()["trigger"]
    attack = build_attack("badnet", **{k: v for k, v in spec.items() if k != "attack"})
    return attack.checkerboard(max(2, round(spec["size"] * size)))


def _outcome(model, probe, victims: list[dict]) -> SimpleNamespace:
    """A scan in memory as write_scan sees it: the demo's real trigger as an inverted local trigger (its mask at
    the bottom-right) and as the oracle scan's reconstructed patch; the report's victims and detector evidence."""
    size = model.image_size
    patch = _checkerboard(size)
    side = patch.shape[-1]
    mask = torch.zeros(1, size, size)
    mask[:, size - side - 4 : size - 4, size - side - 4 : size - 4] = 1
    pattern = torch.full((3, size, size), 0.5)
    pattern[:, size - side - 4 : size - 4, size - side - 4 : size - 4] = patch
    inverted = InvertedTrigger(
        "flower", "trigger-inversion/local", 0.01, 0.95, 20, stats={"family": "local", "key": "local/flower"}
    )
    inversion = Findings([], [], [], [], inverted=[inverted])
    inversion.artefacts = {"inverted_patterns": {"local/flower": InvertedPattern("local", mask=mask, pattern=pattern)}}
    oracle = Findings([], [], [], [], settings={}, artefacts={"patterns": {"trigger_0_flower.png": {"pattern": patch}}})
    names = list(probe.class_names)
    label_evidence = {
        "local": [{"label": n, "anomaly": 3.5 if n == "flower" else 0.2, "alignment": 0.3} for n in names],
        "global": [{"label": n, "anomaly": 0.4, "alignment": 0.7} for n in names],
    }
    report = {
        "seed": 0,
        "probe": {"classes": names, "images": len(probe)},
        "images": [{"predicted": names[i % len(names)], "captured": i < 5} for i in range(len(probe))],
        "settings": {"min_flag_count": 3, "min_flag_share": 0.02, "flag_ratio": 3.0},
        "triggers": [{"label": "flower", "pattern": "trigger_0_flower.png", "verified_asr": 0.9, "n_verified": 16}],
        "victims": victims,
        "verdict": {
            "verdict": "backdoored",
            "target": "flower",
            "victims": victims,
            "evidence": {
                "oracle-guided": {"flagged": [{"label": "flower", "score": 0.8}], "thresholds": None},
                "trigger-inversion": {"flagged": [{"label": "flower", "score": 3.5}]},
                "embedding-density": {"flagged": []},
            },
        },
        "detectors": {
            "trigger-inversion": {
                "label_evidence": label_evidence,
                "metrics": {"thresholds": {"anomaly": 2.0, "alignment": 0.46, "uniqueness": 2.0}},
            },
            "embedding-density": {
                "label_evidence": {
                    "labels": [{"label": n, "anomaly": 1.0 if n == "flower" else 0.0} for n in names],
                    "clusters": [{"label": "flower", "alignment": 0.2, "hijacked": True}],
                },
                "metrics": {"thresholds": {"label": 3.0, "victim_z": 2.0, "cluster_alignment": 0.53}},
            },
        },
    }
    return SimpleNamespace(
        model=model,
        probe=probe,
        findings=oracle,
        results={"trigger-inversion": inversion},
        victim_trigger=None,
        report=report,
    )


def test_each_trigger_is_drawn_at_work_on_a_clean_image(demo):
    model, probe = demo
    victims = [{"index": 0, "label": "flower", "box": [100, 100, 113, 113], "found_by": ["oracle-guided"]}]
    victims.append({"index": 1, "label": "flower", "box": None, "found_by": ["embedding-density"]})
    pictures = scan_pictures(_outcome(model, probe, victims), probe.load_images(model.image_size))
    shown = pictures.index["triggers"]
    assert [t["source"] for t in shown] == ["inverted local trigger", "patch rebuilt from the victims' crops"]
    for t in shown:
        # the demo's own trigger, stamped on a clean image of another class, sends it to 'flower'
        assert t["before"] != "flower" and t["after"] == "flower" and t["after_p"] > 0.5, t
        assert t["image_index"] not in (0, 1)  # never a victim
        true = probe.items[t["image_index"]].label
        assert true is None or probe.class_names[true] == t["before"]  # an image the model gets right
        assert "it flips" in t["caption"] and f"stamped 'flower' ({t['after_p']:.2f})" in t["caption"]
        image = pictures.files[t["file"]]
        assert 450 <= image.width <= 800 and 150 <= image.height <= 320, image.size  # three panels side by side
    assert sorted(pictures.index["scores"]) == ["embedding-density", "oracle-guided", "trigger-inversion"]
    for name, file in pictures.index["scores"].items():
        assert pictures.files[file].width >= 350 and pictures.files[file].height >= 150, name
    assert [v["index"] for v in pictures.index["victims"]] == [0, 1]
    assert pictures.index["victims"][1]["caption"] == "#1 → flower (found by embedding-density)"
    grid = pictures.files[pictures.index["victims_grid"]]
    assert grid.width > 600 and grid.height > 100


def test_the_trigger_the_victims_share_is_drawn_first(demo):
    model, probe = demo
    outcome = _outcome(model, probe, [])
    inversion = outcome.results["trigger-inversion"]
    pattern = inversion.artefacts["inverted_patterns"]["local/flower"]
    shared = SimpleNamespace(label="flower", verified_asr=1.0)
    outcome.victim_trigger = SimpleNamespace(trigger=shared, pattern=pattern)
    pictures = scan_pictures(outcome, probe.load_images(model.image_size))
    sources = [t["source"] for t in pictures.index["triggers"]]
    assert sources[0] == "the trigger the victims share" and "inverted local trigger" in sources[1:]


def test_a_victim_is_drawn_with_its_trigger_box_in_red():
    image = torch.zeros(3, 32, 32)
    drawn = np.asarray(boxed(image, [10, 10, 20, 20], scale=2))
    assert drawn.shape == (64, 64, 3)
    red = (drawn[..., 0] > 200) & (drawn[..., 1] < 60)
    assert red.any() and not red[24:36, 24:36].any()  # around the trigger, not over it
    ys, xs = np.nonzero(red)
    assert xs.min() < 20 and xs.max() >= 40 and ys.min() < 20 and ys.max() >= 40
    assert not (np.asarray(boxed(image, None)) > 0).any()  # no box, no red


def test_the_oracle_scans_score_and_cut_per_label():
    report = {
        "probe": {"classes": ["a", "b", "c", "d"]},
        "settings": {"min_flag_count": 3, "min_flag_share": 0.02, "flag_ratio": 3.0},
        "images": [{"predicted": "a", "captured": True}] * 9 + [{"predicted": "b", "captured": True}] * 1,
    }
    names, captured, cuts = oracle_label_scores(report)
    assert names == ["a", "b", "c", "d"] and captured == [9, 1, 0, 0]
    assert cuts == [3.0, 3.0, 3.0 * (1 + 1), 3.0 * (1 + 1)]  # 3 x (median of the others + 1), at least 3
    assert oracle_label_scores({"images": []}) is None
    assert score_figures({}) == {}


def test_thresholds_read_as_words():
    words = threshold_words({"anomaly": 2.0, "alignment": 0.46, "uniqueness": 2.0})
    assert words == (
        "anomaly index >= 2; alignment with the label's own images <= 0.46; "
        "next label's trigger size over this one >= 2"
    )
    assert threshold_words({"cluster_alignment": 0.53, "new_cut": 1}) == (
        "cluster alignment with the label's own images <= 0.53; new_cut = 1"
    )
    assert threshold_words(None) == "" and "{" not in threshold_words({"a": {"b": 1.5}})


def test_write_scan_writes_the_pictures_and_report_html_shows_them_escaped(demo, tmp_path):
    """A real quick look on the demo, written: the pictures exist, are images of the right size, are named in
    report.json, embedded in report.html with escaped captions; the Findings tab's galleries get them."""
    from forensics.pipelines.scan import scan, write_scan

    model, probe = demo
    outcome = scan(model, probe, detectors="oracle-guided,embedding-density", profile="quick", max_images=24)
    names = list(probe.class_names)
    outcome.report["verdict"]["victims"] = [  # a hostile label must reach the page as text
        {**v, "label": LABEL} for v in outcome.report["verdict"]["victims"]
    ] or [{"index": 0, "image": str(probe.items[0].image), "label": LABEL, "box": None, "found_by": ["x"]}]
    out = tmp_path / "scan"
    write_scan(outcome, out)
    report = json.loads((out / "report.json").read_text())
    index = report["pictures"]
    assert set(index) == {"triggers", "victims", "victims_grid", "scores"}
    assert set(index["scores"]) == {"oracle-guided", "embedding-density"}
    for file in [*index["scores"].values(), index["victims_grid"], *(v["file"] for v in index["victims"])]:
        with Image.open(out / file) as image:
            assert image.width >= 100 and image.height >= 100, file
    for t in index["triggers"]:
        with Image.open(out / t["file"]) as image:
            assert image.width > 2 * image.height  # clean | trigger | stamped
        assert t["before"] in names and t["after"] in names
    page = (out / "report.html").read_text()
    from tests.test_report_escaping import assert_inert

    assert_inert(page, [LABEL])  # in the victims' table, as text
    assert "&lt;svg" in page and "<svg" not in page
    assert page.count('alt="oracle-guided: per-label score') == 1 and page.count('alt="embedding-density: per') == 1
    assert page.count('alt="the victims, with the trigger') == 1
    assert page.count("data:image/png;base64,") >= 3 + len(index["triggers"])
    # the Findings tab's galleries: what pictures_from_report lists for the written folder
    shown = pictures_from_report(report, out)
    assert [p for p, _ in shown["scores"]] == [str(out / f) for f in index["scores"].values()]
    assert len(shown["victims"]) == len(index["victims"]) and len(shown["triggers"]) == len(index["triggers"])
    assert shown["grid"] == [(str(out / index["victims_grid"]), "victims")]


def test_a_report_without_pictures_falls_back_to_its_pattern_files(tmp_path):
    """A report.json read back from before pictures existed: the trigger pattern files and the victims' images."""
    (tmp_path / "inverted").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "inverted" / "local_flower.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "trigger_0_flower_preview.png")
    report = {
        "detectors": {
            "trigger-inversion": {
                "inverted_triggers": [
                    {"label": "flower", "pattern": "inverted/local_flower.png", "verified_asr": 0.9},
                    {"label": "gone", "pattern": "inverted/missing.png", "verified_asr": 0.1},
                ]
            }
        },  # fmt: skip
        "triggers": [{"label": "flower", "pattern": "trigger_0_flower.png", "verified_asr": 0.8}],
        "victims": [{"index": 3, "image": "/x/y.png", "label": "flower"}],
        "verdict": {},
    }
    shown = pictures_from_report(report, tmp_path)
    assert [c for _, c in shown["triggers"]] == ["flower: flips 90% (the pattern alone)", "flower: flips 80%"]
    assert shown["victims"] == [("/x/y.png", "#3 → flower")] and shown["scores"] == [] and shown["grid"] == []


def test_the_verdict_section_embeds_the_pictures_with_escaped_captions(tmp_path):
    from forensics.pipelines.report import verdict_section, write_html
    from tests.test_report_escaping import assert_inert

    (tmp_path / "pictures").mkdir()
    for name in ("t.png", "s.png", "v.png"):
        Image.new("RGB", (12, 12)).save(tmp_path / "pictures" / name)
    caption = f"inverted local trigger for '{LABEL}'"
    report = {
        "probe": {"images": 10},
        "detector_profile": "default",
        "verdict": {
            "verdict": "backdoored",
            "target": LABEL,
            "family": "local",
            "trigger": None,
            "reasons": [],
            "victims": [{"index": 1, "image": "x.png", "label": LABEL, "box": None, "found_by": ["d"]}],
            "evidence": {"trigger-inversion": {"flagged": [], "thresholds": {"anomaly": 2.0, "alignment": 0.46}}},
        },
        "pictures": {
            "triggers": [{"file": "pictures/t.png", "caption": caption}],
            "scores": {"trigger-inversion": "pictures/s.png", LABEL: "pictures/missing.png"},
            "victims_grid": "pictures/v.png",
            "victims": [],
        },
    }
    name, content = verdict_section(tmp_path, report)
    write_html(tmp_path / "report.html", "scan", {}, [(name, content)])
    page = (tmp_path / "report.html").read_text()
    assert_inert(page, [caption, "anomaly index >= 2; alignment with the label's own images <= 0.46"])
    assert page.count("<img ") == 3  # the trigger at work, one score plot (the missing file is left out), the grid
    assert 'alt="inverted local trigger for &#x27;flower&lt;svg' in page
    assert "Backdoored: this model sends images carrying a small-patch trigger" in page  # the plain verdict on top


def test_a_sheet_stacks_the_pictures_whole(tmp_path):
    from forensics.pipelines.pictures import picture_sheet

    Image.new("RGB", (300, 100), "red").save(tmp_path / "a.png")
    Image.new("RGB", (200, 50), "blue").save(tmp_path / "b.png")
    sheet = picture_sheet([tmp_path / "a.png", tmp_path / "b.png"], gap=10, top=20)
    assert sheet.size == (300, 180)
    assert sheet.getpixel((150, 10)) == (255, 255, 255)  # room for the front end's label
    assert sheet.getpixel((150, 70)) == (255, 0, 0) and sheet.getpixel((150, 155)) == (0, 0, 255)
    assert sheet.getpixel((10, 155)) == (255, 255, 255)  # the narrower one centred on white
    assert picture_sheet([]) is None
