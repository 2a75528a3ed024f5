"""Progress reporting: library functions take ``progress(fraction, message)``; the CLI drives tqdm with it."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

Progress = Callable[[float, str], None]


@contextmanager
def tqdm_progress(description: str, enabled: bool = True) -> Iterator[Progress | None]:
    """A progress callback that draws a tqdm bar (in percent) on stderr, or None when disabled."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=100, desc=description, file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
               leave=False, dynamic_ncols=True)

    def update(fraction: float, message: str) -> None:
        target = int(round(max(0.0, min(1.0, fraction)) * 100))
        if target > bar.n:
            bar.update(target - bar.n)
        bar.set_postfix_str(message[:80], refresh=True)

    try:
        yield update
    finally:
        bar.close()
