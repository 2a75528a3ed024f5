"""Errors a user can act on: the CLI prints them as one line, the UI shows them in the page."""


class ForensicsError(Exception):
    """A problem with the user's input or environment, stated in plain words (never a traceback)."""


class UnsafeCheckpointError(ForensicsError):
    """A checkpoint that would need arbitrary code to load; it is refused and nothing in it runs."""


class CheckpointMismatchError(ForensicsError):
    """A checkpoint whose keys or shapes do not match the chosen architecture."""


def exception_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters), for one-line messages about a library's error."""
    text = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
