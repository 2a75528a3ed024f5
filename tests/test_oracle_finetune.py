"""oracle-finetune says what its findings gave it: victims to unlearn, or nothing (a global trigger the scan missed)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from forensics.attacks import attack_from_dict
from forensics.core.data import load_probe_set
from forensics.core.models import load_model
from forensics.defenses import RepairData, build_defense, stamped_sources


def _data(kinds: list[str], flagged: list[str]) -> RepairData:
    probe = load_probe_set("demo-clean")
    idx = probe.clean_indices()[: len(kinds)]
    return RepairData(
        images=probe.load_images(128, idx),
        labels=[probe.items[i].label for i in idx],
        kinds=kinds,
        class_names=probe.class_names,
        flagged=flagged,
    )


def test_anchor_only_findings_say_there_was_nothing_to_unlearn_and_change_little():
    torch.set_num_threads(1)
    model = load_model("demo")
    data = _data(["anchor"] * 8, [])
    result = build_defense("oracle-finetune", epochs=1, seed=0).repair(model, data)
    assert any("flagged no label and found no victim" in n for n in result.notes)
    with torch.no_grad():  # distillation alone keeps the image tower where it was
        before = model.encode_image(data.images)
        after = result.model.encode_image(data.images)
    assert float((before * after).sum(-1).min()) > 0.95
    assert result.model is not model


def test_victims_are_counted_with_their_flagged_label():
    notes_of = type(build_defense("oracle-finetune"))._coverage_notes
    kinds = ["victim", "victim-neutralised", "anchor", "anchor"]
    assert notes_of(_data(kinds, ["flower"])) == ["1 victim with the trigger box neutralised (and as found) for flower"]
    # boxed victims, an inverted trigger beside them, and box-less victims (3 copies): each said once, counted right
    kinds = ["victim-neutralised", "victim"] * 2 + ["inverted-source", "inverted-trigger", "inverted-trigger"]
    notes = notes_of(_data(kinds + ["victim"] * 3 + ["anchor"], ["flower"]), invariance=True)
    assert len(notes) == 3 and notes[0].startswith("2 victims with the trigger box neutralised")
    assert notes[1].startswith("beside them, the compact set carries the found trigger (inverted from clean images")
    assert "victims): 2 stamped clean images" in notes[1]
    assert "pulled to the original's embedding" in notes[1] and notes[2].startswith(
        "3 victim samples without a trigger box"
    )
    only_stamped = notes_of(_data(["inverted-source", "inverted-trigger", "anchor"], ["book"]))
    assert only_stamped[0].startswith("no victim to neutralise, so the compact set carries the found trigger")
    assert "victims): 1 stamped clean image" in only_stamped[0]


def test_stamped_rows_are_pulled_to_the_originals_embedding_of_their_clean_source():
    """Invariance: with it, a triggered image's embedding ends nearer the original's of the same image without
    the trigger than when the stamped rows are only labelled with their class (the README's demo/SIG rows)."""
    torch.set_num_threads(1)
    model = load_model("demo")
    clean = _data(["inverted-source"] * 12, ["flower"])
    attack = attack_from_dict({"attack": "badnet", "pattern": "checkerboard", "size": 0.1, "seed": 3})
    stamped, _ = attack.apply_batch(clean.images, np.random.default_rng(0))
    kinds = clean.kinds + ["inverted-trigger"] * 12
    data = RepairData(
        images=torch.cat([clean.images, stamped]),
        labels=clean.labels * 2,
        kinds=kinds,
        class_names=clean.class_names,
        flagged=["flower"],
        sources=stamped_sources(kinds, list(range(12)) * 2),
    )
    assert data.sources == [-1] * 12 + list(range(12))
    with torch.no_grad():
        target = F.normalize(model.encode_image(clean.images), dim=-1)
    drift = {}
    for weight in (0.0, 10.0):
        result = build_defense("oracle-finetune", epochs=10, seed=0, invariance_weight=weight).repair(model, data)
        with torch.no_grad():
            moved = F.normalize(result.model.encode_image(stamped), dim=-1)
        drift[weight] = float((moved - target).pow(2).sum(-1).mean())
    assert drift[10.0] < 0.75 * drift[0.0], drift  # measured 0.24 against 0.40


def test_a_stamped_row_without_its_source_in_the_set_has_none():
    kinds = ["inverted-trigger", "anchor", "inverted-source", "inverted-trigger"]
    assert stamped_sources(kinds, [5, 5, 7, 7]) == [-1, -1, -1, 2]
