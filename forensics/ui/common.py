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
- Images and masks named by a CSV in an uploaded zip must lie inside the extracted folder; error messages name
  files, never absolute server paths or folder listings.
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
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
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
    """A fresh folder for one job's outputs inside this session's own folder; stale jobs are removed first."""
    _prepare_work_root()
    remove_stale_jobs()
    with _SESSIONS_LOCK:  # the session folder cannot be removed between being made and holding the job
        return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=_session_dir_locked(request)))


# ------------------------------------------------------------------ server paths a user may name


def allowed_server_folders() -> list[Path]:
    """The folders FORENSICS_ALLOW_SERVER_PATHS names (os.pathsep-separated), resolved; empty: paths are off."""
    raw = os.environ.get(SERVER_PATHS_ENV, "")
    return [Path(p.strip()).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def server_paths_enabled() -> bool:
    return bool(allowed_server_folders())


def _private_folders() -> list[Path]:
    """The workbench's job folders and Gradio's upload folder: other sessions' files, never opened by path."""
    folders = [WORK_ROOT.resolve()]
    try:
        from gradio.utils import get_upload_folder

        folders.append(Path(get_upload_folder()).resolve())
    except Exception:  # noqa: BLE001 - an older or newer Gradio without the helper
        folders.append((Path(tempfile.gettempdir()) / "gradio").resolve())
    return folders


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
    if any(resolves_inside(resolved, private) for private in _private_folders()):
        raise ForensicsError(
            f"{name} lies in the workbench's job or upload folders, which cannot be opened by path; "
            "upload the file instead"
        )
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
    return str(check_server_path(spec))


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
    load_probe_set(path, root=server_path_root(path))  # refuses rows naming images outside the allowed folder
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
