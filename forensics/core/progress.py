"""Progress reporting: library functions take ``progress(fraction, message)``; the CLI drives tqdm with it."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from forensics.core.errors import ForensicsError

Progress = Callable[[float, str], None]
"""``progress(fraction_done, message)``: how every long step reports; the CLI draws tqdm, the UI gr.Progress."""
ShouldStop = Callable[[], bool]
"""``should_stop()``: polled between steps; True asks the step to end with a one-line cancellation error."""


def sub_progress(progress: Progress | None, start: float, end: float, prefix: str = "") -> Progress | None:
    """The part [start, end] of a progress bar as a callback of its own (None stays None)."""
    if progress is None:
        return None
    span = end - start

    def report(fraction: float, message: str) -> None:
        progress(start + span * min(1.0, max(0.0, fraction)), prefix + message)

    return report


@contextmanager
def tqdm_progress(description: str, enabled: bool = True) -> Iterator[Progress | None]:
    """A progress callback that draws a tqdm bar (in percent) on stderr, or None when disabled."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(
        total=100,
        desc=description,
        file=sys.stderr,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
        leave=False,
        dynamic_ncols=True,
    )

    def update(fraction: float, message: str) -> None:
        target = int(round(max(0.0, min(1.0, fraction)) * 100))
        if target > bar.n:
            bar.update(target - bar.n)
        bar.set_postfix_str(message[:80], refresh=True)

    try:
        yield update
    finally:
        bar.close()


def check_stop(should_stop: ShouldStop | None, message: str) -> None:
    """Raise the user-facing cancellation error when the caller asked to stop."""
    if should_stop is not None and should_stop():
        raise ForensicsError(message)
