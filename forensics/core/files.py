"""Outputs never replace inputs, and interrupted commands leave nothing half-written.

Every command names the files it will write and the files it read, and refuses, before writing anything, when
one resolves to the other (a model's sidecar, a probe CSV, a scan's findings); it writes into a temporary folder
beside ``--out`` and moves the finished files into place at the end (:func:`staged_output`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from forensics.core.errors import ForensicsError


def model_files(source: str | Path | None) -> list[Path]:
    """A checkpoint file and the JSON sidecar saved beside it (what loading it read)."""
    if not source:
        return []
    path = Path(source)
    if not path.exists():  # random:ARCH, hub ids
        return []
    return [path, path.with_suffix(".json")] if path.is_file() else [path]


def resolves_inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` resolves (symlinks followed, ``..`` collapsed) to ``root`` or below it; ``root`` is
    resolved too. A path that cannot be resolved is not inside."""
    try:
        return Path(path).expanduser().resolve().is_relative_to(Path(root).expanduser().resolve())
    except (OSError, RuntimeError):
        return False


def _key(path: Path) -> Path:
    return Path(path).expanduser().resolve()


def refuse_overwriting_inputs(
    outputs: Iterable[str | Path], inputs: Iterable[str | Path], whole_folders: bool = True
) -> None:
    """Raise one ForensicsError line when any of ``outputs`` is (by resolved path) one of ``inputs``, or an input
    lies in an output's folder (a run replaces that folder whole: :func:`staged_output`; ``whole_folders=False``
    for a command that writes single files in place)."""
    inputs, outputs = list(inputs), list(outputs)
    read = {_key(Path(p)) for p in inputs}
    for out in outputs:
        if _key(Path(out)) in read:
            raise ForensicsError(
                f"refusing to write {Path(out).name} in {Path(out).parent}: it would replace one of this command's "
                "inputs (the model, its sidecar, the probe set, the data or the findings); choose another --out"
            )
    outputs = outputs if whole_folders else []
    for folder in sorted({Path(out).parent for out in outputs}):
        refuse_inputs_inside(folder, inputs)


OUTPUT_MANIFEST = ".forensics-output.json"  # in every output folder: the files its last run wrote


def _listed_files(folder: Path) -> set[str] | None:
    """The files an output folder's manifest names (relative paths), or None when it has no readable manifest."""
    try:
        data = json.loads((folder / OUTPUT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def _foreign_files(folder: Path) -> list[str]:
    """Files in ``folder`` (recursively) that its manifest does not name: not written by this tool's last run there.
    An empty folder has none; a folder with files and no manifest has all of them."""
    present = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir() and p.name != OUTPUT_MANIFEST
    )
    listed = _listed_files(folder) or set()
    return [f for f in present if f not in listed]


def check_output_folder(out: str | Path, incremental: bool = False) -> Path:
    """Say now, in one ForensicsError line, when ``out`` cannot become the output folder (it is a file, the nearest
    existing folder above it is not writable, or it holds files this tool's last run there did not write), so no
    long step runs before the writing fails. A run replaces the whole folder, so it must hold only a previous
    run's outputs (named by its manifest), or nothing: a user's own files are never deleted. ``incremental``: a
    folder a command resumes in (scan-many's audit, one sub-folder per model) is added to, never replaced."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ForensicsError(f"--out {out} is a file, not a folder; choose a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ForensicsError(f"cannot create the output folder {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ForensicsError(f"the output folder {out} cannot be written ({existing} is not writable)")
    if out.is_dir() and not incremental:
        foreign = _foreign_files(out)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise ForensicsError(
                f"--out {out} holds files no earlier run of this tool wrote there ({foreign[0]!r}{more}); a run "
                "replaces its output folder whole, so choose a new or empty folder"
            )
    return out


def refuse_inputs_inside(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Raise one ForensicsError line when one of ``inputs`` lies inside ``out``: the run replaces that folder whole,
    so the input would be deleted with the previous result."""
    out = Path(out).expanduser()
    for path in inputs:
        if Path(path).exists() and resolves_inside(path, out):
            raise ForensicsError(
                f"refusing to write into {out}: it holds {Path(path).name}, one of this command's inputs, and a run "
                "replaces its output folder whole; choose another --out"
            )


def _write_manifest(stage: Path) -> None:
    files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if not p.is_dir())
    (stage / OUTPUT_MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


@contextmanager
def staged_output(out: str | Path, incremental: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write a command's outputs into; when the block ends normally it replaces
    ``out`` whole (renamed into place, the previous folder renamed aside and then deleted), so ``out`` holds exactly
    this run's files, listed in its manifest. When the block fails or is interrupted (Ctrl-C, SIGTERM: see
    :func:`termination_as_interrupt`) the temporary folder is removed: ``out`` keeps its previous result, or stays
    absent. ``incremental`` (a folder a command resumes in): the staged files replace their namesakes one by one
    with ``os.replace`` and everything else in ``out`` stays."""
    out = check_output_folder(out, incremental)
    if out.is_symlink():
        out = out.resolve()  # replace the folder the link names, not the link
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        if not incremental:
            _write_manifest(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if incremental and out.exists():
        _move_files_into(stage, out)
        return
    old = None
    try:
        if out.exists():
            check_output_folder(out)  # nothing foreign arrived while the command ran
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
        os.replace(stage, out)
    except OSError as exc:
        if old is not None and (old / "previous").exists() and not out.exists():
            os.replace(old / "previous", out)  # put the previous result back
        raise ForensicsError(f"cannot move the outputs into {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _move_files_into(stage: Path, out: Path) -> None:
    """Each staged file replaces its namesake in ``out`` (``os.replace``); the staging folder goes afterwards."""
    try:
        for file in sorted(p for p in stage.rglob("*") if p.is_file()):
            target = out / file.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    except OSError as exc:
        raise ForensicsError(f"cannot move the outputs into {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP ended the command: raised like Ctrl-C, so every staged output is cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """While the block runs (main thread only), SIGTERM and SIGHUP raise :class:`Terminated` instead of killing the
    process outright, so ``finally`` blocks and :func:`staged_output` leave nothing half-written; the previous
    handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, raise_terminated)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
