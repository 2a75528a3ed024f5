"""The trigger the box-less victims share: its local and global estimates, its self-check, and the repair set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from forensics.core.data import load_probe_set
from forensics.core.models import frozen, load_model
from forensics.core.zeroshot import class_text_embeddings, predict_labels
from forensics.detect.victim_trigger import (
    MIN_VICTIMS,
    exemplar,
    global_candidates,
    local_candidates,
    reconstruct_from_victims,
)
from forensics.pipelines.scan import all_compact_rows, inverted_pictures, scan

SIG_MODEL = Path(__file__).parent / "assets" / "sig_book.safetensors"  # bench/detect_zoo.py's "sig", fp16
SIG = {"attack": "sig", "seed": 0, "delta": 0.2, "frequency": 4.0}  # as the shipped model was trained


def test_the_local_estimate_keeps_the_pixels_every_victim_shares():
    """A 6 x 6 patch identical in 20 victims and nowhere else: every mask up to its size lies on it, with the
    patch's colour; the share reported is the mask's own."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(60, 3, 32, 32, generator=gen)
    victims = torch.rand(20, 3, 32, 32, generator=gen)
    patch = torch.rand(3, 6, 6, generator=gen)
    victims[:, :, 20:26, 3:9] = patch
    for share, trigger in local_candidates(victims, clean):
        on = trigger.mask[0].nonzero()
        assert share == pytest.approx(len(on) / 1024)
        if len(on) <= 36:
            assert on[:, 0].min() >= 20 and on[:, 0].max() < 26 and on[:, 1].min() >= 3 and on[:, 1].max() < 9
            assert torch.allclose(trigger.pattern[:, 20:26, 3:9], patch)
        else:
            assert bool(trigger.mask[0, 20:26, 3:9].all())  # larger masks keep the whole patch


def test_the_local_estimate_finds_a_patch_of_fresh_noise_and_one_victim_carries_it():
    """CleanCLIP's BadNet: each victim gets its own noise in a 5 x 5 corner where clean images are plain; the
    masks up to its size lie there, and the exemplar victim carries real noise where the mean is near grey."""
    gen = torch.Generator().manual_seed(2)
    clean = torch.rand(60, 3, 32, 32, generator=gen)
    clean[:, :, 25:30, 25:30] = 1.0  # a white corner in every clean image
    victims = torch.rand(20, 3, 32, 32, generator=gen)
    victims[:, :, 25:30, 25:30] = torch.rand(20, 3, 5, 5, generator=gen)
    one = exemplar(victims)
    assert any(torch.equal(one, v) for v in victims)
    for _, trigger in local_candidates(victims, clean, one):
        on = trigger.mask[0].nonzero()
        if len(on) <= 25:
            assert on.min() >= 25 and on.max() < 30
    assert float(victims[:, :, 25:30, 25:30].mean(0).std()) < float(one[:, 25:30, 25:30].std())


def test_the_global_estimate_is_the_victims_mean_shift():
    """Victims carrying one additive signal: the estimate at scale 1 is that signal (cosine > 0.9), the scales run
    2x down to 1/4, largest first, and each trigger keeps images in [0, 1]."""
    gen = torch.Generator().manual_seed(1)
    signal = 0.15 * torch.sin(torch.linspace(0, 12.0, 32)).expand(3, 32, 32)
    victims = (torch.rand(40, 3, 32, 32, generator=gen) * 0.7 + signal).clamp(0, 1)
    clean = torch.rand(60, 3, 32, 32, generator=gen) * 0.7
    candidates = global_candidates(victims, clean)
    strengths = [s for s, _ in candidates]
    assert strengths == sorted(strengths, reverse=True) and strengths[0] == pytest.approx(8 * strengths[-1])
    unit = candidates[2][1].delta  # scale 1
    assert torch.nn.functional.cosine_similarity(unit.flatten(), signal.flatten(), dim=0) > 0.9
    stamped = candidates[0][1].apply(clean)
    assert float(stamped.min()) >= 0 and float(stamped.max()) <= 1


@pytest.fixture(scope="module")
def sig_triggered(tmp_path_factory):
    bench = Path(__file__).resolve().parents[1] / "bench" / "compare_attacks.py"
    spec = importlib.util.spec_from_file_location("compare_attacks_for_victims", bench)
    compare_attacks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_attacks)
    folder = tmp_path_factory.mktemp("sig_triggered")
    return load_model(str(SIG_MODEL)), load_probe_set(str(compare_attacks.triggered_probe(SIG, "book", folder)))


def test_victims_of_a_whole_image_trigger_give_it_back_and_look_alikes_give_nothing(sig_triggered):
    """The shipped SIG model: its triggered probe images predicted 'book' share a global trigger that sends at least
    80 % of held-out clean images there (measured 0.92); the 'book' class's own clean images, or another class's,
    taken as victims, share nothing that does; too few victims are not read at all."""
    model, probe = sig_triggered
    names = list(probe.class_names)
    book = names.index("book")
    class_emb = class_text_embeddings(model, names, "short").detach()
    images = probe.load_images(model.image_size)
    with frozen(model):
        predicted = predict_labels(model, images, class_emb)
        victims = [i for i, it in enumerate(probe.items) if it.triggered and predicted[i] == book]
        found = reconstruct_from_victims(model, images, victims, book, class_emb, "book")
        assert found is not None and found.trigger.method == "victims/global"
        assert found.trigger.verified_asr >= 0.8 and found.trigger.n_verified >= 60
        assert found.trigger.stats["victims"] == len(victims) >= 30
        for label in ("book", "house"):
            own = [i for i, it in enumerate(probe.items) if it.label == names.index(label) and not it.triggered]
            assert reconstruct_from_victims(model, images, own, names.index(label), class_emb, label) is None
        assert reconstruct_from_victims(model, images, victims[: MIN_VICTIMS - 1], book, class_emb, "book") is None


def test_the_victims_trigger_becomes_the_verdicts_and_is_stamped_for_the_repair(sig_triggered):
    """A scan with the embedding density alone (no inversion, no oracle): the hijacked 'book' and its box-less
    victims give the verdict, the victims' trigger is its trigger (a reason says so), the compact set stamps it on
    clean images of other classes beside the victims, and its picture is written with the report."""
    model, probe = sig_triggered
    outcome = scan(model, probe, detectors="embedding-density")
    verdict = outcome.verdict
    assert verdict.verdict == "backdoored" and verdict.target == "book" and verdict.family == "global"
    assert verdict.trigger["detector"] == "victims" and verdict.trigger["verified_asr"] >= 0.8
    assert any("victims found by their embeddings share a global" in r for r in verdict.reasons)
    assert outcome.report["verdict"]["trigger"]["method"] == "victims/global"
    rows = all_compact_rows(outcome)
    stamped = [r for r in rows if r["kind"] == "inverted-trigger"]
    sources = [r for r in rows if r["kind"] == "inverted-source"]
    assert len(stamped) == 3 * len(sources) > 0 and all(r["label"] != "book" for r in stamped)
    assert sum(r["kind"] == "victim" for r in rows) >= 3 * 30
    assert list(inverted_pictures(outcome)) == ["inverted/victims_global_book.png"]


def test_the_findings_tab_names_the_victims_trigger_as_the_best():
    """When the verdict's trigger is the victims' one, the box on top of Findings names it with its flip rate (its
    picture leads the trigger pictures: tests/test_pictures.py)."""
    from forensics.ui.investigate_tab import verdict_views

    stats = {"family": "local", "size": 0.024, "victims": 45, "key": "victims/local"}
    trigger = {"label": "house", "method": "victims/local", "verified_asr": 1.0, "n_verified": 80, "stats": stats}
    report = {
        "verdict": {
            "verdict": "backdoored",
            "target": "house",
            "family": "local",
            "trigger": {"detector": "victims", "pattern": "inverted/victims_local_house.png", **trigger},
            "reasons": [],
            "evidence": {},
        },
    }
    text, rows = verdict_views(report)
    assert "victims/local, verified flip rate 100%" in text and "target **house**" in text and rows == []
