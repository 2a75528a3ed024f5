"""oracle-finetune says what its findings gave it: victims to unlearn, or nothing (a global trigger the scan missed)."""

from __future__ import annotations

import torch

from forensics.core.data import load_probe_set
from forensics.core.models import load_model
from forensics.defenses import RepairData, build_defense


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
    kinds = ["victim", "victim-neutralised", "anchor", "anchor"]
    notes = type(build_defense("oracle-finetune"))._coverage_notes(_data(kinds, ["flower"]))
    assert notes == ["2 victim samples (as found and with the trigger neutralised) for flagged label(s) flower"]
