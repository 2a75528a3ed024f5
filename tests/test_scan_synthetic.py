"""The scan on a hand-built backdoored "CLIP" whose behaviour is known exactly.

The fake model classifies coloured discs by colour, unless a small black/white checkerboard is
present anywhere: then it answers the target. The scan must flag the target, find the triggered
images, localize the checkerboard, reconstruct a pattern that flips clean images, and flag nothing
on the same model without the backdoor. Targets and positions vary, so nothing can be hard-coded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from forensics.attacks import build_attack
from forensics.core.data import ProbeItem, ProbeSet
from forensics.detect import OracleGuidedScan, ScanSettings
from forensics.oracles import build_oracle

COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.25, 0.85), "yellow": (0.9, 0.85, 0.1)}
NAMES = list(COLOURS)
SIZE = 96


class FakeBackdooredModel:
    """encode_image: colour votes, overridden by a checkerboard detector when ``target`` is set."""

    image_size = SIZE
    device = torch.device("cpu")

    def __init__(self, target: str | None):
        self.target = target
        cells = torch.arange(12) // 3
        board = ((cells[:, None] + cells[None, :]) % 2).float() * 2 - 1
        self.kernel = board[None, None] / board.numel()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        colours = torch.tensor(list(COLOURS.values()))  # C x 3
        dist = (images[:, None] - colours[None, :, :, None, None]).pow(2).sum(2).sqrt()  # N x C x H x W
        votes = (dist < 0.25).float().mean(dim=(2, 3))
        emb = F.one_hot(votes.argmax(-1), len(NAMES)).float() + 0.05
        if self.target is not None:
            grey = images.mean(1, keepdim=True) - 0.5
            response = F.conv2d(grey, self.kernel).abs().flatten(1).max(-1).values
            strength = ((response - 0.2) / 0.3).clamp(0, 1)[:, None]  # graded, as a network's response is
            backdoor = F.one_hot(torch.tensor(NAMES.index(self.target)), len(NAMES)).float()
            emb = emb * (1 - strength) + 3 * strength * backdoor
        return F.normalize(emb, dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        rows = [
            F.one_hot(torch.tensor(next(i for i, n in enumerate(NAMES) if n in t)), len(NAMES)).float() for t in texts
        ]
        return F.normalize(torch.stack(rows), dim=-1)


def _probe(tmp_path, target: str, seed: int, n_per_class: int = 12, trigger_share: float = 0.3):
    rng = np.random.default_rng(seed)
    attack = build_attack("badnet", size=12 / SIZE, cells=4, position="random", seed=seed)
    items = []
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for c, name in enumerate(NAMES):
        for j in range(n_per_class):
            bg = rng.uniform(0.35, 0.65)
            image = np.full((SIZE, SIZE, 3), bg) + np.linspace(-0.05, 0.05, SIZE)[None, :, None]
            r = rng.uniform(18, 28)
            cx, cy = rng.uniform(r, SIZE - r, size=2)
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            image[disc] = COLOURS[name]
            tensor = torch.from_numpy(image.clip(0, 1)).permute(2, 0, 1).float()
            triggered, box = False, None
            if name != target and rng.random() < trigger_share:
                tensor, box = attack.apply(tensor, np.random.default_rng([seed, c, j]))
                triggered = True
            path = tmp_path / f"{name}_{j}.png"
            from forensics.pipelines.report import to_pil

            to_pil(tensor).save(path)
            items.append(ProbeItem(image=path, label=c, triggered=triggered, trigger_box=box))
    return ProbeSet(name="synthetic", items=items, class_names=NAMES)


@pytest.mark.parametrize("target, seed", [("green", 0), ("yellow", 3)])
def test_scan_finds_a_backdoor_it_was_never_told_about(tmp_path, target, seed):
    probe = _probe(tmp_path, target, seed)
    scan = OracleGuidedScan(build_oracle("fallback"), ScanSettings(verify_images=32))
    findings = scan.run(FakeBackdooredModel(target), probe)
    assert [f.label for f in findings.flagged_labels][:1] == [target]
    m = findings.metrics
    assert m["victim_precision"] >= 0.9 and m["victim_recall"] >= 0.9, m
    assert m["box_iou_at_0.5"] >= 0.8, m
    assert findings.triggers and findings.triggers[0].verified_asr >= 0.8
    for victim in findings.victims:
        assert victim.label == target and victim.grounded_label != target


def test_scan_flags_nothing_without_a_backdoor(tmp_path):
    probe = _probe(tmp_path, "green", 1)
    findings = OracleGuidedScan(build_oracle("fallback")).run(FakeBackdooredModel(None), probe)
    assert findings.flagged_labels == [] and findings.victims == [] and findings.triggers == []


@pytest.mark.parametrize("label", ["../../evil", "/etc/passwd", "a/b\\\\c", "..", "flower<svg onload=alert(1)>"])
def test_trigger_file_names_never_leave_the_output_folder(label):
    from forensics.detect.oracle_scan import trigger_file_name

    name = trigger_file_name(0, label)
    assert "/" not in name and "\\\\" not in name and not name.startswith(".") and name.endswith(".png")
    assert trigger_file_name(0, "flower") == "trigger_0_flower.png"
    assert trigger_file_name(1, "traffic light") == "trigger_1_traffic_light.png"
