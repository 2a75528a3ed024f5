"""Uploads cannot fill the disk: a file over FORENSICS_MAX_UPLOAD_MB is refused while it streams (never more than the
limit on disk, nothing left after), a truncated or interrupted body leaves nothing, a client stops at its upload
budget, a session's jobs stay in its budget (its own oldest results go first), and the server's budget removes the
files of the sessions idle longest first, never those in use. Fast: one small Gradio app in this process, launched
with the workbench's own launch settings, and the budget's bookkeeping in-process."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from forensics.core.errors import ForensicsError
from forensics.ui import common
from forensics.ui.quota import (
    MAX_UPLOAD_ENV,
    MB,
    SERVER_DISK_ENV,
    SESSION_DISK_ENV,
    UPLOAD_GRACE_SECONDS,
    DiskBudget,
    Limits,
    tree_bytes,
)

LIMIT_MB, SESSION_MB, SERVER_MB = 2, 6, 40
BOUNDARY = "XyZbOuNdArY"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A one-button app (upload a file, copy it into a job folder of the session) launched with launch_kwargs(),
    its uploads and job folders in a folder of its own; yields (port, upload folder, work root)."""
    from forensics.ui.workbench import launch_kwargs

    root = tmp_path_factory.mktemp("limits")
    patch = pytest.MonkeyPatch()
    patch.setenv("GRADIO_TEMP_DIR", str(root / "uploads"))
    patch.setenv(MAX_UPLOAD_ENV, str(LIMIT_MB))
    patch.setenv(SESSION_DISK_ENV, str(SESSION_MB))
    patch.setenv(SERVER_DISK_ENV, str(SERVER_MB))
    patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    patch.setattr(common, "WORK_ROOT", root / "work")

    @common.guarded
    def keep(path: str, request: gr.Request = None) -> str:
        folder = common.new_job_dir("upload", request)
        shutil.copy(path, folder / Path(path).name)
        return folder.name

    with gr.Blocks() as blocks:
        upload, out = gr.File(type="filepath"), gr.Textbox()
        gr.Button().click(keep, upload, out, api_name="keep")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocks.queue().launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_kwargs()
    )
    try:
        yield port, root / "uploads", root / "work"
    finally:
        blocks.close()
        patch.undo()


def _head(name: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def _post(
    port: int, chunks, source: str, length: int | None = None, pause: float = 0.0, close_after: int | None = None
):
    """POST a multipart body to the upload route from ``source`` (a loopback address: its own client budget);
    chunked when ``length`` is None. Returns (status or None, text, bytes sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    conn.putrequest("POST", "/gradio_api/upload")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")
    if length is None:
        conn.putheader("Transfer-Encoding", "chunked")
    else:
        conn.putheader("Content-Length", str(length))
    conn.endheaders()
    sent = 0
    try:
        for chunk in chunks:
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if length is None else chunk)
            sent += len(chunk)
            if close_after is not None and sent >= close_after:
                conn.sock.shutdown(socket.SHUT_RDWR)
                conn.close()
                return None, "closed by the sender", sent
            if pause:
                time.sleep(pause)
        if length is None:
            conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server refused and closed; its answer may still be readable
    try:
        response = conn.getresponse()
        return response.status, response.read().decode(), sent
    except (OSError, http.client.HTTPException) as exc:
        return None, type(exc).__name__, sent
    finally:
        conn.close()


def _file(name: str, size: int, seed: int = 0, end: bool = True):
    yield _head(name)
    block = bytes([65 + seed % 26]) * (1 << 16)
    for _ in range(size // len(block)):
        yield block
    if end:
        yield TAIL


def _partials(uploads: Path) -> list[Path]:
    """What the upload folder holds outside finished uploads: Gradio's temporary files of bodies being read."""
    return [p for p in uploads.iterdir() if p.is_file()] if uploads.is_dir() else []


class _Peak(threading.Thread):
    """The most bytes seen in the upload folder's temporary files while an upload runs (sampled every 2 ms)."""

    def __init__(self, uploads: Path) -> None:
        super().__init__(daemon=True)
        self.uploads, self.peak, self.stop = uploads, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            size = 0
            for path in _partials(self.uploads):
                try:
                    size += path.stat().st_size
                except OSError:
                    pass
            self.peak = max(self.peak, size)
            time.sleep(0.002)


@pytest.mark.parametrize(
    "how",
    ["streamed without a length", "with its Content-Length", "second file of a request"],
)
def test_an_oversize_upload_is_refused_while_it_streams(server, how):
    port, uploads, _ = server
    size = 3 * LIMIT_MB * MB
    peak = _Peak(uploads)
    peak.start()
    if how == "streamed without a length":
        status, text, sent = _post(port, _file("big.pt", size), "127.0.0.11", pause=0.002)
    elif how == "with its Content-Length":
        body = list(_file("big.pt", size))
        status, text, sent = _post(port, body, "127.0.0.12", length=sum(map(len, body)))
    else:
        body = [_head("small.json"), b"{}\r\n", *_file("big.pt", size)]
        status, text, sent = _post(port, body, "127.0.0.13", pause=0.002)
    peak.stop.set()
    peak.join()
    assert status == 413, (status, text)
    assert "big.pt" in text and f"{LIMIT_MB} MB" in text and "\n" not in text.strip(), text
    assert peak.peak <= 1.1 * LIMIT_MB * MB, peak.peak  # never more than the limit on disk
    time.sleep(0.2)
    assert not _partials(uploads)  # and nothing of it kept
    assert not list(uploads.glob("*/big.pt"))


@pytest.mark.parametrize("how", ["no closing boundary", "sender goes away", "not multipart at all"])
def test_a_truncated_or_interrupted_upload_leaves_nothing(server, how):
    port, uploads, _ = server
    if how == "no closing boundary":
        status, text, _ = _post(port, _file("cut.pt", MB, end=False), "127.0.0.21")
        assert status == 400 and "cut.pt ended before its closing boundary" in text, text
    elif how == "sender goes away":
        status, text, _ = _post(port, _file("gone.pt", MB), "127.0.0.22", length=3 * MB, close_after=MB // 2)
        assert status is None
    else:
        status, text, _ = _post(port, [b"this is not a multipart body" * 100], "127.0.0.23")
        assert status == 400 and "not a well-formed multipart body" in text, text
    for _ in range(50):  # the server notices a vanished sender on its next read
        if not _partials(uploads):
            break
        time.sleep(0.1)
    assert not _partials(uploads)
    assert not list(uploads.glob("*/cut.pt")) and not list(uploads.glob("*/gone.pt"))


def test_a_stream_of_small_uploads_stops_at_the_clients_budget(server):
    port, uploads, _ = server
    answers = []
    for k in range(2 * SESSION_MB):
        body = list(_file(f"part{k}.bin", MB, seed=k))
        answers.append(_post(port, body, "127.0.0.31", length=sum(map(len, body)))[:2])
    accepted = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] != 200]
    assert SESSION_MB - 2 <= len(accepted) < SESSION_MB, answers
    assert all(a == answers[len(accepted)] or a[0] == 413 for a in refused)  # once refused, refused
    assert all(status == 413 and SESSION_DISK_ENV in text and "\n" not in text.strip() for status, text in refused)
    assert "part" in refused[0][1] and f"at most {SESSION_MB} MB per session" in refused[0][1]
    stored = sum(tree_bytes(p) for p in uploads.glob("*") if any(p.glob("part*.bin")))
    assert stored <= SESSION_MB * MB
    # another client is not held to this one's budget; a request of several files is held to it as a whole
    body = list(_file("other.bin", MB, seed=99))
    assert _post(port, body, "127.0.0.32", length=sum(map(len, body)))[0] == 200
    body = [chunk for k in range(SESSION_MB) for chunk in _file(f"many{k}.bin", MB, seed=40 + k)]
    status, text, _ = _post(port, body, "127.0.0.33", length=sum(map(len, body)))
    assert status == 413 and f"at most {SESSION_MB} MB per session" in text, text


def test_uploads_within_the_limit_reach_the_job(server, tmp_path):
    """The limits do not get in the way of an ordinary upload and job (gradio_client, as the workbench is used)."""
    from gradio_client import Client, handle_file

    port, _, work = server
    local = tmp_path / "model.safetensors"
    local.write_bytes(os.urandom(MB))
    job = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(handle_file(str(local)), api_name="/keep")
    copies = list(work.glob(f"*/{job}/model.safetensors"))
    assert len(copies) == 1 and copies[0].read_bytes() == local.read_bytes()


# ---------------------------------------------------------------------- the budgets' bookkeeping, in-process


def _folder(path: Path, size: int, age: float = 0.0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "data.bin").write_bytes(b"\0" * size)
    when = time.time() - age
    for p in (path / "data.bin", path):
        os.utime(p, (when, when))
    return path


def _budget(tmp_path: Path, sessions: dict, server_mb: float, session_mb: float = 4, clock=time.time) -> DiskBudget:
    limits = Limits(max_upload=MB, session=int(session_mb * MB), server=int(server_mb * MB))
    return DiskBudget(
        lambda: tmp_path / "work", lambda: tmp_path / "uploads", lambda: sessions, lambda: limits, clock=clock
    )


def test_the_server_budget_removes_the_idle_longest_first(tmp_path):
    work, uploads = tmp_path / "work", tmp_path / "uploads"
    old_a = _folder(work / "session-a", MB, age=7200)
    old_b = _folder(work / "session-b", MB, age=3600)
    active = _folder(work / "session-c", MB, age=9000)  # oldest, but running a call
    used = _folder(work / "session-d", MB, age=8000)  # its job is named by a running call
    old_upload = _folder(uploads / ("a" * 64), MB, age=5400)
    young_upload = _folder(uploads / ("b" * 64), MB, age=10)  # may be waiting in the queue for its job
    sessions = {"a": old_a, "b": old_b, "c": active, "d": used}
    budget = _budget(tmp_path, sessions, server_mb=5.5)
    with budget.call("c"), budget.call("x", referenced=[used / "data.bin"]):
        assert budget.make_room(MB // 2)  # 6 MB used: the oldest idle one goes
        assert not old_a.exists() and old_upload.exists() and old_b.exists()
        assert budget.make_room(MB + MB // 2)  # then the next oldest: the upload idle for 90 minutes
        assert not old_upload.exists() and old_b.exists()
        # what is left is in use or young: nothing more is removed, the room is refused
        assert not budget.make_room(3 * MB)
        assert old_b.exists() and active.exists() and used.exists() and young_upload.exists()
    assert budget.removed_bytes == 2 * MB


def test_a_sessions_jobs_stay_in_its_budget(tmp_path, monkeypatch):
    """Through guarded() and new_job_dir(), as the tabs use them: the session's own oldest idle results go first;
    its uploads too large for its budget, or results all in use, are refused in one line."""
    monkeypatch.setattr(common, "WORK_ROOT", tmp_path / "work")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv(MAX_UPLOAD_ENV, "1")
    monkeypatch.setenv(SESSION_DISK_ENV, "3")
    monkeypatch.setenv(SERVER_DISK_ENV, "100")
    request = gr.Request(session_hash="budget-test")

    @common.guarded
    def keep(path: str, state: dict, request: gr.Request = None) -> Path:
        folder = common.new_job_dir("upload", request)
        shutil.copy(path, folder / Path(path).name)
        return folder

    upload = _folder(tmp_path / "uploads" / ("c" * 64), 0) / "model.bin"
    upload.write_bytes(b"\1" * (MB - 1000))
    jobs = [keep(str(upload), {}, request) for _ in range(5)]
    session = jobs[0].parent
    assert tree_bytes(session) <= 3 * MB
    assert [j.exists() for j in jobs] == [False, False, True, True, True]  # oldest first
    # the state names the oldest kept job (a scan the next repair reads): the next oldest goes instead
    jobs.append(keep(str(upload), {"scan_dir": str(jobs[2])}, request))
    assert jobs[2].exists() and not jobs[3].exists() and tree_bytes(session) <= 3 * MB
    # a zip that unpacks beyond the session's budget is refused before anything is copied
    archive = upload.parent / "probe.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/a.png", b"\0" * (4 * MB))
    with pytest.raises(gr.Error) as info:
        keep(str(archive), {}, request)
    assert f"at most this session's disk budget of 3 MB ({SESSION_DISK_ENV})" in str(info.value.message)
    # every kept result in use by the call: refused, nothing removed
    kept = [j for j in jobs if j.exists()]
    with pytest.raises(gr.Error) as info:
        keep(str(upload), {"jobs": [str(j) for j in kept]}, request)
    assert "results are in use" in str(info.value.message) and all(j.exists() for j in kept)


def test_a_clients_own_aged_uploads_make_room_young_ones_do_not(tmp_path):
    uploads = tmp_path / "uploads"
    files = [_folder(uploads / (str(k) * 64), 0) / "x.bin" for k in range(3)]
    for k, path in enumerate(files):
        path.write_bytes(b"\0" * MB)
        when = time.time() - 3600 + k
        os.utime(path, (when, when))
    now = [time.time()]
    budget = _budget(tmp_path, {}, server_mb=100, session_mb=3, clock=lambda: now[0])
    budget.end_upload("10.0.0.1", 0, [str(p) for p in files])
    assert budget.client_usage("10.0.0.1") == 3 * MB
    allowed, refusal = budget.begin_upload("10.0.0.1", MB, "new.bin")  # the oldest (an hour idle) goes
    assert refusal is None and allowed == MB and not files[0].exists() and files[1].exists()
    budget.end_upload("10.0.0.1", allowed, [])
    for path in files[1:]:  # young ones stay: the stream is refused instead
        os.utime(path, None)
    allowed, refusal = budget.begin_upload("10.0.0.1", 2 * MB, "more.bin")
    assert allowed == 0 and "more.bin (2 MB) refused" in refusal and SESSION_DISK_ENV in refusal
    assert files[1].exists() and files[2].exists() and UPLOAD_GRACE_SECONDS >= 60


@pytest.mark.parametrize(
    "env, expected",
    [
        ({MAX_UPLOAD_ENV: "abc"}, f"{MAX_UPLOAD_ENV}='abc': expected a positive number of megabytes"),
        ({SESSION_DISK_ENV: "-5"}, f"{SESSION_DISK_ENV}='-5': expected a positive number"),
        ({SERVER_DISK_ENV: "nan"}, f"{SERVER_DISK_ENV}='nan': expected a positive number"),
        ({MAX_UPLOAD_ENV: "500", SESSION_DISK_ENV: "100"}, "a session could not hold one upload"),
        ({SESSION_DISK_ENV: "9000", SERVER_DISK_ENV: "8000"}, "the server could not hold one session"),
    ],
)
def test_limits_from_the_environment_are_checked(env, expected):
    with pytest.raises(ForensicsError) as info:
        Limits.from_env(env)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_the_page_names_the_limits(monkeypatch):
    monkeypatch.setenv(MAX_UPLOAD_ENV, "300")
    monkeypatch.setenv(SESSION_DISK_ENV, "2000")
    monkeypatch.setenv(SERVER_DISK_ENV, "10000")
    limits = Limits.from_env()
    assert (limits.max_upload, limits.session, limits.server) == (300 * MB, 2000 * MB, 10000 * MB)
    line = limits.describe()
    assert "300 MB per file" in line and "2000 MB" in line and "10000 MB in all" in line
    from forensics.ui.workbench import launch_kwargs

    kwargs = launch_kwargs()
    assert kwargs["max_file_size"] == 300 * MB and "allowed_paths" not in kwargs
    assert Limits.from_env({}).describe().startswith("Uploads: at most 1024 MB per file")
