"""Uploaded probe sets stay inside their folder, zips that lie are refused in one line, server paths are opt-in,
and every browser session has its own unguessable job folder (library level: forensics.core.data, forensics.ui)."""

from __future__ import annotations

import io
import os
import struct
import time
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from forensics.core import data
from forensics.core.data import extract_probe_archive, load_csv_probe, load_probe_set
from forensics.core.errors import ForensicsError

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)
    return path


def _zip(path: Path, entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names on purpose
        with zipfile.ZipFile(path, "w", method) as zf:
            for name, payload in entries:
                zf.writestr(name, payload)
    return path


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and "unexpected" not in text, text
    return text


def _csv(folder: Path, rows: list[str], header: str = "image,caption,label") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "probe.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# ------------------------------------------------------------------ CSV paths must stay inside the root


@pytest.mark.parametrize("bad", ["/etc/passwd", "../../x.png", "../outside.png", "images/../../x.png"])
def test_csv_rows_outside_the_root_are_refused_naming_the_row(tmp_path, bad):
    root = tmp_path / "upload"
    _png(root / "images" / "ok.png")
    _png(tmp_path / "outside.png")
    csv = _csv(root, ["images/ok.png,a cat,cat", f"{bad},a dog,dog"])
    with pytest.raises(ForensicsError) as info:
        load_csv_probe(csv, root=root)
    text = _one_line(info)
    assert text.startswith("row 2 of probe.csv: image") and "outside the probe folder" in text
    with pytest.raises(ForensicsError, match="row 2 of probe.csv"):
        load_probe_set(csv, root=root)


def test_csv_mask_outside_and_symlink_out_are_refused(tmp_path):
    root = tmp_path / "upload"
    _png(root / "images" / "ok.png")
    secret = _png(tmp_path / "secret.png")
    (root / "images" / "link.png").symlink_to(secret)
    csv = _csv(root, ["images/ok.png,a cat,cat,/etc/shadow"], header="image,caption,label,mask")
    with pytest.raises(ForensicsError, match=r"row 1 of probe.csv: mask '/etc/shadow' lies outside"):
        load_csv_probe(csv, root=root)
    csv = _csv(root, ["images/ok.png,a cat,cat", "images/link.png,a dog,dog"])
    with pytest.raises(ForensicsError, match=r"row 2 of probe.csv: image 'images/link.png' lies outside"):
        load_csv_probe(csv, root=root)


def test_csv_inside_the_root_loads_and_without_root_nothing_changes(tmp_path):
    root = tmp_path / "upload"
    ok = _png(root / "images" / "ok.png")
    _png(root / "sub" / "other.png")
    csv = _csv(root / "csv", ["../images/ok.png,a cat,cat", f"{root / 'sub' / 'other.png'},a dog,dog"])
    probe = load_probe_set(csv, root=root)  # a relative "..", and an absolute path, both inside the root
    assert [p.image.resolve() for p in probe.items] == [ok.resolve(), (root / "sub" / "other.png").resolve()]
    assert probe.class_names == ["cat", "dog"]
    outside = _png(tmp_path / "elsewhere.png")
    csv = _csv(root, [f"{outside},a cat,cat"])
    assert load_csv_probe(csv).items[0].image == outside  # the CLI and the library: any path, as before


def test_probe_set_and_image_folder_outside_the_root(tmp_path):
    root = tmp_path / "upload"
    _png(root / "cat" / "a.png")
    secret = _png(tmp_path / "secret" / "b.png")
    with pytest.raises(ForensicsError, match="lies outside the probe folder"):
        load_probe_set(tmp_path / "secret", root=root)
    (root / "cat" / "b.png").symlink_to(secret)
    with pytest.raises(ForensicsError, match=r"cat/b.png lies outside the probe folder"):
        load_probe_set(root, root=root)
    (root / "cat" / "b.png").unlink()
    assert len(load_probe_set(root, root=root)) == 1
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ForensicsError, match="probe folder empty holds no images") as info:
        load_probe_set(tmp_path / "empty", root=tmp_path)
    assert str(tmp_path) not in str(info.value)  # messages name the file, not where it lies


# ------------------------------------------------------------------ zip extraction


def _patch_declared_size(raw: bytes, size: int) -> bytes:
    """The first entry's uncompressed size rewritten in both its local and its central header."""
    b = bytearray(raw)
    struct.pack_into("<I", b, b.find(b"PK\x03\x04") + 22, size)
    struct.pack_into("<I", b, b.find(b"PK\x01\x02") + 24, size)
    return bytes(b)


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("declared", [10, 50_000])
def test_an_entry_lying_about_its_size_is_one_clear_line(tmp_path, method, declared):
    good = io.BytesIO()
    _zip(good, [("cat/a.png", b"A" * 2000), ("dog/b.png", b"B" * 2000)], method)
    archive = tmp_path / "liar.zip"
    archive.write_bytes(_patch_declared_size(good.getvalue(), declared))
    dest = tmp_path / "out"
    with pytest.raises(ForensicsError) as info:
        extract_probe_archive(archive, dest)
    text = _one_line(info)
    assert text.startswith("liar.zip: entry 'cat/a.png'") and text.endswith("nothing was extracted")
    assert "less data than its header declares" in text or "header lies" in text
    assert not [p for p in dest.rglob("*")]  # what was written is gone again


@pytest.mark.parametrize(
    "entries",
    [
        [("a", b"x"), ("a/b.png", b"y")],
        [("a/b.png", b"y"), ("a", b"x")],
        [("a/", b""), ("a", b"x")],
        [("probe/a/b/c.png", b"y"), ("probe/a/b", b"x")],
    ],
)
def test_a_file_and_a_folder_of_the_same_name_is_one_clear_line(tmp_path, entries):
    archive = _zip(tmp_path / "clash.zip", entries)
    with pytest.raises(ForensicsError) as info:
        extract_probe_archive(archive, tmp_path / "out")
    text = _one_line(info)
    assert "both as a file and as a folder" in text and text.startswith("clash.zip holds '")
    assert not (tmp_path / "out").exists()


def test_duplicate_names_and_the_old_protections_still_hold(tmp_path, monkeypatch):
    with pytest.raises(ForensicsError, match="holds 'cat/a.png' twice"):
        extract_probe_archive(_zip(tmp_path / "dup.zip", [("cat/a.png", b"1"), ("cat/a.png", b"2")]), tmp_path / "o")
    for bad in ("../../escape.png", "/abs.png", "cat/../../x.png"):
        with pytest.raises(ForensicsError, match="unsafe path"):
            extract_probe_archive(_zip(tmp_path / "slip.zip", [(bad, b"x")]), tmp_path / "o")
    link = zipfile.ZipInfo("cat/link.png")
    link.external_attr = (0o120777 << 16) | 0
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(ForensicsError, match="unsafe path 'cat/link.png'"):
        extract_probe_archive(tmp_path / "link.zip", tmp_path / "o")
    monkeypatch.setattr(data, "MAX_ARCHIVE_BYTES", 1000)
    with pytest.raises(ForensicsError, match="too large"):
        bomb = _zip(tmp_path / "bomb.zip", [("cat/a.png", b"\0" * 5000)], zipfile.ZIP_DEFLATED)
        extract_probe_archive(bomb, tmp_path / "o")
    monkeypatch.setattr(data, "MAX_ARCHIVE_BYTES", 10**9)
    monkeypatch.setattr(data, "MAX_ARCHIVE_FILES", 2)
    many = _zip(tmp_path / "many.zip", [(f"cat/{i}.png", b"x") for i in range(3)])
    with pytest.raises(ForensicsError, match="too large"):
        extract_probe_archive(many, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path.parent / "escape.png").exists()
    (tmp_path / "broken.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18 + b"garbage")
    with pytest.raises(ForensicsError) as info:
        extract_probe_archive(tmp_path / "broken.zip", tmp_path / "o")
    _one_line(info)


def test_a_good_zip_with_a_csv_extracts_and_loads_inside_its_folder(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    rows = "image,caption,label\nimages/a.png,a cat,cat\nimages/b.png,a dog,dog\n"
    archive = _zip(
        tmp_path / "good.zip",
        [("set/probe.csv", rows.encode()), ("set/images/a.png", buf.getvalue()), ("set/images/b.png", buf.getvalue())],
    )
    dest = tmp_path / "out"
    csv = extract_probe_archive(archive, dest)
    assert csv == dest / "set" / "probe.csv"
    assert len(load_probe_set(csv, root=dest)) == 2
    evil = _zip(tmp_path / "evil.zip", [("probe.csv", b"image,caption,label\n/etc/passwd,x,cat\n../../x.png,y,dog\n")])
    dest = tmp_path / "evil"
    with pytest.raises(ForensicsError, match="row 1 of probe.csv: image '/etc/passwd' lies outside"):
        load_probe_set(extract_probe_archive(evil, dest), root=dest)


# ------------------------------------------------------------------ server paths (forensics.ui.common)

common = pytest.importorskip("forensics.ui.common")


def test_server_paths_are_off_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv(common.SERVER_PATHS_ENV, raising=False)
    for text in (str(tmp_path), "/etc/passwd", "forensics/assets/demo/models/demo_poisoned.safetensors"):
        with pytest.raises(ForensicsError) as info:
            common.check_server_path(text)
        assert str(info.value) == "server paths are disabled on this server; upload the file instead"
        with pytest.raises(ForensicsError, match="server paths are disabled"):
            common.typed_model_spec(text)
        with pytest.raises(ForensicsError, match="server paths are disabled"):
            common.probe_choice(text)
        with pytest.raises(ForensicsError, match="server paths are disabled"):
            common.sam_checkpoint_path(text)
    for spec in ("demo", "demo-clean", "random:tiny-vit", "hf-hub:org/name", "ViT-B-32:openai"):
        assert common.typed_model_spec(spec) == spec
    assert common.probe_choice("demo") == "demo" and common.probe_choice(" demo-clean ") == "demo-clean"
    for hub in ("ViT-B-32:/etc/passwd", "ViT-B-32:../x.pt", "hf-hub:../../etc", "/models/x.pt", "ViT-B-32:README.md"):
        with pytest.raises(ForensicsError, match="no hub id"):
            common.hub_spec(hub)
    assert common.hub_spec(" hf-hub:laion/CLIP-ViT-B-32 ") == "hf-hub:laion/CLIP-ViT-B-32"


def test_allowed_folders_accept_inside_refuse_outside_escapes_and_links(monkeypatch, tmp_path):
    models, probes, outside = tmp_path / "models", tmp_path / "probes", tmp_path / "outside"
    for folder in (models, probes, outside):
        folder.mkdir()
    (models / "clip.pt").write_bytes(b"x")
    (outside / "secret.pt").write_bytes(b"x")
    (models / "link.pt").symlink_to(outside / "secret.pt")
    monkeypatch.setenv(common.SERVER_PATHS_ENV, os.pathsep.join([str(models), str(probes)]))
    assert common.check_server_path(str(models / "clip.pt")) == (models / "clip.pt").resolve()
    assert common.typed_model_spec(f"  {models / 'clip.pt'} ") == str((models / "clip.pt").resolve())
    for bad in (outside / "secret.pt", models / ".." / "outside" / "secret.pt", models / "link.pt", Path("/etc")):
        with pytest.raises(ForensicsError) as info:
            common.check_server_path(str(bad))
        text = _one_line(info)
        assert "is outside the folders this server allows" in text and str(tmp_path) not in text
    # a CSV in an allowed folder may not name images outside it
    _png(probes / "images" / "a.png")
    _png(outside / "b.png")
    good = _csv(probes / "good", ["../images/a.png,a cat,cat"])
    assert common.probe_choice(str(good)) == str(good.resolve())
    bad = _csv(probes / "bad", [f"{outside / 'b.png'},a cat,cat"])
    with pytest.raises(ForensicsError, match="row 1 of probe.csv: image"):
        common.probe_choice(str(bad))


def test_job_and_upload_folders_are_never_reachable_by_path(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "WORK_ROOT", tmp_path / "work")
    monkeypatch.setattr(common, "_SESSIONS", {})
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv(common.SERVER_PATHS_ENV, str(tmp_path))  # a careless admin allows their parent
    job = common.new_job_dir("scan", SimpleNamespace(session_hash="abc"))
    (job / "report.json").write_text("{}")
    (tmp_path / "gradio" / "x").mkdir(parents=True)
    for path in (job / "report.json", tmp_path / "gradio" / "x", tmp_path / "work"):
        with pytest.raises(ForensicsError, match="job or upload folders, which cannot be opened by path"):
            common.check_server_path(str(path))


def test_each_session_has_its_own_unguessable_folder_and_stale_jobs_go(monkeypatch, tmp_path):
    root = tmp_path / "work"
    monkeypatch.setattr(common, "WORK_ROOT", root)
    monkeypatch.setattr(common, "_SESSIONS", {})
    a, b = SimpleNamespace(session_hash="session-a"), SimpleNamespace(session_hash="session-b")
    job_a, job_a2, job_b = common.new_job_dir("scan", a), common.new_job_dir("repair", a), common.new_job_dir("scan", b)
    assert job_a.parent == job_a2.parent != job_b.parent
    assert job_a.parent.parent == root == job_b.parent.parent
    token = job_a.parent.name
    assert len(token) >= 22 and "session-a" not in token
    assert common.session_dir(a) == job_a.parent and common.session_dir(None) not in (job_a.parent, job_b.parent)
    assert oct(root.stat().st_mode & 0o777) == "0o700"
    # a fresh server (no memory of the hash) hands the same hash a different, new folder
    monkeypatch.setattr(common, "_SESSIONS", {})
    assert common.session_dir(a) != job_a.parent
    monkeypatch.setattr(common, "_SESSIONS", {"session-a": job_a.parent, "session-b": job_b.parent})
    # stale cleanup: old jobs inside a session, empty old session folders, old-layout job folders
    legacy = root / "scan-legacy1"
    legacy.mkdir()
    old = time.time() - common.JOB_TTL_SECONDS - 60
    for path in (job_a, legacy, job_b):
        os.utime(path, (old, old))
    common.remove_stale_jobs()
    assert not job_a.exists() and job_a2.exists() and not legacy.exists() and not job_b.exists()
    os.utime(job_b.parent, (old, old))
    common.remove_stale_jobs()
    assert not job_b.parent.exists() and "session-b" not in common._SESSIONS and "session-a" in common._SESSIONS


def test_error_messages_lose_absolute_paths():
    text = common.scrub_paths(
        "checkpoint /tmp/clip-forensics-workbench/Tok3n/upload-x/model.pt does not exist; "
        "cannot identify image file '/tmp/gradio/ab12/notimage.png'. See hf-hub:org/name or http://x.org/a/b."
    )
    assert text == (
        "checkpoint model.pt does not exist; cannot identify image file 'notimage.png'. "
        "See hf-hub:org/name or http://x.org/a/b."
    )
    assert common.scrub_paths("CA / ASR, 1/2 of images/a.png") == "CA / ASR, 1/2 of images/a.png"
