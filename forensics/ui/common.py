"""Plumbing shared by the workbench tabs: error display, per-session state, job folders, cancellation, and the
rules for which server paths a user may name.

Isolation between browser sessions (a Space or a lab server runs one workbench for many people):

- Every browser session gets its own job folder, ``WORK_ROOT/<secrets.token_urlsafe(16)>``, created on its first
  job and remembered server-side by Gradio's ``session_hash``; the name is random, never derived from the hash,
  so it cannot be guessed. Each job of the session (scan, repair, compare, uploaded checkpoint or probe set) is a
  sub-folder of it; job folders older than ``JOB_TTL_SECONDS`` are removed when a new job starts, and session
  folders left empty are removed after the same time.
- Nothing under ``WORK_ROOT`` is served by path (it is not in ``allowed_paths``): Gradio serves only the files a
  handler returns, which it copies into its own cache under a content hash salted with a server secret, so a
  session gets its own outputs and nobody can fetch a job folder's file by naming it.
- Server paths are off by default. Set ``FORENSICS_ALLOW_SERVER_PATHS`` to one or more folders (separated by
  ``os.pathsep``, ``:`` on Linux) to let users type checkpoint, SAM checkpoint and probe-set paths that resolve
  (symlinks followed) inside those folders, e.g. ``FORENSICS_ALLOW_SERVER_PATHS=/models:/data/probes``. Without
  it, the Model tab's path box, custom probe paths and SAM paths answer "server paths are disabled on this server;
  upload the file instead". The bundled ``demo`` and ``demo-clean``, ``random:ARCH`` and hub ids stay allowed, and
  the workbench's own job and upload folders are never reachable by path, whatever the variable says.
- Whatever that variable names, the private folders (the job folders under ``WORK_ROOT`` and Gradio's upload and
  cache folder) are unreachable by path: a model path, its sidecar, a probe CSV or class folder, and every image,
  mask and classes.json a probe set names are resolved (symlinks followed) and refused when they land inside one,
  so neither a CSV nor a symbolic link in an allowed folder can name another session's upload or result.
- Images and masks named by a CSV in an uploaded zip must lie inside the extracted folder; error messages name
  files, never absolute server paths or folder listings.
- Disk: every upload is held to a per-file limit while it streams, and uploads and job folders to a per-session and
  a server-wide budget (the idle longest go first); :mod:`forensics.ui.quota` states the rules, ``BUDGET`` keeps
  them for this process (:func:`guarded` marks each call's session and files busy, :func:`new_job_dir` admits the
  job).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from forensics.core.errors import ForensicsError
from forensics.core.files import resolves_inside
from forensics.core.models import ModelRef
from forensics.ui.quota import DiskBudget, upload_estimate

log = logging.getLogger("forensics.ui")
WORK_ROOT = Path(tempfile.gettempdir()) / "clip-forensics-workbench"
JOB_TTL_SECONDS = 3 * 3600  # job folders older than this are removed when a new job starts
DEMO_CHOICES = {"demo (backdoored demo CLIP)": "demo", "demo-clean (its clean twin)": "demo-clean"}
DEMO_NAMES = tuple(DEMO_CHOICES.values())
CHECKPOINT = "checkpoint file (upload or server path)"
HUB = "hub id or pretrained tag (needs a network)"
MODEL_SOURCES = [*DEMO_CHOICES, CHECKPOINT, HUB]
SERVER_PATHS_ENV = "FORENSICS_ALLOW_SERVER_PATHS"
SERVER_PATHS_OFF = "server paths are disabled on this server; upload the file instead"


def initial_state() -> dict[str, Any]:
    """What one browser session remembers: the model, oracle, probe set, and the latest scan.

    FORENSICS_SAM_CHECKPOINT (a segment-anything .pth on the server) makes SAM the starting oracle.
    """
    sam = os.environ.get("FORENSICS_SAM_CHECKPOINT") or None
    return {
        "model": "demo",
        "arch": None,
        "quick_gelu": None,
        "oracle": "sam" if sam else "fallback",
        "sam_checkpoint": sam,
        "probe": "demo",
        "scan_dir": None,
        "report": None,
        "order": [],
        "selected": None,
    }


def model_ref(state: dict[str, Any]) -> ModelRef:
    """The session's model reference (spec, architecture, QuickGELU), as every pipeline takes it."""
    return ModelRef(state["model"], arch=state.get("arch"), quick_gelu=state.get("quick_gelu"))


# an absolute path not inside a URL, a hub id or a word: "/tmp/x/y.png", "'/srv/a b'" (up to the blank)
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;:()\[\]{}<>|]+")


def scrub_paths(text: str) -> str:
    """A message with every absolute server path cut to its last part (the file's own name)."""

    def name(match: re.Match) -> str:
        path = match.group(0)
        tail = path[len(path.rstrip("./")) :]  # a sentence's full stop, a folder's slash
        base = Path(path.rstrip("./")).name
        return base + tail if base else path

    return _ABS_PATH.sub(name, text)


def guarded(fn: Callable) -> Callable:
    """Show library errors (and anything unexpected) as an error message in the page; the session carries on.

    Absolute server paths in a message are reduced to file names: a message names the file, not where it lies.
    While it runs, the call's session is active and the uploads and job folders its arguments name (its state
    included) are busy, so no disk clean-up removes them from under it (see :class:`~forensics.ui.quota.DiskBudget`).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), kwargs.get("request"))
            referenced, incoming = _call_files((args, kwargs))
            with BUDGET.call(session_key(request), referenced, incoming):
                return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ForensicsError as exc:
            raise gr.Error(scrub_paths(str(exc)), print_exception=False) from None
        except Exception as exc:  # the page must stay usable whatever happens below
            log.exception("unexpected error in %s", fn.__name__)
            text = scrub_paths(f"unexpected error ({type(exc).__name__}): {exc}")
            raise gr.Error(text, print_exception=False) from None

    return wrapper


# ------------------------------------------------------------------ per-session job folders

_SESSIONS: dict[str, Path] = {}  # session_hash -> its job folder (random name, kept only here)
_SESSIONS_LOCK = threading.Lock()
LOCAL_SESSION = "local"  # calls without a Gradio request (the library, tests) share one folder of their own


def session_key(request: gr.Request | None) -> str:
    """The key of one browser session (Gradio's session_hash)."""
    return getattr(request, "session_hash", None) or LOCAL_SESSION


def upload_folder() -> Path:
    """Gradio's upload and cache folder for this process (``GRADIO_TEMP_DIR`` or ``<tmp>/gradio``)."""
    try:
        from gradio.utils import get_upload_folder

        return Path(get_upload_folder())
    except Exception:  # noqa: BLE001 - an older or newer Gradio without the helper
        return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


# the disk budgets of this process (limits read from the environment on each check; see forensics.ui.quota)
BUDGET = DiskBudget(work_root=lambda: WORK_ROOT, upload_root=upload_folder, sessions=lambda: dict(_SESSIONS))


def _call_files(values: object, depth: int = 0) -> tuple[list[Path], int]:
    """The paths inside the private folders that a call's arguments name (uploads, job folders in its state), and
    the disk its fresh uploads will take once a job holds them (zips at their unpacked size)."""
    found: list[Path] = []
    incoming = 0
    if depth > 5:
        return found, incoming
    if isinstance(values, (str, Path)):
        text = str(values)
        if len(text) < 4096 and os.path.isabs(text):
            path = Path(text)
            uploads = upload_folder()
            if resolves_inside(path, uploads):
                found.append(path)
                if path.is_file():
                    incoming += upload_estimate(path)
            elif resolves_inside(path, WORK_ROOT):
                found.append(path)
        return found, incoming
    if isinstance(values, dict):
        values = list(values.values())
    if isinstance(values, (list, tuple, set)):
        for value in values:
            more, extra = _call_files(value, depth + 1)
            found += more
            incoming += extra
    return found, incoming


def _prepare_work_root() -> None:
    if WORK_ROOT.is_symlink():
        raise ForensicsError("the workbench's job folder is a symbolic link; remove it and start again")
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    try:
        WORK_ROOT.chmod(0o700)  # other accounts on a lab server cannot list the session folders
    except OSError:
        pass


def _session_dir_locked(request: gr.Request | None) -> Path:
    key = session_key(request)
    folder = _SESSIONS.get(key)
    if folder is None:
        folder = _SESSIONS[key] = WORK_ROOT / secrets.token_urlsafe(16)
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def session_dir(request: gr.Request | None) -> Path:
    """This browser session's own job folder, ``WORK_ROOT/<random token>`` (made on first use)."""
    _prepare_work_root()
    with _SESSIONS_LOCK:
        return _session_dir_locked(request)


def _stale(path: Path, now: float) -> bool:
    return now - path.stat().st_mtime > JOB_TTL_SECONDS


def remove_stale_jobs(now: float | None = None) -> None:
    """Remove job folders older than JOB_TTL_SECONDS, then session folders left empty as long, and forget them.

    Folders of sessions this server does not know (an earlier run, the old one-folder-per-job layout) go whole
    once nothing in them changed for that long.
    """
    now = time.time() if now is None else now
    if not WORK_ROOT.is_dir():
        return
    with _SESSIONS_LOCK:
        known = set(_SESSIONS.values())
    for entry in WORK_ROOT.iterdir():
        try:
            if entry.is_symlink() or not entry.is_dir():
                continue
            if entry in known:
                for job in entry.iterdir():
                    if job.is_dir() and not job.is_symlink() and _stale(job, now):
                        shutil.rmtree(job, ignore_errors=True)
            elif _stale(entry, now):
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass
    with _SESSIONS_LOCK:
        for key, folder in list(_SESSIONS.items()):
            try:
                if not any(folder.iterdir()) and _stale(folder, now):
                    folder.rmdir()
                    del _SESSIONS[key]
            except FileNotFoundError:
                del _SESSIONS[key]
            except OSError:
                pass


def new_job_dir(kind: str, request: gr.Request | None = None) -> Path:
    """A fresh folder for one job's outputs inside this session's own folder; stale jobs are removed first, and the
    disk budgets admit the job (the session's and the server's, its uploads counted; a one-line ForensicsError
    when they cannot hold it). The folder stays busy, never cleaned up, until the call that made it ends."""
    _prepare_work_root()
    remove_stale_jobs()
    BUDGET.admit_job(session_key(request), session_dir(request))
    with _SESSIONS_LOCK:  # the session folder cannot be removed between being made and holding the job
        folder = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=_session_dir_locked(request)))
    BUDGET.job_made(folder)
    return folder


# ------------------------------------------------------------------ server paths a user may name


def allowed_server_folders() -> list[Path]:
    """The folders FORENSICS_ALLOW_SERVER_PATHS names (os.pathsep-separated), resolved; empty: paths are off."""
    raw = os.environ.get(SERVER_PATHS_ENV, "")
    return [Path(p.strip()).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def server_paths_enabled() -> bool:
    return bool(allowed_server_folders())


def _private_folders() -> list[Path]:
    """The workbench's job folders and Gradio's upload and cache folder (its default place too, where another
    Gradio server on the machine keeps its uploads): other sessions' files, never opened by path."""
    folders = [WORK_ROOT, upload_folder(), Path(tempfile.gettempdir()) / "gradio"]
    return list(dict.fromkeys(folder.expanduser().resolve() for folder in folders))


def is_private(path: str | Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) into the workbench's job folders or Gradio's upload folder."""
    return any(resolves_inside(path, private) for private in _private_folders())


PRIVATE = "lies in the workbench's job or upload folders, which cannot be opened by path; upload the file instead"


def refuse_private_probe_files(probe: Any, source: Path) -> None:
    """Refuse, in one line naming the row (a CSV) or the file (a class folder), a probe set read from a server path
    when any file it names (image, mask, classes.json, the manifest beside it) resolves into the private folders:
    a CSV or a symbolic link in an allowed folder must not reach another session's upload."""
    for number, item in enumerate(probe.items, start=1):
        for column, path in (("image", item.image), ("mask", item.mask)):
            if path is None or not is_private(path):
                continue
            if source.is_dir():
                shown = "/".join(Path(path).parts[-2:])
                raise ForensicsError(f"{source.name}: {shown} {PRIVATE}")
            raise ForensicsError(f"row {number} of {source.name}: {column} {Path(path).name!r} {PRIVATE}")
    extra = [Path(f) for f in probe.meta.get("files", [])]
    if source.is_file():
        extra.append(source.parent.parent / "manifest.json")
    for path in extra:
        if path.exists() and is_private(path):
            raise ForensicsError(f"{source.name}: {path.name} beside it {PRIVATE}")


def check_server_path(text: str) -> Path:
    """A path a user typed, resolved (symlinks followed, ``..`` collapsed), if this server allows it; else a
    one-line ForensicsError.

    Off unless FORENSICS_ALLOW_SERVER_PATHS names folders; then the resolved path must lie inside one of them,
    and never inside the workbench's job folders or Gradio's upload folder.
    """
    folders = allowed_server_folders()
    if not folders:
        raise ForensicsError(SERVER_PATHS_OFF)
    raw = (text or "").strip()
    if not raw:
        raise ForensicsError("no server path given")
    given = Path(raw).expanduser()
    name = given.name or raw
    try:
        resolved = given.resolve()
    except (OSError, RuntimeError):
        raise ForensicsError(f"the server path {name!r} cannot be resolved") from None
    if is_private(resolved):
        raise ForensicsError(f"{name} {PRIVATE}")
    if not any(resolves_inside(resolved, folder) for folder in folders):
        raise ForensicsError(
            f"{name} is outside the folders this server allows paths in ({SERVER_PATHS_ENV}); upload the file instead"
        )
    return resolved


def server_path_root(path: Path) -> Path:
    """The allowed folder holding ``path`` (a result of :func:`check_server_path`)."""
    return next(folder for folder in allowed_server_folders() if resolves_inside(path, folder))


_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
_HUB_ID = re.compile(r"hf-hub:[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_spec(spec: str) -> bool:
    """``hf-hub:ORG/NAME`` or ``ARCH:TAG`` with a pretrained tag open_clip knows (never a file path)."""
    if ".." in spec:
        return False
    if _HUB_ID.fullmatch(spec):
        return True
    arch, _, tag = spec.partition(":")
    if not tag or not _NAME.fullmatch(tag):
        return False
    import open_clip

    return arch in open_clip.list_models() and tag in open_clip.list_pretrained_tags_by_model(arch)


def hub_spec(text: str) -> str:
    """A hub id or pretrained tag a user typed, checked so that it cannot name a file on the server."""
    spec = (text or "").strip()
    if not is_hub_spec(spec):
        raise ForensicsError(
            "that is no hub id: give hf-hub:ORG/NAME or ARCH:PRETRAINED_TAG (e.g. ViT-B-32:openai); "
            "checkpoint files are uploaded"
        )
    return spec


def typed_model_spec(text: str) -> str:
    """What the Model tab's path box may hold: demo, demo-clean, random:ARCH, a hub id, or an allowed server path."""
    spec = (text or "").strip()
    if spec in DEMO_NAMES or is_hub_spec(spec):
        return spec
    if spec.startswith("random:"):
        if not _NAME.fullmatch(spec.split(":", 1)[1]):
            raise ForensicsError("random:ARCH needs an architecture name, e.g. random:tiny-vit")
        return spec
    path = check_server_path(spec)
    sidecar = path.with_suffix(".json")  # read beside the checkpoint when it exists
    if path.is_file() and sidecar.exists() and is_private(sidecar):
        raise ForensicsError(f"{path.name}: its sidecar {sidecar.name} {PRIVATE}")
    return str(path)


def sam_checkpoint_path(text: str) -> str | None:
    """The SAM checkpoint a user typed: the one the server was started with, or an allowed server path."""
    raw = (text or "").strip()
    if not raw:
        return None
    preset = (os.environ.get("FORENSICS_SAM_CHECKPOINT") or "").strip()
    if preset and raw == preset:
        return raw
    return str(check_server_path(raw))


def probe_choice(choice: str) -> str:
    """A probe set named in a dropdown: demo, demo-clean, or (where allowed) a CSV or class folder on the server
    whose images all lie inside the allowed folder."""
    from forensics.core.data import load_probe_set

    spec = (choice or "").strip()
    if spec in DEMO_NAMES:
        return spec
    path = check_server_path(spec)
    probe = load_probe_set(path, root=server_path_root(path))  # refuses rows naming images outside the folder
    refuse_private_probe_files(probe, path)  # and any that land in another session's files, whatever the folder
    return str(path)


def gr_progress(progress: gr.Progress) -> Callable[[float, str], None]:
    """The library's (fraction, message) callback drawn as Gradio's progress bar."""
    return lambda fraction, message: progress(float(min(max(fraction, 0.0), 1.0)), desc=message)


_CANCEL: dict[str, threading.Event] = {}


def cancel_flag(request: gr.Request | None) -> threading.Event:
    """The cancel switch of one browser session (the Cancel button sets it; long jobs poll it)."""
    key = getattr(request, "session_hash", None) or "default"
    return _CANCEL.setdefault(key, threading.Event())


def need_scan(state: dict) -> dict:
    """The latest scan report, or a clear message telling the user to run one."""
    if not state or not state.get("report"):
        raise gr.Error("run a scan first (Investigate tab)", print_exception=False)
    return state["report"]


def precision_choice() -> gr.Dropdown:
    """The repairs' precision: fp32, bf16 autocast, or auto (bf16 where this machine computes it natively)."""
    from forensics.core.precision import PRECISIONS, native_bf16

    here = "this CPU has native bf16" if native_bf16("cpu") else "this CPU has no native bf16"
    return gr.Dropdown(
        list(PRECISIONS),
        value="fp32",
        label="Precision",
        info=f"bf16: training passes about 1.6-2x faster where native ({here}); CA/ASR always measured in fp32",
    )
