"""Name -> class registries shared by attacks and oracles: forgiving name lookup, checked keyword settings."""
from __future__ import annotations

import inspect
from typing import Any, TypeVar

from .errors import ForensicsError

T = TypeVar("T")


def resolve(registry: dict[str, type[T]], name: Any, kind: str) -> type[T]:
    """The class registered under ``name``; case and '-' vs '_' are ignored ("BadNet", "ground-truth")."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else None
    if key not in registry:
        raise ForensicsError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(registry))}")
    return registry[key]


def build(registry: dict[str, type[T]], name: Any, kind: str, noun: str, **kwargs: Any) -> T:
    """Instantiate a registered class, refusing keyword ``noun``s (parameters, settings) it does not take."""
    cls = resolve(registry, name, kind)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ForensicsError(f"{cls.name}: unknown {noun}(s) {', '.join(unknown)}; valid: {', '.join(accepted)}")
    return cls(**kwargs)
