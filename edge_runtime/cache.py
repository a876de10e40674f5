"""Caches of teacher answers on the device.

``AnswerCache`` maps a normalised query text to the teacher's label: an LRU with a bound on the
number of entries and a time to live, so a repeated question is answered without a network
call and a stale answer ages out. ``SemanticCache`` finds a cached answer for a query that is
not textually equal but close: it compares the student's logit vector of the new query with
those of cached queries (cosine similarity) and reuses the teacher's label above a threshold.
For an intent classifier the logits are the student's view of which intent a query expresses,
so two phrasings of one request land close together. But the queries a gate escalates are the
ones the student finds ambiguous, and their logits are close to each other's more often than
their labels agree: ``benchmarks/semantic_cache.py`` measures hit rate and wrong hits (a reused
label that the teacher would not have given) on CLINC150, and only thresholds of 0.99 and above
kept wrong hits at zero there, with a hit rate under 1%. The runtime therefore leaves the
semantic cache off unless an application turns it on.

Both are thread-safe and keep everything in memory; nothing is written to disk.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from edge_runtime.errors import ConfigError

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_TTL = 24 * 3600.0  # seconds
# Cosine similarity of mean-centred logit vectors. On CLINC150 traffic (validation then test,
# 1,250 escalated queries), 0.99 reused 6 labels with none wrong, 0.95 reused 36 with 6 wrong
# and 0.9 reused 98 with 40 wrong (benchmarks/semantic_cache.py, 2-vCPU x86-64 VM).
DEFAULT_SIMILARITY = 0.99

_SPACE = re.compile(r"\s+")
_EDGE_PUNCTUATION = " \t\n.,;:!?¿¡'\"()[]{}"


def normalize_text(text: str) -> str:
    """Return the cache key of a query: NFKC, case-folded, inner whitespace collapsed and
    punctuation at both ends removed, so "Set a timer!" and "set a  timer" share an entry."""
    import unicodedata  # imported here: only a runtime that asks the teacher needs it

    folded = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", folded).strip(_EDGE_PUNCTUATION)


def _check_limits(max_entries: Any, ttl: Any) -> None:
    if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
        raise ConfigError(f"cache max_entries must be a positive integer, got {max_entries!r}")
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not ttl > 0:
        raise ConfigError(f"cache ttl must be a positive number of seconds, got {ttl!r}")


class CacheStats:
    """Counters of one cache since it was created."""

    __slots__ = ("hits", "misses", "expired", "evicted")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.expired = 0  # entries dropped because their time to live had passed
        self.evicted = 0  # entries dropped to stay within max_entries

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class AnswerCache:
    """LRU cache of teacher labels keyed by normalised query text, with a time to live."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, ttl: float = DEFAULT_TTL,
                 clock: Callable[[], float] = time.monotonic):
        _check_limits(max_entries, ttl)
        self.max_entries = max_entries
        self.ttl = float(ttl)
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, text: str) -> str | None:
        """Return the cached label for ``text``, or None."""
        key = normalize_text(text)
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            label, stored_at = entry
            if now - stored_at >= self.ttl:
                del self._entries[key]
                self.stats.expired += 1
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return label

    def put(self, text: str, label: str) -> None:
        key = normalize_text(text)
        with self._lock:
            self._entries[key] = (label, self._clock())
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.stats.evicted += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class SemanticCache:
    """Teacher labels keyed by the student's logit vectors, found by cosine similarity.

    ``get`` returns the label of the most similar cached vector when the similarity is at
    least ``threshold``. The search is exhaustive (one matrix-vector product), which for the
    default 10,000 entries of 151 logits takes well under a millisecond on a laptop CPU.
    """

    def __init__(self, threshold: float = DEFAULT_SIMILARITY,
                 max_entries: int = DEFAULT_MAX_ENTRIES, ttl: float = DEFAULT_TTL,
                 clock: Callable[[], float] = time.monotonic):
        _check_limits(max_entries, ttl)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) \
                or not 0.0 < threshold <= 1.0:
            raise ConfigError(f"semantic cache threshold must be a cosine similarity above 0 "
                              f"and at most 1, got {threshold!r}")
        self.threshold = float(threshold)
        self.max_entries = max_entries
        self.ttl = float(ttl)
        self._clock = clock
        self._lock = threading.Lock()
        self._vectors: Any = None  # float32 (capacity, dimension), unit rows
        self._labels: list[str | None] = []
        self._stored_at: list[float] = []
        self._next = 0  # slot written next; the oldest entry once the ring is full
        self.stats = CacheStats()

    def __len__(self) -> int:
        return sum(label is not None for label in self._labels)

    def get(self, vector: Any) -> tuple[str, float] | None:
        """Return (label, similarity) of the closest cached query, or None below the
        threshold."""
        import numpy as np

        unit = _unit(vector)
        now = self._clock()
        with self._lock:
            if unit is None or self._vectors is None or unit.shape[0] != self._vectors.shape[1]:
                self.stats.misses += 1
                return None
            similarities = self._vectors[:len(self._labels)] @ unit
            for index, stored_at in enumerate(self._stored_at):
                if self._labels[index] is not None and now - stored_at >= self.ttl:
                    self._labels[index] = None
                    self.stats.expired += 1
            live = np.array([label is not None for label in self._labels])
            if not live.any():
                self.stats.misses += 1
                return None
            similarities = np.where(live, similarities, -np.inf)
            best = int(similarities.argmax())
            if similarities[best] < self.threshold:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            return self._labels[best], float(similarities[best])  # type: ignore[return-value]

    def put(self, vector: Any, label: str) -> None:
        import numpy as np

        unit = _unit(vector)
        if unit is None:
            return  # logits that are not finite are not worth keeping
        with self._lock:
            if self._vectors is None or unit.shape[0] != self._vectors.shape[1]:
                self._vectors = np.zeros((self.max_entries, unit.shape[0]), dtype=np.float32)
                self._labels, self._stored_at, self._next = [], [], 0
            slot = self._next
            if slot < len(self._labels):
                if self._labels[slot] is not None:
                    self.stats.evicted += 1
                self._labels[slot] = label
                self._stored_at[slot] = self._clock()
            else:
                self._labels.append(label)
                self._stored_at.append(self._clock())
            self._vectors[slot] = unit
            self._next = (slot + 1) % self.max_entries


def _unit(vector: Any) -> Any:
    """Return ``vector`` as a float32 unit vector, or None if it is empty or not finite."""
    import numpy as np

    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(array)) if array.size else 0.0
    if not np.isfinite(norm) or norm == 0.0:
        return None
    return array / norm
