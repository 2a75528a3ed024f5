"""Sessions of the workbench are isolated (gradio_client against `python app.py`): each has its own unguessable job
folder, downloads its own outputs, and can neither open nor download another session's files by path; uploaded
probe zips cannot reach outside themselves; FORENSICS_ALLOW_SERVER_PATHS opens named folders, and only those."""

from __future__ import annotations

import io
import json
import shutil
import struct
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from forensics.ui.common import SERVER_PATHS_ENV, SERVER_PATHS_OFF, WORK_ROOT  # noqa: E402
from tests.conftest import running_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "forensics" / "assets" / "demo" / "models" / "demo_poisoned.safetensors"
CHECKPOINT = "checkpoint file (upload or server path)"
HUB = "hub id or pretrained tag (needs a network)"
SCAN_IMAGES = 20


def _load(client: Client, source: str, upload=None, path: str = "", hub: str = "", oracle="fallback", sam=""):
    return client.predict(source, upload, path, None, hub, False, oracle, sam, api_name="/load_model")


def _error(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    return str(info.value)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


@pytest.fixture(scope="module")
def session_a(workbench):
    """Session A scans the demo; its report as served to it, and the job folder the server wrote it in."""
    a = Client(workbench, verbose=False, download_files=False)
    result = a.predict("demo", None, SCAN_IMAGES, "quick", "", api_name="/scan")  # folders, not detection: quick
    assert "Flagged labels" in result[0]
    files = {Path(f["path"]).name: f for f in result[6]}
    assert set(files) == {"report.html", "report.json"}
    status, served = _get(files["report.json"]["url"])
    assert status == 200
    jobs = [p.parent for p in WORK_ROOT.glob("*/scan-*/report.json") if p.read_bytes() == served]
    assert len(jobs) == 1, jobs
    return {"client": a, "files": files, "job": jobs[0], "folder": jobs[0].parent, "report": served}


def _no_leak(text: str, a: dict, listing: bool = True) -> str:
    """A message B sees names nothing of A's: not its folder, not its token, not what the folder holds (unless B
    named that file itself: ``listing=False``)."""
    assert a["folder"].name not in text and str(WORK_ROOT) not in text, text
    names = [p.name for p in a["job"].iterdir() if len(p.name) > 6] if listing else []
    assert not [n for n in names if n in text], text
    assert "\n" not in text.strip(), text
    return text


def test_each_session_has_its_own_unguessable_folder(session_a, workbench, tmp_path):
    folder = session_a["folder"]
    assert folder.parent == WORK_ROOT and session_a["job"].name.startswith("scan-")
    token = folder.name
    assert len(token) >= 22 and session_a["client"].session_hash not in token
    assert oct(folder.stat().st_mode & 0o777) == "0o700" and oct(WORK_ROOT.stat().st_mode & 0o777) == "0o700"
    # B's jobs land in a folder of B's own
    b = Client(workbench, verbose=False)
    before = set(WORK_ROOT.glob("*/probe-*"))
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("probe/cat/a.png", b"not an image")
    _error(lambda: b.predict("demo", handle_file(str(bad)), SCAN_IMAGES, api_name="/scan"))
    new = set(WORK_ROOT.glob("*/probe-*")) - before
    assert len(new) == 1 and next(iter(new)).parent not in (folder, WORK_ROOT)


def test_a_returned_report_downloads_for_its_own_session(session_a):
    """Served from Gradio's cache (a copy under a salted hash), not from the job folder: no allowed_paths needed."""
    for name, data in session_a["files"].items():
        assert str(WORK_ROOT) not in data["url"]
        status, body = _get(data["url"])
        assert status == 200 and body == (session_a["job"] / name).read_bytes()
    assert session_a["report"].startswith(b"{")


def test_no_one_downloads_a_job_folder_file_by_path(session_a, workbench):
    legacy = WORK_ROOT / "scan-legacytest"  # the old layout, one job folder straight under WORK_ROOT
    legacy.mkdir(exist_ok=True)
    (legacy / "report.html").write_text("<html>old</html>")
    try:
        targets = [session_a["job"] / "report.html", session_a["job"] / "report.json", legacy / "report.html"]
        for target in targets:
            for raw in (str(target), urllib.parse.quote(str(target))):
                for route in ("gradio_api/file=", "gradio_api/file/", "file=", "file/"):
                    status, body = _get(f"{workbench}{route}{raw}")
                    assert status in (403, 404) and not body, (route, raw, status)
    finally:
        shutil.rmtree(legacy, ignore_errors=True)


def test_another_session_cannot_open_a_files_by_server_path(session_a, workbench, tmp_path):
    b = Client(workbench, verbose=False)
    job, folder = session_a["job"], session_a["folder"]
    for path in (job / "report.json", job, folder, DEMO_MODEL, "/etc/passwd", f"{job}/../../"):
        text = _no_leak(_error(lambda: _load(b, CHECKPOINT, path=str(path))), session_a)
        assert SERVER_PATHS_OFF in text
        text = _no_leak(_error(lambda: b.predict(str(path), api_name="/evaluate")), session_a)
        assert SERVER_PATHS_OFF in text
        text = _no_leak(_error(lambda: b.predict(str(path), None, SCAN_IMAGES, api_name="/scan")), session_a)
        assert SERVER_PATHS_OFF in text
        text = _no_leak(_error(lambda: _load(b, "demo (backdoored demo CLIP)", oracle="sam", sam=str(path))), session_a)
        assert SERVER_PATHS_OFF in text
        text = _no_leak(_error(lambda: _load(b, HUB, hub=f"ViT-B-32:{path}")), session_a)
        assert "no hub id" in text
    # a file the server holds but B never uploaded cannot be slipped in as an upload (raw API: the client would
    # upload a local file itself)
    local = tmp_path / "probe.zip"
    shutil.copy(DEMO_MODEL, local)
    body = {"data": ["demo", {"path": str(local), "meta": {"_type": "gradio.FileData"}}, SCAN_IMAGES, "quick", ""]}
    request = urllib.request.Request(
        f"{workbench}gradio_api/call/scan", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        event = json.loads(resp.read())["event_id"]
    with urllib.request.urlopen(f"{workbench}gradio_api/call/scan/{event}", timeout=300) as resp:
        answer = resp.read().decode()
    assert "event: error" in answer and "not uploaded by a user" in answer, answer
    # the demo and random architectures stay open, and B carries on
    assert _load(b, CHECKPOINT, path="random:tiny-vit")[0]["architecture"] == "tiny-vit"
    assert _load(b, "demo (backdoored demo CLIP)")[0]["architecture"] == "tiny-rn"


def _zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in entries:
            zf.writestr(name, payload)
    return path


def test_uploaded_probe_zips_stay_inside_themselves(session_a, workbench, tmp_path):
    from PIL import Image

    b = Client(workbench, verbose=False)
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(png, "PNG")
    header = b"image,caption,label\nimages/ok.png,a cat,cat\n"
    for row, bad in ((2, b"/etc/passwd"), (2, b"../../x.png"), (2, str(session_a["job"] / "report.json").encode())):
        archive = _zip(
            tmp_path / "escape.zip", [("probe.csv", header + bad + b",a dog,dog\n"), ("images/ok.png", png.getvalue())]
        )
        call = lambda: b.predict("demo", handle_file(str(archive)), SCAN_IMAGES, api_name="/scan")  # noqa: E731
        text = _no_leak(_error(call), session_a, listing=False)
        assert f"row {row} of probe.csv: image" in text and "lies outside the probe folder" in text, text
    # a header that lies about its entry's size; a file and a folder of one name
    good = io.BytesIO()
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("cat/a.png", png.getvalue())
        zf.writestr("dog/b.png", png.getvalue())
    raw = bytearray(good.getvalue())
    struct.pack_into("<I", raw, raw.find(b"PK\x01\x02") + 24, 10)
    struct.pack_into("<I", raw, raw.find(b"PK\x03\x04") + 22, 10)
    (tmp_path / "liar.zip").write_bytes(bytes(raw))
    text = _error(lambda: b.predict("demo", handle_file(str(tmp_path / "liar.zip")), SCAN_IMAGES, api_name="/scan"))
    assert "liar.zip: entry 'cat/a.png'" in text and "nothing was extracted" in text and "unexpected" not in text
    clash = _zip(tmp_path / "clash.zip", [("cat", b"x"), ("cat/a.png", png.getvalue())])
    text = _error(lambda: b.predict("demo", handle_file(str(clash)), SCAN_IMAGES, api_name="/scan"))
    assert "clash.zip holds 'cat' both as a file and as a folder" in text and "unexpected" not in text


# ------------------------------------------------------------------ a second server, started with server paths on


@pytest.fixture(scope="module")
def open_workbench(tmp_path_factory):
    """``python app.py`` with FORENSICS_ALLOW_SERVER_PATHS naming one folder that holds a copy of the demo model."""
    allowed = tmp_path_factory.mktemp("allowed")
    shutil.copy(DEMO_MODEL, allowed / "suspect.safetensors")
    shutil.copy(DEMO_MODEL.with_suffix(".json"), allowed / "suspect.json")
    (allowed / "probe.csv").write_text("image,caption,label\n/etc/passwd,a cat,cat\n")
    with running_app(tmp_path_factory.mktemp("open-workbench"), {SERVER_PATHS_ENV: str(allowed)}) as url:
        yield url, allowed


def test_allowed_server_folder_opens_inside_and_refuses_outside(open_workbench, tmp_path):
    url, allowed = open_workbench
    client = Client(url, verbose=False)
    facts = _load(client, CHECKPOINT, path=str(allowed / "suspect.safetensors"))[0]
    assert facts["architecture"] == "tiny-rn" and facts["source"].endswith("suspect.safetensors")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(DEMO_MODEL, outside)
    for path in (outside, allowed / ".." / outside.parent.name / outside.name, DEMO_MODEL):
        text = _error(lambda: _load(client, CHECKPOINT, path=str(path)))
        assert "is outside the folders this server allows" in text and str(tmp_path) not in text
    (allowed / "link.safetensors").symlink_to(outside)
    assert "is outside the folders" in _error(lambda: _load(client, CHECKPOINT, path=str(allowed / "link.safetensors")))
    text = _error(lambda: _load(client, CHECKPOINT, path=str(WORK_ROOT)))
    assert "outside the folders" in text or "job or upload folders" in text
    # a CSV inside the allowed folder may still not name images outside it
    text = _error(lambda: client.predict(str(allowed / "probe.csv"), api_name="/evaluate"))
    assert "row 1 of probe.csv: image 'passwd' lies outside the probe folder" in text  # paths cut to names


# ------------------------------------------------------------------ private folders, whatever the allowed folders are


@pytest.fixture
def private_setup(tmp_path, monkeypatch):
    """An allowed folder that holds the workbench's job folders and Gradio's upload folder (the worst setting an
    operator could choose), another session's upload and result in them, and a probe folder of one's own."""
    from PIL import Image

    from forensics.ui import common

    monkeypatch.setattr(common, "WORK_ROOT", tmp_path / "work")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-up"))
    monkeypatch.setenv(SERVER_PATHS_ENV, str(tmp_path))
    upload = tmp_path / "gradio-up" / ("e" * 64) / "victim.png"
    job = tmp_path / "work" / "SeCrEtToKeN" / "scan-abc" / "trigger_0.png"
    probes = tmp_path / "probes"
    for path in (upload, job, probes / "own.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), "white").save(path)
    shutil.copy(DEMO_MODEL, job.parent / "model.safetensors")
    return {"common": common, "upload": upload, "job": job, "probes": probes, "root": tmp_path}


def _private_refusal(call, root: Path) -> str:
    from forensics.core.errors import ForensicsError

    with pytest.raises(ForensicsError) as info:
        call()
    text = str(info.value)
    assert "job or upload folders, which cannot be opened by path" in text, text
    assert "\n" not in text and str(root) not in text and "SeCrEtToKeN" not in text, text
    return text


@pytest.mark.parametrize("column", ["image absolute", "image relative", "mask", "image via a symlink"])
def test_a_csv_in_an_allowed_folder_cannot_name_a_private_file(private_setup, column):
    s = private_setup
    probes, common = s["probes"], s["common"]
    named = {
        "image absolute": str(s["upload"]),
        "image relative": f"../gradio-up/{'e' * 64}/victim.png",
        "mask": "own.png",
        "image via a symlink": "link.png",
    }[column]
    (probes / "link.png").symlink_to(s["upload"])
    mask = f",{s['job']}" if column == "mask" else ","
    (probes / "probe.csv").write_text(f"image,caption,label,mask\nown.png,a cat,cat,\n{named},a dog,dog{mask}\n")
    text = _private_refusal(lambda: common.probe_choice(str(probes / "probe.csv")), s["root"])
    assert text.startswith(f"row 2 of probe.csv: {'mask' if column == 'mask' else 'image'} "), text
    # the same folder without the private row is accepted
    (probes / "probe.csv").write_text("image,caption,label\nown.png,a cat,cat\nown.png,a dog,dog\n")
    assert common.probe_choice(str(probes / "probe.csv")) == str((probes / "probe.csv").resolve())


@pytest.mark.parametrize("how", ["a linked image", "a linked class folder"])
def test_a_class_folder_in_an_allowed_folder_cannot_reach_a_private_file(private_setup, how):
    s = private_setup
    folder = s["probes"] / "classes"
    (folder / "cat").mkdir(parents=True)
    shutil.copy(s["probes"] / "own.png", folder / "cat" / "own.png")
    if how == "a linked image":
        (folder / "dog").mkdir()
        (folder / "dog" / "stolen.png").symlink_to(s["upload"])
    else:
        (folder / "dog").symlink_to(s["job"].parent)
    text = _private_refusal(lambda: s["common"].probe_choice(str(folder)), s["root"])
    assert text.startswith("classes: dog/"), text


@pytest.mark.parametrize("how", ["model by a symlink", "model's sidecar by a symlink", "model by a path", "SAM"])
def test_model_and_sam_paths_cannot_reach_a_private_file(private_setup, how):
    s = private_setup
    common, probes, job = s["common"], s["probes"], s["job"]
    if how == "model by a symlink":
        (probes / "suspect.safetensors").symlink_to(job.parent / "model.safetensors")
        call = lambda: common.typed_model_spec(str(probes / "suspect.safetensors"))  # noqa: E731
    elif how == "model's sidecar by a symlink":
        shutil.copy(DEMO_MODEL, probes / "suspect.safetensors")
        (job.parent / "model.json").write_text("{}")
        (probes / "suspect.json").symlink_to(job.parent / "model.json")
        call = lambda: common.typed_model_spec(str(probes / "suspect.safetensors"))  # noqa: E731
    elif how == "model by a path":
        call = lambda: common.typed_model_spec(f"{probes}/../work/SeCrEtToKeN/scan-abc/model.safetensors")  # noqa: E731
    else:
        call = lambda: common.sam_checkpoint_path(str(s["upload"]))  # noqa: E731
    _private_refusal(call, s["root"])


def test_a_served_workbench_keeps_uploads_private_and_limited(tmp_path):
    """``python app.py`` with the temp folder (so its job and upload folders) inside the allowed folder: another
    session's upload cannot be named by a CSV or a symlink; an oversize upload is refused; the page names the
    limits. About 10 s, so in the fast tier."""
    import httpx
    from PIL import Image

    srv = tmp_path / "srv"
    srv.mkdir()
    env = {"TMPDIR": str(srv), SERVER_PATHS_ENV: str(srv), "FORENSICS_MAX_UPLOAD_MB": "3"}
    with running_app(tmp_path, env) as url:
        b = Client(url, verbose=False)
        png = tmp_path / "victim.png"
        Image.new("RGB", (32, 32), "red").save(png)
        with open(png, "rb") as fh:  # session A's upload, as its browser sends it
            stored = httpx.post(f"{url}gradio_api/upload", files={"files": fh}, timeout=60).json()
        victim = Path(stored[0])
        assert victim.is_file() and victim.is_relative_to(srv / "gradio")
        probes = srv / "probes"
        probes.mkdir()
        Image.new("RGB", (32, 32), "white").save(probes / "own.png")
        (probes / "link.png").symlink_to(victim)
        for named in (str(victim), "link.png"):
            (probes / "probe.csv").write_text(f"image,caption,label\nown.png,a cat,cat\n{named},a dog,dog\n")
            text = _error(lambda: b.predict(str(probes / "probe.csv"), api_name="/evaluate"))
            assert "row 2 of probe.csv: image" in text and "job or upload folders" in text, text
            assert str(srv) not in text
        # an oversize upload, refused while it streams
        big = tmp_path / "big.pt"
        big.write_bytes(b"\0" * (5 * 1024 * 1024))
        with open(big, "rb") as fh:
            answer = httpx.post(f"{url}gradio_api/upload", files={"files": fh}, timeout=60)
        assert answer.status_code == 413 and "big.pt is larger than this server's limit of 3 MB" in answer.text
        assert not list((srv / "gradio").glob("*/big.pt"))
        status, page = _get(f"{url}config")
        assert status == 200 and b"Uploads: at most 3 MB per file" in page
