"""Disk budgets for the workbench: a size limit per uploaded file, enforced while the upload streams, and disk budgets
per session and for the whole server, covering uploads and job folders.

The rules, and why:

- **Per file**: ``FORENSICS_MAX_UPLOAD_MB`` (default 1024 MB: the app takes CLIP checkpoints of a few hundred MB, a
  ViT-L in half precision stays under 1 GB, and probe zips are smaller). :class:`UploadLimitMiddleware` counts every
  multipart request's bytes as they arrive and refuses the chunk that would take a file past the limit before Gradio
  writes it, so at most the limit is ever on disk; what Gradio had written is removed. A request whose
  ``Content-Length`` is already beyond what its sender may store is refused before its body is read. A body that
  ends before its closing boundary, or a sender that goes away mid-upload, leaves nothing behind (Gradio alone kept
  the partial file).
- **Per session**: ``FORENSICS_SESSION_DISK_MB`` (default 4096 MB). Gradio's upload route carries no session id (the
  browser uploads before any event runs), so uploads are counted per client address: the files it uploaded that are
  still on disk plus what it is uploading now may not pass the budget. Job folders are counted per browser session:
  before a new job folder is made, the session's own oldest job folders that no running call and nothing in its state
  uses are removed until the job's uploads fit; if they still do not, the job is refused.
- **Whole server**: ``FORENSICS_DISK_BUDGET_MB`` (default 16384 MB) for Gradio's upload folder and every job folder
  together. Before an upload or a new job would pass it, the files idle longest go first: whole session folders of
  sessions with no running call (by their last activity), and uploaded or cached files older than
  :data:`UPLOAD_GRACE_SECONDS` (younger ones may be waiting in the queue for their job). When that frees too little,
  the upload or job is refused with one line naming the budget.

The budgets are checked before every upload and every job; what a running job writes (a scan's report, a repaired
model, an extracted zip) counts from the next check on, and :data:`JOB_HEADROOM_BYTES` is kept free for it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from forensics.core.errors import ForensicsError

log = logging.getLogger("forensics.ui.quota")

MB = 1024 * 1024
MAX_UPLOAD_ENV = "FORENSICS_MAX_UPLOAD_MB"
SESSION_DISK_ENV = "FORENSICS_SESSION_DISK_MB"
SERVER_DISK_ENV = "FORENSICS_DISK_BUDGET_MB"
DEFAULT_MB = {MAX_UPLOAD_ENV: 1024, SESSION_DISK_ENV: 4096, SERVER_DISK_ENV: 16384}
UPLOAD_GRACE_SECONDS = 600  # an upload this young may still wait in the queue for the job that reads it
JOB_HEADROOM_BYTES = 16 * MB  # kept free for what a new job writes (a scan's report is about 6 MB)
MULTIPART_SLACK = MB  # a streamed body of unknown length may carry this much besides one file (framing, fields)
_HASH_DIR = re.compile(r"[0-9a-f]{64}")  # Gradio's upload and cache folders: <upload root>/<sha256>/<name>


def _mb(n: float) -> str:
    value = n / MB
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


@dataclass(frozen=True)
class Limits:
    """The three limits in bytes, read from the environment (megabytes there)."""

    max_upload: int
    session: int
    server: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Limits":
        """The limits the environment sets (defaults for unset ones); a value that is no positive number, or limits
        that cannot hold each other (a session smaller than one upload, a server smaller than one session), are a
        one-line ForensicsError naming the variable."""
        env = os.environ if env is None else env
        values: dict[str, int] = {}
        for name, default in DEFAULT_MB.items():
            raw = (env.get(name) or "").strip()
            try:
                mb = float(raw) if raw else float(default)
            except ValueError:
                mb = math.nan
            if not math.isfinite(mb) or mb <= 0:
                raise ForensicsError(f"{name}={raw!r}: expected a positive number of megabytes (MB)")
            values[name] = max(1, int(mb * MB))
        limits = cls(values[MAX_UPLOAD_ENV], values[SESSION_DISK_ENV], values[SERVER_DISK_ENV])
        if limits.session < limits.max_upload:
            raise ForensicsError(
                f"{SESSION_DISK_ENV} ({_mb(limits.session)} MB) is smaller than {MAX_UPLOAD_ENV} "
                f"({_mb(limits.max_upload)} MB): a session could not hold one upload; expected at least as much"
            )
        if limits.server < limits.session:
            raise ForensicsError(
                f"{SERVER_DISK_ENV} ({_mb(limits.server)} MB) is smaller than {SESSION_DISK_ENV} "
                f"({_mb(limits.session)} MB): the server could not hold one session; expected at least as much"
            )
        return limits

    def describe(self) -> str:
        """The limits as one line for the page."""
        return (
            f"Uploads: at most {_mb(self.max_upload)} MB per file; each session keeps at most "
            f"{_mb(self.session)} MB of uploads and as much of results, the server {_mb(self.server)} MB in all "
            "(the files of the sessions idle longest are removed first)."
        )


def tree_bytes(path: str | Path) -> int:
    """Bytes of the regular files at or under ``path`` (symbolic links not followed, vanished entries skipped)."""
    path = Path(path)
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size if path.is_file() and not path.is_symlink() else 0
    except OSError:
        return 0
    total, stack = 0, [str(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def _newest_mtime(path: Path) -> float:
    """The latest modification time of ``path`` and its direct children (a folder's own mtime misses edits inside
    its sub-folders; one level is what the job and upload layouts need)."""
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            with os.scandir(path) as entries:
                for entry in entries:
                    try:
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                    except OSError:
                        continue
        return newest
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def upload_estimate(path: Path) -> int:
    """Disk an uploaded file will take once a job holds it: its size, or for a zip what it unpacks to (bounded by
    the extractor's own limit), since probe zips are extracted into the job folder."""
    try:
        size = path.stat().st_size
    except OSError:
        return 0
    if path.suffix.lower() == ".zip":
        import zipfile

        from forensics.core.data import MAX_ARCHIVE_BYTES

        try:
            with zipfile.ZipFile(path) as zf:
                return max(size, min(sum(i.file_size for i in zf.infolist()), MAX_ARCHIVE_BYTES))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return size
    return size


@dataclass
class _Removable:
    path: Path
    size: int
    when: float  # last activity: older goes first


class DiskBudget:
    """The disk budgets of one workbench process: the bookkeeping, the admission checks and the clean-up.

    ``work_root``: where the job folders live (one folder per browser session); ``upload_root``: Gradio's upload and
    cache folder; ``sessions``: the current map of session key to its job folder. Callables, so a test or a
    reconfigured server is followed. Thread-safe: one lock guards the bookkeeping and every removal.
    """

    def __init__(
        self,
        work_root: Callable[[], Path],
        upload_root: Callable[[], Path],
        sessions: Callable[[], Mapping[str, Path]],
        limits: Callable[[], Limits] = Limits.from_env,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._work_root, self._upload_root, self._sessions = work_root, upload_root, sessions
        self._limits, self._clock = limits, clock
        self._lock = threading.RLock()
        self._busy: Counter[Path] = Counter()  # paths a running call uses: never removed
        self._active: Counter[str] = Counter()  # sessions with a running call
        self._seen: dict[str, float] = {}  # session -> its last call's start or end
        self._uploads: dict[str, dict[Path, int]] = {}  # client address -> its stored uploads and their sizes
        self._reserved: Counter[str] = Counter()  # client address -> bytes reserved by its uploads in flight
        self._local = threading.local()
        self.removed_bytes = 0  # what clean-ups removed so far (for the load bench)

    @property
    def limits(self) -> Limits:
        return self._limits()

    # ------------------------------------------------------------------ what is used

    def usage(self) -> int:
        """Bytes in the job folders and Gradio's upload folder, plus the uploads in flight not yet written."""
        with self._lock:
            return tree_bytes(self._work_root()) + tree_bytes(self._upload_root()) + sum(self._reserved.values())

    def _is_busy(self, path: Path) -> bool:
        return any(p == path or p.is_relative_to(path) for p in self._busy)

    def client_usage(self, client: str) -> int:
        """Bytes of the uploads ``client`` made that are still on disk (forgetting those that are gone)."""
        with self._lock:
            files = self._uploads.get(client, {})
            for path in [p for p in files if not p.is_file()]:
                del files[path]
            return sum(files.values())

    # ------------------------------------------------------------------ clean-up, oldest first

    def _removables(self) -> list[_Removable]:
        now = self._clock()
        owner = {Path(folder): key for key, folder in self._sessions().items()}
        found: list[_Removable] = []
        root = self._work_root()
        if root.is_dir() and not root.is_symlink():
            for entry in root.iterdir():
                key = owner.get(entry)
                if entry.is_symlink() or not entry.is_dir() or (key and self._active[key]) or self._is_busy(entry):
                    continue
                when = self._seen.get(key) if key else None
                found.append(_Removable(entry, tree_bytes(entry), when or _newest_mtime(entry)))
        uploads = self._upload_root()
        if uploads.is_dir() and not uploads.is_symlink():
            for entry in uploads.iterdir():
                if entry.is_symlink() or self._is_busy(entry):
                    continue
                if not (
                    (entry.is_dir() and _HASH_DIR.fullmatch(entry.name))
                    or (entry.is_file() and entry.name.startswith("tmp"))
                ):
                    continue
                when = _newest_mtime(entry)
                if now - when >= UPLOAD_GRACE_SECONDS:
                    found.append(_Removable(entry, tree_bytes(entry), when))
        return sorted(found, key=lambda r: r.when)

    def make_room(self, need: int) -> bool:
        """Whether ``need`` more bytes fit the server's budget, after removing the files idle longest if they did
        not (see the module's rules); False when even that is not enough (nothing more is removed then)."""
        with self._lock:
            budget = self.limits.server
            used = self.usage()
            if used + need <= budget:
                return True
            candidates = self._removables()
            if used - sum(c.size for c in candidates) + need > budget:
                return False
            for victim in candidates:
                if used + need <= budget:
                    break
                log.warning(
                    "disk budget: removing %s (%d bytes, idle since %.0f)", victim.path, victim.size, victim.when
                )
                _remove(victim.path)
                used -= victim.size
                self.removed_bytes += victim.size
            return used + need <= budget

    # ------------------------------------------------------------------ jobs (calls of the page)

    @contextmanager
    def call(self, session: str, referenced: Iterable[Path] = (), incoming: int = 0) -> Iterator[None]:
        """One call of a session: while it runs, the session counts as active (its folder is never removed by
        another session's clean-up) and ``referenced`` paths (its uploads, the folders its state names) and the
        job folders it makes are busy. ``incoming``: the disk its uploads will take once copied into a job."""
        referenced = [Path(p) for p in referenced]
        with self._lock:
            self._active[session] += 1
            self._seen[session] = self._clock()
            self._busy.update(referenced)
        outer = getattr(self._local, "call", None)
        self._local.call = {"session": session, "incoming": incoming, "made": []}
        try:
            yield
        finally:
            made = self._local.call["made"]
            self._local.call = outer
            with self._lock:
                self._active[session] -= 1
                if self._active[session] <= 0:
                    del self._active[session]
                self._busy.subtract(referenced + made)
                self._busy += Counter()  # drop counts at zero
                self._seen[session] = self._clock()

    def admit_job(self, session: str, folder: Path) -> None:
        """Before ``session`` makes a job folder inside its ``folder``: the session's budget (its own idle job
        folders removed oldest first when the call's uploads would not fit) and the server's (others' idle files
        removed oldest first); a one-line ForensicsError when either cannot hold the job."""
        current = getattr(self._local, "call", None)
        incoming = current["incoming"] if current and current["session"] == session else 0
        if current and current["session"] == session:
            current["incoming"] = 0  # counted once per call, at its first job folder
        with self._lock:
            limits = self.limits
            if incoming > limits.session:
                raise ForensicsError(
                    f"the uploaded files would take {_mb(incoming)} MB once unpacked; expected at most this "
                    f"session's disk budget of {_mb(limits.session)} MB ({SESSION_DISK_ENV})"
                )
            used = tree_bytes(folder)
            if used + incoming > limits.session and folder.is_dir():
                jobs = [j for j in folder.iterdir() if j.is_dir() and not j.is_symlink() and not self._is_busy(j)]
                for job in sorted(jobs, key=_newest_mtime):
                    if used + incoming <= limits.session:
                        break
                    size = tree_bytes(job)
                    log.warning("session budget: removing %s (%d bytes)", job, size)
                    _remove(job)
                    used -= size
                    self.removed_bytes += size
            if used + incoming > limits.session:
                raise ForensicsError(
                    f"this session's results take {_mb(used)} MB and its uploads {_mb(incoming)} MB more; expected "
                    f"at most {_mb(limits.session)} MB in all ({SESSION_DISK_ENV}), and its results are in use"
                )
            if not self.make_room(incoming + JOB_HEADROOM_BYTES):
                raise ForensicsError(
                    f"the server's disk budget for uploads and results ({_mb(limits.server)} MB, {SERVER_DISK_ENV}) "
                    "is full with files in use; try again in a few minutes"
                )

    def job_made(self, folder: Path) -> None:
        """A job folder the current call made: busy until the call ends."""
        current = getattr(self._local, "call", None)
        with self._lock:
            self._busy[Path(folder)] += 1
        if current is not None:
            current["made"].append(Path(folder))

    # ------------------------------------------------------------------ uploads (Gradio's upload route)

    def _drop_own_uploads(self, client: str, need: int, left: int) -> int:
        """Remove ``client``'s own uploads idle for UPLOAD_GRACE_SECONDS and in no running call, oldest first, until
        ``need`` fits; returns the room left after. A client that keeps uploading for hours goes on; one that streams
        uploads faster than they age stops at its budget."""
        now = self._clock()
        files = self._uploads.get(client, {})
        aged = [(p, _newest_mtime(p)) for p in files if not self._is_busy(p) and not self._is_busy(p.parent)]
        for path, when in sorted(aged, key=lambda pair: pair[1]):
            if need <= left:
                break
            if now - when < UPLOAD_GRACE_SECONDS:
                break
            size = files.pop(path, 0)
            in_hash_dir = path.parent.parent.resolve() == self._upload_root().resolve()
            _remove(path.parent if in_hash_dir else path)
            left += size
            self.removed_bytes += size
        return left

    def begin_upload(self, client: str, length: int | None, filename: str) -> tuple[int, str | None]:
        """Reserve room for an upload of ``length`` bytes (None: unknown, a streamed body) from ``client`` (its
        address); returns the bytes it may send and None, or 0 and the one-line refusal. Over the client's budget
        its own aged uploads go first; over the server's, the files idle longest (:meth:`make_room`)."""
        with self._lock:
            limits = self.limits
            what = f"upload {filename}" if filename else "the upload"
            if length is not None and length > limits.session:
                return 0, (
                    f"{what} ({_mb(length)} MB) is larger than one session may store; expected at most "
                    f"{_mb(limits.session)} MB per session ({SESSION_DISK_ENV}) and {_mb(limits.max_upload)} MB per "
                    f"file ({MAX_UPLOAD_ENV})"
                )
            stored = self.client_usage(client)
            left = limits.session - stored - self._reserved[client]
            want = length if length is not None else limits.max_upload + MULTIPART_SLACK
            if want > left:
                left = self._drop_own_uploads(client, want, left)
                stored = self.client_usage(client)
            if left <= 0 or (length is not None and length > left):
                size = f" ({_mb(length)} MB)" if length is not None else ""
                return 0, (
                    f"{what}{size} refused: this client already stores {_mb(stored)} MB of uploads; expected at most "
                    f"{_mb(limits.session)} MB per session ({SESSION_DISK_ENV}); reuse them, or upload again once "
                    "they are older than ten minutes"
                )
            need = min(want, left)
            if not self.make_room(need):
                return 0, (
                    f"{what} refused: the server's disk budget for uploads and results ({_mb(limits.server)} MB, "
                    f"{SERVER_DISK_ENV}) is full with files in use; try again in a few minutes"
                )
            self._reserved[client] += need
            return need, None

    def end_upload(self, client: str, reserved: int, stored: Iterable[str]) -> None:
        """Release an upload's reservation and count the files it stored (paths inside the upload folder) against
        ``client``."""
        root = self._upload_root().resolve()
        with self._lock:
            self._reserved[client] -= reserved
            if self._reserved[client] <= 0:
                del self._reserved[client]
            files = self._uploads.setdefault(client, {})
            for text in stored:
                path = Path(text)
                try:
                    if path.resolve().is_relative_to(root) and path.is_file():
                        files[path] = path.stat().st_size
                except OSError:
                    continue


# ---------------------------------------------------------------------- the ASGI middleware


class _Refused(Exception):
    pass


class _Scanner:
    """A second, light multipart reading of a request body as it streams: the name of the file being sent, its
    bytes so far, and whether the body ended with its closing boundary."""

    def __init__(self, boundary: bytes) -> None:
        from python_multipart.multipart import MultipartParser

        self.filename = ""
        self.part_bytes = 0
        self.largest = 0
        self._header = b""
        self._value = b""
        self._disposition = b""
        callbacks: dict[str, Any] = {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._grow("_header", d[s:e]),
            "on_header_value": lambda d, s, e: self._grow("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def _grow(self, attr: str, data: bytes) -> None:
        if len(getattr(self, attr)) < 8192:
            setattr(self, attr, getattr(self, attr) + data)

    def _begin(self) -> None:
        self.part_bytes, self._disposition = 0, b""

    def _header_end(self) -> None:
        if self._header.strip().lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def _headers_done(self) -> None:
        from starlette.formparsers import parse_options_header

        _, options = parse_options_header(self._disposition)
        name = options.get(b"filename")
        self.filename = Path(name.decode("utf-8", "replace")).name[:120] if name else ""

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.part_bytes += end - start
        self.largest = max(self.largest, self.part_bytes)

    def write(self, data: bytes) -> None:
        self.parser.write(data)

    @property
    def ended(self) -> bool:
        from python_multipart.multipart import MultipartState

        return self.parser.state == MultipartState.END


class UploadLimitMiddleware:
    """ASGI middleware that holds every multipart POST (Gradio's upload route, its component server) to the
    per-file limit and the upload budgets while the body streams (the rules are in the module's docstring).

    A refusal is answered with status 413 (too large, over a budget) or 400 (a broken or interrupted body) and one
    line of text naming the file and what was expected. When the body is already being read, the refusal is raised
    inside Gradio's reading as the exception its multipart parser cleans up after, so its partial file is deleted.
    """

    def __init__(self, app: Callable, budget: DiskBudget) -> None:
        self.app, self.budget = app, budget

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers
        from starlette.formparsers import parse_options_header

        headers = Headers(scope=scope)
        kind, params = parse_options_header(headers.get("content-type", ""))
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            return await self.app(scope, receive, send)
        length_text = headers.get("content-length")
        length = int(length_text) if length_text and length_text.isdigit() else None
        await _GuardedUpload(self, scope, receive, send, params[b"boundary"], length).run()


class _GuardedUpload:
    """One multipart request under :class:`UploadLimitMiddleware`."""

    def __init__(
        self, owner: UploadLimitMiddleware, scope: dict, receive: Callable, send: Callable, boundary: bytes, length
    ) -> None:
        self.app, self.budget = owner.app, owner.budget
        self.scope, self._receive, self._send = scope, receive, send
        self.length = length
        self.client = (scope.get("client") or ("unknown", 0))[0]
        self.scanner = _Scanner(boundary)
        self.limits = self.budget.limits
        self.received = 0
        self.allowed = 0
        self.ended = False
        self.refusal: tuple[int, str] | None = None
        self.answered = False
        self.capture = scope.get("path", "").rstrip("/").endswith("/upload")
        self.status = 0
        self.body = bytearray()
        self.pending: list[dict] = []

    def _what(self) -> str:
        return f"upload {self.scanner.filename}" if self.scanner.filename else "the upload"

    def _refuse(self, status: int, text: str) -> _Refused:
        self.refusal = (status, text)
        return _Refused(text)

    def _take(self, message: dict) -> None:
        """Count and scan one body message; raise _Refused when it breaks a rule (before anyone writes it)."""
        if message["type"] == "http.disconnect":
            if not self.ended:
                raise self._refuse(400, f"{self._what()} was interrupted before its end; nothing of it was kept")
            return
        if message["type"] != "http.request":
            return
        body = message.get("body", b"")
        self.received += len(body)
        try:
            self.scanner.write(body)
        except Exception:  # noqa: BLE001 - python_multipart's parse errors: the body is no valid multipart
            raise self._refuse(400, f"{self._what()} is not a well-formed multipart body; expected a form upload")
        if self.scanner.largest > self.limits.max_upload:
            raise self._refuse(
                413,
                f"{self._what()} is larger than this server's limit of {_mb(self.limits.max_upload)} MB per file "
                f"({MAX_UPLOAD_ENV}); expected a smaller file",
            )
        if self.received > self.allowed:
            raise self._refuse(
                413,
                f"{self._what()} sent more than the {_mb(self.allowed)} MB reserved for it "
                f"({SESSION_DISK_ENV}, {SERVER_DISK_ENV}); expected a smaller upload",
            )
        if not message.get("more_body", False):
            self.ended = True
            if not self.scanner.ended:
                raise self._refuse(
                    400, f"{self._what()} ended before its closing boundary (a truncated body); nothing of it was kept"
                )

    async def receive(self) -> dict:
        from starlette.formparsers import MultiPartException

        if self.pending:
            return self.pending.pop(0)
        if self.refusal is not None:
            raise MultiPartException(self.refusal[1])
        message = await self._receive()
        try:
            self._take(message)
        except _Refused as exc:
            raise MultiPartException(str(exc)) from None  # Gradio's parser deletes its partial files on this one
        return message

    async def send(self, message: dict) -> None:
        if self.refusal is not None:
            if message["type"] == "http.response.start":
                await self._answer()
            return  # the app's own answer to the refusal is replaced by ours
        if self.capture:
            if message["type"] == "http.response.start":
                self.status = int(message.get("status", 0))
            elif message["type"] == "http.response.body" and len(self.body) < MB:
                self.body += message.get("body", b"")
        await self._send(message)

    async def _answer(self) -> None:
        if self.answered or self.refusal is None:
            return
        self.answered = True
        status, text = self.refusal
        body = (text + "\n").encode()
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await self._send({"type": "http.response.body", "body": body})

    async def run(self) -> None:
        import anyio.to_thread

        # the first message names the file: read it before deciding, so a refusal can say which file it was
        first = await self._receive()
        try:
            self.allowed = 1 << 62  # the budget is asked next, with the file's name
            self._take(first)
        except _Refused:
            await self._answer()
            return
        self.allowed, reason = await anyio.to_thread.run_sync(
            self.budget.begin_upload, self.client, self.length, self.scanner.filename
        )
        if reason is not None or self.received > self.allowed:
            self.refusal = (413, reason or f"{self._what()} is larger than the room reserved for it")
            await self._answer()
            return
        self.pending = [first]
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception:
            if self.refusal is None:
                raise
            await self._answer()  # an app that let the refusal through unanswered
        finally:
            stored: list[str] = []
            if self.capture and self.status == 200 and self.refusal is None:
                try:
                    answer = json.loads(bytes(self.body) or b"[]")
                    stored = [p for p in answer if isinstance(p, str)] if isinstance(answer, list) else []
                except ValueError:
                    stored = []
            await anyio.to_thread.run_sync(self.budget.end_upload, self.client, self.allowed, stored)
