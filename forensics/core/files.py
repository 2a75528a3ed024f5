"""Outputs never replace inputs, and interrupted commands leave nothing half-written.

Every command names the files it will write and the files it read, and refuses, before writing anything, when
one resolves to the other (a model's sidecar, a probe CSV, a scan's findings); it writes into a temporary folder
beside ``--out`` and moves the finished files into place at the end (:func:`staged_output`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
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


def refuse_overwriting_inputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path]) -> None:
    """Raise one ForensicsError line when any of ``outputs`` is (by resolved path) one of ``inputs``."""
    read = {_key(Path(p)) for p in inputs}
    for out in outputs:
        if _key(Path(out)) in read:
            raise ForensicsError(
                f"refusing to write {Path(out).name} in {Path(out).parent}: it would replace one of this command's "
                "inputs (the model, its sidecar, the probe set, the data or the findings); choose another --out"
            )


def check_output_folder(out: str | Path) -> Path:
    """Say now, in one ForensicsError line, when ``out`` cannot become the output folder (it is a file, or the
    nearest existing folder above it is not writable), so no long step runs before the writing fails."""
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
    return out


@contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write a command's outputs into; when the block ends normally its files
    move into ``out`` (the whole folder at once when ``out`` did not exist, else file by file with ``os.replace``),
    and when it fails or is interrupted (Ctrl-C) the temporary folder is removed: ``out`` keeps its previous
    result, or stays absent."""
    out = check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        if not out.exists():
            os.replace(stage, out)
            return
        for file in sorted(p for p in stage.rglob("*") if p.is_file()):
            target = out / file.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    except OSError as exc:
        raise ForensicsError(f"cannot move the outputs into {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
