"""A small in-memory cache keyed by content: what a producer (an oracle, say) computed from an image, found again
by the SHA-256 of the image's bytes plus the producer's name and settings, so a second pass over the same images
skips the work. Bounded (least recently used entries go first); nothing is written to disk.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any, Callable, Mapping

import numpy as np
import torch


def content_hash(data: torch.Tensor | np.ndarray) -> str:
    """SHA-256 (hex) of an array's bytes, with its dtype and shape (so a reshaped or recast copy differs)."""
    array = data.detach().cpu().contiguous().numpy() if isinstance(data, torch.Tensor) else np.ascontiguousarray(data)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def cache_key(name: str, settings: Mapping[str, Any], digest: str) -> str:
    """One key for ``name`` with ``settings`` (JSON, sorted keys) applied to the content ``digest``."""
    spec = json.dumps({"name": name, "settings": settings}, sort_keys=True, default=repr)
    return f"{hashlib.sha256(spec.encode()).hexdigest()[:32]}:{digest}"


class ContentCache:
    """Thread-safe LRU map from :func:`cache_key` keys to values, at most ``max_items`` of them; counts hits and
    misses so callers (and tests) can see what was skipped."""

    def __init__(self, max_items: int = 2048) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.max_items = max_items
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        """The cached value, else ``compute()`` stored under ``key`` (computed outside the lock)."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items
