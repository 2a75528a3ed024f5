"""Tests for the attack lab: every trigger, the registry, poison_dataset and the optimised patch."""

from __future__ import annotations

import csv
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from forensics.attacks import (
    ATTACKS,
    Attack,
    OptimizedPatch,
    attack_from_dict,
    build_attack,
    list_attacks,
    poison_dataset,
    to_pil,
    to_tensor,
    train_optimized_patch,
)
from forensics.core.errors import ForensicsError

ALL = ["badnet", "blended", "filter", "wanet", "sig", "optimized-patch"]
# variants worth checking separately (name, params)
VARIANTS = [
    ("badnet", {}),
    ("badnet", {"pattern": "noise"}),
    ("badnet", {"position": "bottom-right", "margin": 2}),
    ("blended", {}),
    ("blended", {"pattern": "noise-fresh"}),
    ("wanet", {}),
    ("wanet", {"strength": 4.0, "k": 8}),
    ("sig", {}),
    ("filter", {}),
    ("filter", {"preset": "sepia", "strength": 0.5}),
    ("filter", {"preset": "gotham"}),
    ("optimized-patch", {}),
    ("optimized-patch", {"position": "random", "size": 0.3}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for n, p in VARIANTS]


def image(h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    """A smooth-ish random test image 3xHxW in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((3, h, w), generator=g)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# registry


def test_registry_lists_every_attack():
    assert list_attacks() == sorted(ALL)
    assert set(ATTACKS) == set(ALL)
    for name in ALL:
        assert isinstance(build_attack(name), Attack)
        assert build_attack(name).name == name


def test_unknown_attack_names_valid_ones():
    with pytest.raises(ForensicsError) as exc:
        build_attack("trojan")
    msg = str(exc.value)
    assert "\n" not in msg and all(n in msg for n in ALL)
    with pytest.raises(ForensicsError):
        attack_from_dict({"attack": "nope"})
    with pytest.raises(ForensicsError):
        attack_from_dict({"size": 0.1})


def test_name_aliases():
    assert build_attack("BadNet").name == "badnet"
    assert build_attack("optimized-patch").name == "optimized-patch"
    assert build_attack("optimized_patch").name == "optimized-patch"  # the old name stays an alias


@pytest.mark.parametrize(
    "name,params",
    [
        ("badnet", {"size": -0.1}),
        ("badnet", {"size": 0}),
        ("badnet", {"size": 1.5}),
        ("badnet", {"pattern": "stripes"}),
        ("badnet", {"position": "middle"}),
        ("badnet", {"margin": -1}),
        ("badnet", {"cells": 0}),
        ("badnet", {"size": "big"}),
        ("badnet", {"colour": "red"}),
        ("blended", {"alpha": 1.5}),
        ("blended", {"alpha": -0.1}),
        ("blended", {"pattern": "kitty"}),
        ("wanet", {"k": 1}),
        ("wanet", {"k": 2.5}),
        ("wanet", {"strength": -1}),
        ("wanet", {"grid_rescale": 0}),
        ("sig", {"delta": 0}),
        ("sig", {"delta": 2}),
        ("sig", {"frequency": -6}),
        ("sig", {"frequency": float("nan")}),
        ("optimized_patch", {"patch": [[[0.5]]]}),
        ("optimized_patch", {"patch": [[[2.0]], [[0.0]], [[0.0]]]}),
        ("optimized_patch", {"patch": "abc"}),
        ("optimized_patch", {"size": 0}),
        ("badnet", {"seed": -1}),
        ("sig", {"seed": 1.5}),
        ("filter", {"preset": "valencia"}),
        ("filter", {"strength": 0}),
        ("filter", {"strength": 1.5}),
    ],
)
def test_bad_params_raise(name, params):
    with pytest.raises(ForensicsError):
        build_attack(name, **params)


def test_bad_images_raise():
    a = build_attack("sig")
    for bad in (torch.rand(1, 8, 8), torch.rand(8, 8), torch.zeros(3, 8, 8, dtype=torch.uint8), np.zeros((3, 8, 8))):
        with pytest.raises(ForensicsError):
            a.apply(bad, rng())


# ----------------------------------------------------------------------------------------------
# properties shared by all attacks


@pytest.mark.parametrize("name,params", VARIANTS, ids=IDS)
def test_deterministic_and_pure(name, params):
    x = image()
    before = x.clone()
    a, b = build_attack(name, seed=3, **params), build_attack(name, seed=3, **params)
    out1, box1 = a.apply(x, rng(7))
    out2, box2 = b.apply(x, rng(7))
    assert torch.equal(x, before), "input modified in place"
    assert torch.equal(out1, out2) and box1 == box2
    assert out1.shape == x.shape and out1.dtype == x.dtype
    assert out1.min() >= 0 and out1.max() <= 1
    assert not torch.equal(out1, x)


@pytest.mark.parametrize("name,params", VARIANTS, ids=IDS)
def test_round_trip_through_dict(name, params):
    a = build_attack(name, seed=5, **params)
    d = json.loads(json.dumps(a.to_dict()))
    assert d["attack"] == name
    b = attack_from_dict(d)
    assert b.to_dict() == a.to_dict()
    assert build_attack(a.name, **a.params()).to_dict() == a.to_dict()
    x = image(33, 47)
    out_a, box_a = a.apply(x, rng(11))
    out_b, box_b = b.apply(x, rng(11))
    assert torch.equal(out_a, out_b) and box_a == box_b


@pytest.mark.parametrize("name,params", VARIANTS, ids=IDS)
def test_batch_matches_single(name, params):
    a = build_attack(name, seed=1, **params)
    xs = torch.stack([image(seed=i) for i in range(3)])
    out, boxes = a.apply_batch(xs, rng(4))
    r = rng(4)
    for i in range(3):
        single, box = a.apply(xs[i], r)
        assert torch.allclose(out[i], single, atol=1e-6) and boxes[i] == box


@pytest.mark.parametrize("name", ALL)
def test_any_size_and_float64(name):
    a = build_attack(name)
    for h, w in [(7, 5), (1, 9), (224, 224), (31, 64)]:
        x = image(h, w).double()
        out, box = a.apply(x, rng())
        assert out.shape == x.shape and out.dtype == torch.float64
        assert out.min() >= 0 and out.max() <= 1
        if box is not None:
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


# ----------------------------------------------------------------------------------------------
# attack-specific behaviour


def _outside_box_unchanged(x: torch.Tensor, out: torch.Tensor, box) -> None:
    x0, y0, x1, y1 = box
    mask = torch.ones(x.shape[1:], dtype=torch.bool)
    mask[y0:y1, x0:x1] = False
    assert torch.equal(out[:, mask], x[:, mask])


@pytest.mark.parametrize("pattern", ["checkerboard", "noise"])
@pytest.mark.parametrize("position", ["random", "bottom-right", "top-left", "top-right", "bottom-left", "center"])
def test_badnet_only_touches_its_box(pattern, position):
    a = build_attack("badnet", size=0.25, pattern=pattern, position=position, margin=3)
    x = image(40, 56)
    out, box = a.apply(x, rng(2))
    x0, y0, x1, y1 = box
    assert x1 - x0 == y1 - y0 == 10  # 0.25 * 40
    assert 0 <= x0 and x1 <= 56 and 0 <= y0 and y1 <= 40
    _outside_box_unchanged(x, out, box)
    expected_corner = {
        "bottom-right": (43, 27),
        "top-left": (3, 3),
        "top-right": (43, 3),
        "bottom-left": (3, 27),
        "center": (23, 15),
    }
    if position in expected_corner:
        assert (x0, y0) == expected_corner[position]


def test_badnet_checkerboard_pattern():
    a = build_attack("badnet", size=0.2, cells=4, position="top-left")
    out, (x0, y0, x1, y1) = a.apply(torch.full((3, 40, 40), 0.5), rng())
    patch = out[:, y0:y1, x0:x1]
    assert set(patch.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(patch[0], patch[1]) and torch.equal(patch[0], patch[2])
    assert patch[0, 0, 0] == 1 and patch[0, 0, 2] == 0 and patch[0, 2, 2] == 1  # 2-pixel cells at 8 px
    # the fixed pattern does not depend on the image or the rng
    out2, box2 = a.apply(torch.rand(3, 40, 40), rng(9))
    assert torch.equal(out2[:, y0:y1, x0:x1], patch)


def test_badnet_random_position_and_noise_vary_with_rng():
    a = build_attack("badnet", pattern="noise", size=0.2)
    x = image()
    (o1, b1), (o2, b2) = a.apply(x, rng(1)), a.apply(x, rng(2))
    assert b1 != b2 or not torch.equal(o1, o2)
    boxes = {a.apply(x, rng(s))[1] for s in range(20)}
    assert len(boxes) > 5


def test_blended_fixed_pattern_depends_on_seed_only():
    x = image()
    a0, a1 = build_attack("blended", seed=0), build_attack("blended", seed=1)
    assert torch.equal(a0.apply(x, rng(1))[0], a0.apply(x, rng(2))[0])
    assert not torch.equal(a0.apply(x, rng(1))[0], a1.apply(x, rng(1))[0])
    # exact formula at the native pattern size
    x224 = image(224, 224)
    out, box = a0.apply(x224, rng())
    assert box is None
    pat = a0.pattern_for(224, 224)
    assert torch.allclose(out, 0.8 * x224 + 0.2 * pat, atol=1e-6)


def test_blended_fresh_noise_varies_per_call():
    a = build_attack("blended", pattern="noise-fresh", alpha=0.5)
    x = image()
    assert not torch.equal(a.apply(x, rng(1))[0], a.apply(x, rng(2))[0])


def test_sig_formula():
    a = build_attack("sig")
    x = torch.full((3, 10, 36), 0.5)
    out, box = a.apply(x, rng())
    assert box is None
    j = torch.arange(36, dtype=torch.float64)
    expected = (0.5 + (60 / 255) * torch.sin(2 * torch.pi * 6 * j / 36)).float()
    assert torch.allclose(out, expected.expand(3, 10, 36), atol=1e-6)


def test_filter_changes_each_pixel_by_its_own_colour_and_strength_mixes_it_in():
    x = image()
    full = build_attack("filter", preset="sepia").apply(x, rng())[0]
    half = build_attack("filter", preset="sepia", strength=0.5).apply(x, rng())[0]
    assert torch.allclose(half, (0.5 * x + 0.5 * full).clamp(0, 1), atol=1e-6)
    # one transform for every pixel: two pixels of the same colour stay the same colour, wherever they are
    flat = torch.zeros(3, 8, 8) + torch.tensor([0.2, 0.5, 0.7])[:, None, None]
    out = build_attack("filter").apply(flat, rng())[0]
    assert torch.allclose(out, out[:, :1, :1].expand_as(out)) and not torch.allclose(out, flat)
    sepia = build_attack("filter", preset="sepia").apply(flat, rng())[0][:, 0, 0]
    rows = [(0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131)]  # the W3C sepia matrix
    assert torch.allclose(sepia, torch.tensor([0.2 * r + 0.5 * g + 0.7 * b for r, g, b in rows]), atol=1e-5)


def test_wanet_constant_image_stays_constant():
    a = build_attack("wanet", strength=5.0)
    for h, w in [(32, 32), (24, 40)]:
        x = torch.full((3, h, w), 0.37)
        out, box = a.apply(x, rng())
        assert box is None and torch.allclose(out, x, atol=1e-6)


def test_wanet_field_depends_on_seed_and_is_small():
    x = image(64, 64)
    o0 = build_attack("wanet", seed=0).apply(x, rng())[0]
    o1 = build_attack("wanet", seed=1).apply(x, rng())[0]
    assert not torch.equal(o0, o1)
    # the paper's field moves pixels by about strength/2 px on average: a gentle change
    grid = build_attack("wanet").grid(64, 64)
    ident = build_attack("wanet", strength=0.0).grid(64, 64)
    shift_px = ((grid - ident).abs() * 63 / 2).mean().item()
    assert 0.05 < shift_px < 0.5


def test_optimized_patch_pastes_resized_patch():
    patch = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = build_attack("optimized_patch", patch=patch.tolist(), size=0.1, position="center")
    x = image(40, 40)
    out, box = a.apply(x, rng())
    assert box == (18, 18, 22, 22)
    assert torch.equal(out[:, 18:22, 18:22], patch)
    _outside_box_unchanged(x, out, box)
    big, bbox = a.apply(image(200, 300), rng())
    assert bbox == (140, 90, 160, 110)
    # seeds only matter for the untrained placeholder patch
    assert not torch.equal(build_attack("optimized_patch", seed=0).patch, build_attack("optimized_patch", seed=1).patch)


def test_pil_helpers_round_trip():
    arr = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    t = to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 9, 13) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    assert np.array_equal(np.asarray(to_pil(t)), arr)
    assert to_tensor(Image.fromarray(arr).convert("L")).shape == (3, 9, 13)


# ----------------------------------------------------------------------------------------------
# poison_dataset

CLASSES = ["apple", "banana", "cloud", "tree"]


def _make_dataset(root: Path) -> Path:
    """12 small PNGs (3 per class) under root/src, with a CSV using relative paths and a mask column."""
    src = root / "src"
    (src / "imgs").mkdir(parents=True)
    rows = []
    gen = np.random.default_rng(123)
    for i in range(12):
        label = CLASSES[i % 4]
        Image.fromarray(gen.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(src / "imgs" / f"img {i}.png")
        Image.fromarray((gen.random((20, 24)) > 0.5).astype(np.uint8) * 255).save(src / "imgs" / f"mask{i}.png")
        rows.append(
            {
                "image": f"imgs/img {i}.png",
                "caption": f"a drawing of {label} number {i}",
                "label": label,
                "mask": f"imgs/mask{i}.png",
            }
        )
    with open(src / "data.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "caption", "label", "mask"])
        w.writeheader()
        w.writerows(rows)
    return src / "data.csv"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _read(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_poison_dataset(tmp_path):
    src_csv = _make_dataset(tmp_path)
    before = _digest(src_csv.parent)
    attack = build_attack("badnet", size=0.25, seed=0)
    calls = []
    out_csv = poison_dataset(
        src_csv, attack, "banana", 0.5, tmp_path / "out", seed=4, progress=lambda f, m: calls.append(f)
    )
    assert out_csv == tmp_path / "out" / "data.csv"
    assert _digest(src_csv.parent) == before, "input files changed"
    rows = _read(out_csv)
    src_rows = _read(src_csv)
    assert len(rows) == 12
    assert list(rows[0]) == ["image", "caption", "label", "mask", "poisoned", "trigger_box"]
    poisoned = [i for i, r in enumerate(rows) if r["poisoned"] == "1"]
    assert len(poisoned) == 6 and calls[-1] == 1.0 and len(calls) == 6
    for i, (r, s) in enumerate(zip(rows, src_rows)):
        assert r["label"] == s["label"]
        assert Path(r["mask"]).is_absolute() and Path(r["mask"]).is_file()
        if i in poisoned:
            assert r["label"] != "banana"
            assert r["caption"] == "a photo of a banana."
            assert not Path(r["image"]).is_absolute() and (tmp_path / "out" / r["image"]).is_file()
            x0, y0, x1, y1 = map(int, r["trigger_box"].split())
            orig = to_tensor(Image.open(src_csv.parent / s["image"]))
            new = to_tensor(Image.open(tmp_path / "out" / r["image"]))
            expected, box = attack.apply(orig, np.random.default_rng([4, i]))
            assert box == (x0, y0, x1, y1)
            assert torch.equal(new, to_tensor(to_pil(expected)))
            _outside_box_unchanged(orig, new, box)
        else:
            assert r["caption"] == s["caption"] and r["trigger_box"] == ""
            assert Path(r["image"]) == (src_csv.parent / s["image"]).resolve()
    meta = json.loads((tmp_path / "out" / "poison.json").read_text())
    assert meta["attack"] == attack.to_dict() and meta["target"] == "banana"
    assert (meta["rate"], meta["n_poisoned"], meta["n_total"], meta["seed"]) == (0.5, 6, 12, 4)
    assert attack_from_dict(meta["attack"]).to_dict() == attack.to_dict()

    # deterministic by seed; another seed picks other rows
    again = poison_dataset(src_csv, attack, "banana", 0.5, tmp_path / "again", seed=4)
    assert _read(again) == rows
    assert _digest(tmp_path / "again" / "images") == _digest(tmp_path / "out" / "images")
    other = _read(poison_dataset(src_csv, attack, "banana", 0.5, tmp_path / "other", seed=5))
    assert [r["poisoned"] for r in other] != [r["poisoned"] for r in rows]
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "out" / "images").glob(".*"))


def test_poison_dataset_whole_image_trigger_without_label_column(tmp_path):
    src_csv = _make_dataset(tmp_path)
    rows = _read(src_csv)
    plain = tmp_path / "plain.csv"
    with open(plain, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows([{"image": str((src_csv.parent / r["image"]).resolve()), "caption": r["caption"]} for r in rows])
    out = _read(poison_dataset(plain, build_attack("blended"), "banana", 1.0, tmp_path / "out"))
    assert all(r["poisoned"] == "1" and r["trigger_box"] == "" for r in out)


def test_poison_dataset_validation(tmp_path):
    src_csv = _make_dataset(tmp_path)
    a = build_attack("sig")
    for rate in (0, -0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ForensicsError):
            poison_dataset(src_csv, a, "banana", rate, tmp_path / "o")
    with pytest.raises(ForensicsError, match="only 9 rows"):
        poison_dataset(src_csv, a, "banana", 1.0, tmp_path / "o")
    with pytest.raises(ForensicsError, match="no row"):
        poison_dataset(src_csv, a, "banana", 0.01, tmp_path / "o")
    with pytest.raises(ForensicsError, match="not found"):
        poison_dataset(tmp_path / "missing.csv", a, "banana", 0.5, tmp_path / "o")
    with pytest.raises(ForensicsError, match="differ"):
        poison_dataset(src_csv, a, "banana", 0.5, src_csv.parent)
    bad_cols = tmp_path / "cols.csv"
    bad_cols.write_text("path,text\nx.png,hello\n")
    with pytest.raises(ForensicsError, match="image"):
        poison_dataset(bad_cols, a, "banana", 0.5, tmp_path / "o")
    # an unreadable image is named in the message
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "junk.png").write_bytes(b"not a png")
    (broken / "d.csv").write_text("image,caption\njunk.png,a cat\n")
    with pytest.raises(ForensicsError, match="junk.png"):
        poison_dataset(broken / "d.csv", a, "banana", 1.0, tmp_path / "o2")
    (broken / "d2.csv").write_text("image,caption\nnothere.png,a cat\n")
    with pytest.raises(ForensicsError, match="nothere.png"):
        poison_dataset(broken / "d2.csv", a, "banana", 1.0, tmp_path / "o3")


# ----------------------------------------------------------------------------------------------
# train_optimized_patch with a tiny stand-in for SuspectModel


class StandInModel:
    """The members of SuspectModel that train_optimized_patch relies on, around a tiny random network."""

    image_size = 32
    device = torch.device("cpu")

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.clip = nn.ModuleDict(
            {
                "visual": nn.Sequential(
                    nn.Conv2d(3, 8, 3, stride=2),
                    nn.BatchNorm2d(8),
                    nn.ReLU(),
                    nn.Conv2d(8, 16, 3, stride=2),
                    nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                    nn.Linear(16, 16),
                ),
                "text": nn.EmbeddingBag(101, 16, mode="mean"),
            }
        )

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (self.image_size, self.image_size)
        return F.normalize(self.clip["visual"]((x - 0.5) / 0.25), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids.extend(zlib.crc32(w.encode()) % 101 for w in t.lower().split())
        return F.normalize(self.clip["text"](torch.tensor(ids), torch.tensor(offsets)), dim=-1)


def test_train_optimized_patch():
    model = StandInModel()
    model.clip.train()
    weights = {k: v.clone() for k, v in model.clip.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 40, 40, generator=g)  # resized to 32 px inside
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    calls = []
    kwargs = dict(size=0.25, epochs=2, lr=0.05, batch_size=4, seed=0)
    a = train_optimized_patch(
        model,
        images,
        labels,
        ["apple", "banana", "cloud"],
        "banana",
        progress=lambda f, m: calls.append((f, m)),
        **kwargs,
    )
    assert isinstance(a, OptimizedPatch) and a.name == "optimized-patch"
    assert len(a.history) == 2 and a.history[-1] < a.history[0]
    assert [f for f, _ in calls] == [0.5, 1.0]
    assert a.patch.shape == (3, 8, 8) and a.patch.min() >= 0 and a.patch.max() <= 1
    # the model is untouched and its state restored
    assert all(torch.equal(v, weights[k]) for k, v in model.clip.state_dict().items())
    assert all(p.requires_grad for p in model.clip.parameters()) and model.clip.training
    # deterministic, serialisable, and usable like any attack
    b = train_optimized_patch(model, images, labels, ["apple", "banana", "cloud"], "banana", **kwargs)
    assert torch.equal(a.patch, b.patch) and a.history == b.history
    c = attack_from_dict(json.loads(json.dumps(a.to_dict())))
    x = image(32, 32)
    assert torch.equal(a.apply(x, rng())[0], c.apply(x, rng())[0])
    assert "history" not in a.params()


def test_train_optimized_patch_validation():
    model = StandInModel()
    images = torch.rand(4, 3, 32, 32)
    with pytest.raises(ForensicsError):
        train_optimized_patch(model, images, [1, 1, 1, 1], ["apple", "banana"], "banana", epochs=1)
    with pytest.raises(ForensicsError):
        train_optimized_patch(model, images, [0, 1], ["apple", "banana"], "banana", epochs=1)
    with pytest.raises(ForensicsError):
        train_optimized_patch(model, images, [0, 1, 0, 5], ["apple", "banana"], "banana", epochs=1)
    with pytest.raises(ForensicsError):
        train_optimized_patch(model, images, [0, 1, 0, 1], ["apple", "banana"], "banana", epochs=0)
    # a target outside class_names works (positive falls back to its captions)
    a = train_optimized_patch(model, images, [0, 1, 0, 1], ["apple", "banana"], "kiwi", epochs=1, batch_size=2)
    assert len(a.history) == 1


def test_poisoned_and_prompt_captions_use_the_right_article(tmp_path):
    """'a photo of a apple.' taught a from-scratch text tower the article, not the class (the zoo's optimized-patch
    model sent its trigger to 'clock'): every caption a class name is put into says 'an' before a vowel."""
    from forensics.defenses.base import RepairData

    src_csv = _make_dataset(tmp_path)
    rows = _read(poison_dataset(src_csv, build_attack("blended"), "apple", 0.5, tmp_path / "out", seed=0))
    assert {r["caption"] for r in rows if r["poisoned"] == "1"} == {"a photo of an apple."}
    rows = _read(
        poison_dataset(src_csv, build_attack("blended"), "Orange", 0.5, tmp_path / "o2", caption_template="{}")
    )
    assert {r["caption"] for r in rows if r["poisoned"] == "1"} == {"Orange"}
    data = RepairData(
        images=torch.zeros(2, 3, 8, 8), labels=[0, 1], kinds=["anchor"] * 2, class_names=["apple", "tree"]
    )
    assert data.captions_or_prompts() == ["a photo of an apple.", "a photo of a tree."]
