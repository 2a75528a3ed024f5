"""Plumbing shared by the workbench tabs: error display, per-session state, job folders, cancellation."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from forensics.core.errors import ForensicsError
from forensics.core.models import ModelRef

log = logging.getLogger("forensics.ui")
WORK_ROOT = Path(tempfile.gettempdir()) / "clip-forensics-workbench"
JOB_TTL_SECONDS = 3 * 3600  # job folders older than this are removed when a new job starts
DEMO_CHOICES = {"demo (backdoored demo CLIP)": "demo", "demo-clean (its clean twin)": "demo-clean"}
CHECKPOINT = "checkpoint file (upload or server path)"
HUB = "hub id or pretrained tag (needs a network)"
MODEL_SOURCES = [*DEMO_CHOICES, CHECKPOINT, HUB]


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


def guarded(fn: Callable) -> Callable:
    """Show library errors (and anything unexpected) as an error message in the page; the session carries on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ForensicsError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # the page must stay usable whatever happens below
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"unexpected error ({type(exc).__name__}): {exc}", print_exception=False) from None

    return wrapper


def new_job_dir(kind: str) -> Path:
    """A fresh folder for one job's outputs; stale folders of earlier jobs are removed first."""
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in WORK_ROOT.iterdir():
        try:
            if old.is_dir() and now - old.stat().st_mtime > JOB_TTL_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=WORK_ROOT))


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
