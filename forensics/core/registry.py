"""One name -> implementation registry for attacks, oracles, attribution methods, detectors and defenses.

Modelled on timm's ``@register_model`` / ``list_models``: a decorator fills the registry when a module is
imported; ``build(name, **settings)`` makes an instance and refuses, in one line, a name or a setting it
does not know. Registered names follow one rule (lower case, words joined by ``-``: ``oracle-finetune``,
``optimized-patch``); lookups ignore case and treat ``_`` as ``-``, and old names stay as aliases so saved
reports and commands keep working.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable, Generic, Iterator, TypeVar

from forensics.core.errors import ForensicsError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def canonical(name: Any) -> str | None:
    """The lookup key of a name: stripped, lower case, ``_`` read as ``-``; None for a non-string."""
    return name.strip().lower().replace("_", "-") if isinstance(name, str) else None


class Registry(Generic[T]):
    """Registered implementations of one kind (classes with a ``name``, or functions registered under one).

    ``kind`` names the entries in messages ("attack", "repair method"); ``noun`` their keyword arguments
    ("parameter", "setting").
    """

    def __init__(self, kind: str, noun: str = "setting") -> None:
        self.kind = kind
        self.noun = noun
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, entry: T | None = None, *, name: str | None = None, aliases: tuple[str, ...] = ()) -> Any:
        """Decorator (bare or with ``name=`` / ``aliases=``): add a class or function under its name."""

        def add(obj: T) -> T:
            key = name or getattr(obj, "name", None)
            if not isinstance(key, str) or not _NAME.match(key):
                raise TypeError(
                    f"{getattr(obj, '__name__', obj)!r} needs a registry name in lower-case-dashed form, got {key!r}"
                )
            if key in self._entries and self._entries[key] is not obj:
                raise TypeError(f"{self.kind} name {key!r} is already registered")
            self._entries[key] = obj
            for alias in aliases:
                self._aliases[canonical(alias) or alias] = key
            return obj

        return add(entry) if entry is not None else add

    def resolve(self, name: Any) -> str:
        """The registered name that ``name`` (any case, ``_`` or ``-``, or an old alias) refers to."""
        key = canonical(name)
        key = self._aliases.get(key, key)
        if key not in self._entries:
            raise ForensicsError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}")
        return key

    def get(self, name: Any) -> T:
        """The class or function registered under ``name``."""
        return self._entries[self.resolve(name)]

    def accepted(self, name: Any) -> list[str]:
        """The keyword settings ``build(name, ...)`` takes."""
        return list(_keywords(self.get(name)))

    def build(self, name: Any, **settings: Any) -> Any:
        """An instance of a registered class (or a registered function with its settings bound),
        refusing settings it does not take."""
        entry = self.get(name)
        accepted = _keywords(entry)
        unknown = sorted(set(settings) - set(accepted))
        if unknown:
            label = getattr(entry, "name", None) or self.resolve(name)
            raise ForensicsError(
                f"{label}: unknown {self.noun}(s) {', '.join(unknown)}; valid: {', '.join(accepted) or 'none'}"
            )
        if inspect.isclass(entry):
            return entry(**settings)
        return functools.partial(entry, **settings)

    def names(self, where: Callable[[T], bool] | None = None) -> list[str]:
        """Registered names, sorted; ``where`` keeps the entries it accepts."""
        return sorted(k for k, v in self._entries.items() if where is None or where(v))

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs in registration order."""
        return list(self._entries.items())

    def __contains__(self, name: Any) -> bool:
        key = canonical(name)
        return self._aliases.get(key, key) in self._entries

    def __getitem__(self, name: Any) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _keywords(entry: Any) -> list[str]:
    """Keyword parameters of a class's ``__init__`` (or a dataclass settings class it declares), or of a function
    beyond its positional inputs."""
    settings_cls = getattr(entry, "settings_cls", None)
    if inspect.isclass(entry) and settings_cls is not None:
        target = settings_cls
    else:
        target = entry.__init__ if inspect.isclass(entry) else entry
    params = inspect.signature(target).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in params if p.kind in kinds and p.name != "self"]
    if not inspect.isclass(entry):  # attribution functions: (model, images, class_emb, targets, **settings)
        names = [p.name for p in params if p.kind in kinds and p.default is not inspect.Parameter.empty]
    return names
