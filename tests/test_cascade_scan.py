"""The cascade mode of the oracle-guided scan: same findings as the full scan for less work, and its region cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from forensics.core.cache import ContentCache
from forensics.core.data import load_probe_set
from forensics.core.models import load_model
from forensics.core.zeroshot import class_text_embeddings, predict
from forensics.detect import OracleGuidedScan, ScanSettings
from forensics.oracles import Oracle, build_oracle
from tests.test_cli import run_cli

N_IMAGES = 60


class CountingOracle(Oracle):
    """The fallback oracle, counting its calls (same name and settings, so the same cache keys)."""

    name = "fallback"

    def __init__(self, **settings):
        self.inner = build_oracle("fallback", **settings)
        self.calls = 0

    def settings(self):
        return self.inner.settings()

    def segment(self, image):
        self.calls += 1
        return self.inner.segment(image)


@pytest.fixture(scope="module")
def demo():
    return load_model("demo"), load_probe_set("demo").subset(N_IMAGES, 0)


@pytest.fixture(scope="module")
def full_scan(demo):
    model, probe = demo
    return OracleGuidedScan(build_oracle("fallback"), ScanSettings()).run(model, probe)


@pytest.fixture(scope="module")
def cascade_scans(demo):
    """Two cascade scans of the same probe sharing one region cache, and the oracle that served them."""
    model, probe = demo
    oracle, cache = CountingOracle(), ContentCache()
    first = OracleGuidedScan(oracle, ScanSettings(cascade=True), region_cache=cache).run(model, probe)
    calls_first = oracle.calls
    second = OracleGuidedScan(oracle, ScanSettings(cascade=True), region_cache=cache).run(model, probe)
    return first, second, calls_first, oracle.calls - calls_first


def test_cascade_flags_the_same_label_and_victims_as_the_full_scan(full_scan, cascade_scans):
    cascade = cascade_scans[0]
    assert full_scan.flagged_labels, "the demo subset should flag its backdoor"
    assert [f.label for f in cascade.flagged_labels] == [f.label for f in full_scan.flagged_labels]
    full_victims, victims = {v.index for v in full_scan.victims}, {v.index for v in cascade.victims}
    assert len(full_victims ^ victims) <= 2, (full_victims, victims)
    m, mf = cascade.metrics, full_scan.metrics
    assert abs(m["victim_recall"] - mf["victim_recall"]) * m["n_triggered"] <= 2.01, (m, mf)


def test_cascade_examines_fewer_images(full_scan, cascade_scans):
    cascade = cascade_scans[0]
    assert full_scan.metrics["examined"] == N_IMAGES and "cascade" not in full_scan.metrics
    m = cascade.metrics
    assert 0 < m["examined"] < N_IMAGES, m
    assert m["examined"] + m["cascade"]["skipped"] == N_IMAGES
    assert m["cascade"]["sampled"] >= 1  # the random sample that calibrates the across-set counts
    assert m["cascade"]["proposals"] == ScanSettings().cascade_proposals < ScanSettings().proposals
    records = cascade.artefacts["records"]
    assert sum(r["examined"] for r in records) == m["examined"]
    assert not any(r["captured"] for r in records if not r["examined"])  # only examined images can be victims
    assert cascade.settings["cascade"] is True and full_scan.settings["cascade"] is False


def test_second_cascade_scan_uses_the_region_cache(cascade_scans):
    first, second, calls_first, calls_second = cascade_scans
    assert calls_first == first.metrics["examined"] and calls_second == 0
    assert second.metrics["cascade"]["region_cache"] == {"hits": first.metrics["examined"], "misses": 0}
    a, b = first.to_dict(), second.to_dict()
    for key in ("metrics",):
        a.pop(key), b.pop(key)
    assert a == b
    assert first.metrics["victim_recall"] == second.metrics["victim_recall"]


def test_cached_regions_equal_fresh_ones_in_any_order(demo):
    """GrabCut draws from OpenCV's process-wide RNG; the cascade seeds it per image, so order does not matter."""
    model, probe = demo
    images = probe.load_images(model.image_size, list(range(12)))
    forward = OracleGuidedScan(build_oracle("fallback"), ScanSettings(cascade=True), region_cache=ContentCache())
    backward = OracleGuidedScan(build_oracle("fallback"), ScanSettings(cascade=True), region_cache=ContentCache())
    a = [forward._regions(im) for im in images]
    b = [backward._regions(im) for im in reversed(images)][::-1]
    for x, y in zip(a, b):
        assert len(x) == len(y) and all(np.array_equal(r.mask, q.mask) and r.box == q.box for r, q in zip(x, y))
    assert [forward._regions(im) for im in images] == a  # and from the cache, the very same


def test_cache_keys_depend_on_oracle_settings_and_content(demo):
    model, probe = demo
    images = probe.load_images(model.image_size, [0, 1])
    scan = OracleGuidedScan(build_oracle("fallback"), ScanSettings(cascade=True))
    other = OracleGuidedScan(build_oracle("fallback", iterations=4), ScanSettings(cascade=True))
    assert scan.region_key(images[0]) == scan.region_key(images[0].clone())
    assert scan.region_key(images[0]) != other.region_key(images[0])
    assert scan.region_key(images[0]) != scan.region_key(images[1])
    assert scan.region_key(images[0]) != scan.region_key(images[0].double())


def test_cascade_flags_nothing_on_the_clean_twin(demo):
    _, probe = demo
    findings = OracleGuidedScan(build_oracle("fallback"), ScanSettings(cascade=True), region_cache=ContentCache()).run(
        load_model("demo-clean"), probe
    )
    assert findings.flagged_labels == [] and findings.victims == []
    assert findings.metrics["examined"] < N_IMAGES


def test_cli_cascade_writes_the_setting(tmp_path):
    run_cli("scan", "demo", "--detectors", "oracle-guided", "--cascade", "--max-images", "40", "--out", str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["cascade"] is True
    assert report["metrics"]["examined"] < 40 and "cascade" in report["metrics"]


def test_grounding_views_batched_across_images_equal_one_image_at_a_time(demo):
    """The views (objects alone, region crops) of many images share CLIP batches: per image, the same views with
    the same labels and probabilities as when every view goes through CLIP alone (batch size 1)."""
    model, probe = demo
    images = probe.load_images(model.image_size, list(range(10)))
    class_emb = class_text_embeddings(model, list(probe.class_names), "short")
    full = predict(model, images, class_emb)
    pred = full.argmax(-1)
    regions = [build_oracle("fallback").segment(im) for im in images]
    batched = OracleGuidedScan(build_oracle("fallback"), ScanSettings(batch_size=32))
    single = OracleGuidedScan(build_oracle("fallback"), ScanSettings(batch_size=1))
    names = list(probe.class_names)
    a = batched._ground(model, images, class_emb, names, full, pred, lambda f, m: None, regions)
    b = single._ground(model, images, class_emb, names, full, pred, lambda f, m: None, regions)
    assert len(a) == len(b) == 10 and sum(len(g.regions) for g in a) > 10  # several views per image
    for x, y in zip(a, b):
        assert x.grounded == y.grounded and x.has_objects == y.has_objects
        assert [r["label"] for r in x.region_labels] == [r["label"] for r in y.region_labels]
        assert [r["probability"] for r in x.region_labels] == pytest.approx(
            [r["probability"] for r in y.region_labels], abs=1e-4
        )
        assert torch.allclose(x.object_view, y.object_view, atol=1e-4)
        assert torch.equal(x.object_mask, y.object_mask)


def test_the_scan_says_where_its_time_went(full_scan, cascade_scans):
    for findings in (full_scan, cascade_scans[0]):
        stages = findings.metrics["stage_seconds"]
        steps = {"prediction and estimate", "grounding", "occluded windows", "localization", "trigger reconstruction"}
        assert set(stages) == steps | {"rest"}, stages  # the demo flags a label: a trigger was reconstructed
        assert all(v >= 0 for v in stages.values()) and stages["occluded windows"] > 0
        assert sum(stages.values()) == pytest.approx(findings.metrics["seconds"], abs=0.06)
