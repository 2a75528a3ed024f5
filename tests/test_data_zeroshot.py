"""Probe sets, templates, the word tokenizer and zero-shot CA/ASR on small hand-made inputs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from forensics.attacks import build_attack
from forensics.core.data import load_image, load_probe_set, map_box
from forensics.core.errors import ForensicsError
from forensics.core.models import new_model
from forensics.core.templates import OPENAI_TEMPLATES, SHORT_TEMPLATES, fill, resolve_templates
from forensics.core.tokenizer import WordTokenizer
from forensics.core.zeroshot import ASR_NOTE, class_text_embeddings, evaluate


def _png(path: Path, colour, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_templates():
    assert len(OPENAI_TEMPLATES) == 80 and all("{}" in t for t in OPENAI_TEMPLATES)
    assert fill("a photo of a {}.", "apple") == "a photo of an apple."
    assert fill("a photo of a {}.", "cat") == "a photo of a cat."
    assert resolve_templates("openai") == OPENAI_TEMPLATES
    assert resolve_templates(None) == SHORT_TEMPLATES
    with pytest.raises(ForensicsError, match="class name"):
        resolve_templates(["no placeholder"])
    with pytest.raises(ForensicsError, match="unknown template set"):
        resolve_templates("nope")


def test_word_tokenizer_layout():
    tok = WordTokenizer.from_corpus(["A photo of a cat.", "a dog"], context_length=8)
    ids = tok(["a photo of a zebra."])
    assert ids.shape == (1, 8)
    assert ids[0, 0] == tok.sot_id and tok.eot_id == tok.vocab_size - 1
    assert int(ids[0].argmax()) == 7  # argmax pooling finds <eot> after <sot> and 6 tokens
    assert tok.unknown_words("a zebra") == ["zebra"]
    assert torch.equal(WordTokenizer.from_dict(tok.to_dict())(["a cat"]), tok(["a cat"]))


def test_image_folder_and_csv(tmp_path):
    for cls, colour in (("red_thing", "red"), ("blue_thing", "blue")):
        for i in range(2):
            _png(tmp_path / "folder" / cls / f"{i}.png", colour)
    (tmp_path / "folder" / "blue_thing" / "notes.txt").write_text("not an image")
    probe = load_probe_set(tmp_path / "folder")
    assert probe.class_names == ["blue thing", "red thing"]
    assert len(probe) == 4 and probe.labels == [0, 0, 1, 1]
    images = probe.load_images(32)
    assert images.shape == (4, 3, 32, 32) and 0 <= images.min() and images.max() <= 1

    _png(tmp_path / "csv" / "a.png", "red")
    _png(tmp_path / "csv" / "mask.png", "white")
    with open(tmp_path / "csv" / "probe.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption", "label", "mask", "triggered", "trigger_box"])
        w.writerow(["a.png", "a red thing", "red", "mask.png", "1", "0 0 10 10"])
        w.writerow(["a.png", "again", "blue", "", "0", ""])
    probe = load_probe_set(tmp_path / "csv" / "probe.csv")
    assert probe.class_names == ["blue", "red"]
    assert probe.triggered_indices() == [0] and probe.clean_indices() == [1]
    assert probe.load_mask(0, 16).all()
    assert probe.trigger_box_at(0, 30) == map_box((0, 0, 10, 10), 40, 30, 30)


def test_map_box_follows_resize_and_crop():
    # 200x100 image -> shorter side 50 -> 100x50 -> centre crop 50: x offset 25
    assert map_box((100, 0, 120, 20), 200, 100, 50) == (25, 0, 35, 10)


def test_bad_probe_inputs(tmp_path):
    with pytest.raises(ForensicsError, match="does not exist"):
        load_probe_set(tmp_path / "missing")
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption,label\n")
    with pytest.raises(ForensicsError, match="empty"):
        load_probe_set(empty)
    (tmp_path / "nofolders").mkdir()
    with pytest.raises(ForensicsError, match="no images"):
        load_probe_set(tmp_path / "nofolders")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ForensicsError, match="cannot read image bad.png"):
        load_image(bad, 32)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("path,text\nx.png,hello\n")
    with pytest.raises(ForensicsError, match="'image' column"):
        load_probe_set(wrong)


def test_oversized_image_refused(tmp_path, monkeypatch):
    import forensics.core.images as images  # the one image loader lives there

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ForensicsError, match="too large"):
        load_image(_png(tmp_path / "big.png", "red", (20, 20)), 8)


@pytest.fixture(scope="module")
def tiny_model():
    tok = WordTokenizer.from_corpus([fill(t, c) for t in SHORT_TEMPLATES for c in ("red", "green", "blue")])
    return new_model("tiny-rn", tokenizer=tok, seed=0)


def test_class_embeddings_are_cached_and_normalised(tiny_model):
    emb = class_text_embeddings(tiny_model, ["red", "green"], "short")
    assert emb.shape == (2, tiny_model.facts.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert class_text_embeddings(tiny_model, ["red", "green"], "short") is emb
    with pytest.raises(ForensicsError, match="no class names"):
        class_text_embeddings(tiny_model, [], "short")


def test_evaluate_counts_and_excludes_target(tiny_model):
    torch.manual_seed(0)
    images = torch.rand(9, 3, 128, 128)
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    names = ["red", "green", "blue"]
    attack = build_attack("badnet", size=0.2, seed=1)
    out = evaluate(tiny_model, images, labels, names, attack, "green")
    assert out["n_clean"] == 9 and out["n_attacked"] == 6  # the three "green" images are excluded
    assert out["note"] == ASR_NOTE and "excludes" in out["note"]
    assert 0 <= out["ca"] <= 1 and 0 <= out["asr"] <= 1
    # CA equals the share of argmax predictions that match, computed independently
    emb = class_text_embeddings(tiny_model, names)
    with torch.no_grad():
        pred = (tiny_model.encode_image(images) @ emb.t()).argmax(-1)
    assert out["ca"] == pytest.approx(float((pred == torch.tensor(labels)).float().mean()))
    # deterministic by seed
    assert evaluate(tiny_model, images, labels, names, attack, "green")["asr"] == out["asr"]
    with pytest.raises(ForensicsError, match="not one of the classes"):
        evaluate(tiny_model, images, labels, names, attack, "purple")


def test_csv_saved_with_a_byte_order_mark_loads(tmp_path):
    """Spreadsheet programs save CSVs with a UTF-8 BOM; the header must still read ``image``."""
    from forensics.core.data import load_probe_set
    from forensics.training.clip import read_caption_csv

    _png(tmp_path / "a.png", "red", (8, 8))
    (tmp_path / "probe.csv").write_bytes("image,caption,label\na.png,a red thing,red\n".encode("utf-8-sig"))
    (tmp_path / "classes.json").write_text('{"classes": ["red", "blue"]}')
    probe = load_probe_set(tmp_path / "probe.csv")
    assert len(probe) == 1 and probe.items[0].label == 0
    assert read_caption_csv(tmp_path / "probe.csv")[0]["caption"] == "a red thing"


@pytest.mark.parametrize("box", ["one two three four", "1 2 3", "1 2 3 nan", "1 2 inf 4"])
def test_a_trigger_box_that_is_not_four_numbers_is_one_clear_error(tmp_path, box):
    from forensics.core.data import load_probe_set

    _png(tmp_path / "a.png", "red", (8, 8))
    (tmp_path / "probe.csv").write_text(f"image,caption,label,trigger_box\na.png,x,red,{box}\n")
    (tmp_path / "classes.json").write_text('{"classes": ["red"]}')
    with pytest.raises(ForensicsError, match="must be four numbers"):
        load_probe_set(tmp_path / "probe.csv")
