"""Errors a user can act on: the CLI prints them as one line, the UI shows them in the page."""


class ForensicsError(Exception):
    """A problem with the user's input or environment, stated in plain words (never a traceback)."""


class UnsafeCheckpointError(ForensicsError):
    """A checkpoint that would need arbitrary code to load; it is refused and nothing in it runs."""


class CheckpointMismatchError(ForensicsError):
    """A checkpoint whose keys or shapes do not match the chosen architecture."""
