"""Input errors are one line naming the file, the field and what was expected: a probe CSV in another encoding,
classes.json of the wrong shape, repair settings of the wrong type (never 'unexpected ...' and a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forensics.core.data import load_probe_set
from forensics.core.errors import ForensicsError
from tests.test_cli import assert_one_line_error, run_cli

ROWS = "image,caption,label\na.png,une pomme rôtie,apple\nb.png,un livre,book\n"


def _probe(folder: Path, data: bytes, classes: object = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe.csv").write_bytes(data)
    if classes is not None:
        (folder / "classes.json").write_text(classes if isinstance(classes, str) else json.dumps(classes))
    return folder / "probe.csv"


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "cp1252"])
def test_a_probe_csv_that_is_not_utf8_is_named_in_one_line(tmp_path, encoding):
    csv = _probe(tmp_path, ROWS.encode(encoding))
    with pytest.raises(ForensicsError, match=r"^probe\.csv is not UTF-8 text \(byte \d+ cannot be read\)"):
        load_probe_set(str(csv))


def test_a_utf8_probe_csv_with_or_without_a_byte_order_mark_reads(tmp_path):
    for name, data in (("plain", ROWS.encode()), ("bom", ROWS.encode("utf-8-sig"))):
        probe = load_probe_set(str(_probe(tmp_path / name, data)))
        assert probe.class_names == ["apple", "book"] and probe.items[0].caption == "une pomme rôtie"


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (["apple", "book"], r'classes\.json must hold an object \{"classes": \[class names\]\}, got a JSON list'),
        ({"classes": "apple"}, r"classes\.json: 'classes' must be a list of class names, got a str"),
        ({"names": ["apple"]}, r"classes\.json: 'classes' must be a list of class names, got nothing"),
        ({"classes": ["apple", "book", "apple"]}, r"classes\.json: 'classes' names 'apple' twice"),
        ({"classes": ["apple", ""]}, r"classes\.json: 'classes' must be a non-empty list of non-empty class names"),
        ({"classes": []}, r"classes\.json: 'classes' must be a non-empty list"),
        ('{"classes": ["apple",', r"classes\.json is not JSON \(line 1, column \d+"),
    ],
)
def test_classes_json_of_the_wrong_shape_is_named_in_one_line(tmp_path, classes, message):
    csv = _probe(tmp_path, ROWS.encode(), classes)
    with pytest.raises(ForensicsError, match="^" + message) as raised:
        load_probe_set(str(csv))
    assert "\n" not in str(raised.value)


def test_the_cli_names_a_bad_probe_file_in_one_line(tmp_path):
    csv = _probe(tmp_path, ROWS.encode("utf-16"))
    assert_one_line_error(run_cli("evaluate", "demo", "--probe", str(csv), check=False), "probe.csv is not UTF-8 text")


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("epochs=abc", "cleanclip.epochs must be an integer, got 'abc'"),
        ("lr=fast", "cleanclip.lr must be a number, got 'fast'"),
        ("epochs=2.5", "cleanclip.epochs must be an integer"),
    ],
)
def test_repair_settings_of_the_wrong_type_are_one_line_errors(tmp_path, param, message):
    out = tmp_path / "o"
    proc = run_cli("repair", "demo", "--method", "cleanclip", "--param", param, "--out", str(out), check=False)
    assert_one_line_error(proc, message)
    assert not out.exists()


def test_defense_settings_from_the_api_are_typed_and_checked():
    from forensics.defenses import build_defense

    assert build_defense("cleanclip", epochs="3").settings.epochs == 3  # a string from a form, typed
    with pytest.raises(ForensicsError, match=r"^cleanclip\.epochs must be an integer, got 'three'$"):
        build_defense("cleanclip", epochs="three")
    invertune = build_defense("invertune", inversion_steps="7")  # flat detection settings still fold in
    assert invertune.settings.detect.inversion_steps == 7
