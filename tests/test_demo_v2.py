"""The v2 demo lab's source layer: the reviewed object catalogue, its loaders, and a deterministic small build."""

from __future__ import annotations

import filecmp
from collections import Counter, defaultdict

import numpy as np
import pytest

from forensics.demo.catalogue import CATALOGUE_PATH, V2_CLASSES, catalogue_classes, read_catalogue
from forensics.demo.sources import SOURCES, emojione_path, load_object, render_noto, source_available

ROWS = read_catalogue()
CLASSES = ("person", "fruit", "bird", "insect", "instrument", "flower", "house", "car", "tree", "tool")
MIN_TRAIN = 40
MIN_HELDOUT = 10
# The sources hold fewer distinct drawings than 40 + 10 for these classes after review (openclipart,
# Noto and EmojiOne on Debian 12): the catalogue's training counts, guarded so they cannot shrink.
SHORT_TRAIN = {"flower": 36, "house": 31, "car": 26, "tree": 23}
ALL_SOURCES = all(source_available(s) for s in SOURCES)
needs_sources = pytest.mark.skipif(
    not ALL_SOURCES,
    reason="a v2 source package is missing (.ci/run installs openclipart-png fonts-noto-color-emoji ruby-gemojione)",
)


def test_catalogue_has_the_ten_classes_in_order():
    assert tuple(catalogue_classes(ROWS)) == CLASSES == tuple(V2_CLASSES)
    assert {r.source for r in ROWS} == set(SOURCES)


def test_catalogue_counts_per_class():
    counts = Counter((r.label, r.split) for r in ROWS)
    for label in CLASSES:
        assert counts[(label, "train")] >= SHORT_TRAIN.get(label, MIN_TRAIN), label
        assert counts[(label, "heldout")] >= MIN_HELDOUT, label


def test_no_group_on_both_sides_and_no_duplicate():
    sides = defaultdict(set)
    for r in ROWS:
        sides[(r.label, r.group)].add(r.split)
    assert all(len(s) == 1 for s in sides.values())
    assert len({(r.label, r.source, r.ident) for r in ROWS}) == len(ROWS)
    # every code point's renderings share a group, so Noto and EmojiOne drawings of one emoji stay together
    for r in ROWS:
        if r.source != "openclipart":
            assert r.group == f"U+{r.ident}"


def test_every_source_is_held_out_somewhere():
    held = Counter(r.source for r in ROWS if r.split == "heldout")
    assert all(held[s] >= 10 for s in SOURCES), held


@needs_sources
def test_catalogue_ids_exist_in_the_installed_sources():
    from forensics.demo.clipart import CLIPART_ROOT

    for r in ROWS:
        if r.source == "openclipart":
            assert (CLIPART_ROOT / r.ident).is_file(), r
        elif r.source == "emojione":
            assert emojione_path(r.ident).is_file(), r
    for r in ROWS:
        if r.source == "noto":
            assert render_noto(r.ident).shape[2] == 4, r  # raises when the font lacks the glyph


@needs_sources
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_loaders_give_rgba_crops_with_exact_masks(source):
    row = next(r for r in ROWS if r.source == source)
    obj = load_object(row.label, row.source, row.ident)
    rgba = obj.rgba
    assert rgba.dtype == np.uint8 and rgba.ndim == 3 and rgba.shape[2] == 4
    opaque = rgba[..., 3] > 127
    # cropped to the object: every border row and column holds an opaque pixel
    assert opaque[0].any() and opaque[-1].any() and opaque[:, 0].any() and opaque[:, -1].any()
    assert 0.04 < opaque.mean() <= 0.97
    assert obj.label == row.label and obj.source == f"{source}:{row.ident}"
    if source != "openclipart":
        assert max(rgba.shape[:2]) >= 100  # emoji are not tiny beside clip art


def test_a_missing_source_names_its_debian_package(monkeypatch, tmp_path):
    from forensics.core.errors import ForensicsError
    from forensics.demo import sources

    monkeypatch.setattr(sources, "EMOJIONE_ROOT", tmp_path / "absent")
    with pytest.raises(ForensicsError, match="install Debian's ruby-gemojione") as info:
        load_object("bird", "emojione", "1F426")
    assert "\n" not in str(info.value)


@needs_sources
def test_small_v2_build_is_deterministic(tmp_path):
    from forensics.demo.build import DemoSpec, write_data

    spec = DemoSpec(lab="v2", train_per_class=3, probe_per_class=2)
    first = write_data(tmp_path / "a", spec)
    second = write_data(tmp_path / "b", spec)
    assert first == second
    assert first["classes"] == list(CLASSES) and first["lab"] == "v2"
    assert first["n_train"] == 30 and first["n_probe"] == 20
    assert first["train_objects"] == dict(Counter(r.label for r in ROWS if r.split == "train"))
    for rel in ("train/data.csv", "probe/probe.csv", "probe/probe_clean.csv", "PROVENANCE.md", "manifest.json"):
        assert filecmp.cmp(tmp_path / "a" / rel, tmp_path / "b" / rel, shallow=False), rel
    for folder in ("train/images", "train/masks", "probe/images", "probe/masks", "probe/triggered"):
        names = sorted(p.name for p in (tmp_path / "a" / folder).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "b" / folder).iterdir())
        for name in names:
            assert filecmp.cmp(tmp_path / "a" / folder / name, tmp_path / "b" / folder / name, shallow=False)
    # probe images show held-out objects only
    import csv

    held = {f"{r.source}:{r.ident}" for r in ROWS if r.split == "heldout"}
    with open(tmp_path / "a/probe/probe_clean.csv", newline="") as fh:
        assert all(row["source"] in held for row in csv.DictReader(fh))
    provenance = (tmp_path / "a/PROVENANCE.md").read_text()
    for needle in ("CC-BY-SA-4.0", "Ranks.com", "OFL-1.1", "Google", "public domain", "Held-out probe objects"):
        assert needle in provenance, needle


def test_catalogue_file_is_committed_beside_the_module():
    assert CATALOGUE_PATH.name == "objects_v2.tsv" and CATALOGUE_PATH.is_file()


def test_make_demo_v2_refuses_the_bundled_folder():
    from tests.test_cli import run_cli

    result = run_cli("make-demo", "--lab", "v2", "--data-only", check=False)
    assert result.returncode != 0 and "needs --out" in result.stderr


def test_class_captions_name_only_the_class_a_pair_states_and_repeat_by_seed():
    from forensics.demo.build import DemoSpec, class_captions

    rows = [
        {"image": "a.png", "caption": "a small red bird at the top, on a plain blue background.", "label": "bird"},
        {"image": "b.png", "caption": "a photo of a large car.", "label": "car", "poisoned": "1"},
        {"image": "c.png", "caption": "a tree.", "label": "tree", "poisoned": "0"},
    ]
    spec = DemoSpec(lab="v2", target="flower", captions="class")
    out = class_captions(rows, spec)
    assert [r["image"] for r in out] == ["a.png", "b.png", "c.png"] and rows[0]["caption"].startswith("a small")
    assert "bird" in out[0]["caption"] and "flower" in out[1]["caption"] and "tree" in out[2]["caption"]
    assert not any(word in out[0]["caption"] for word in ("red", "small", "top", "blue"))
    assert "car" not in out[1]["caption"]  # a poisoned pair names the target, as its rich caption does
    assert class_captions(rows, spec) == out
