"""A cache of model states after prompt prefixes, bounded by bytes, least recently used evicted first.

An entry maps a prefix (a tuple of token ids) to the states of every block after it (``ModelStates`` with
batch 1) and the logits of its last position (1, V), from which the next token is drawn. A prompt that
extends a cached prefix needs only its remaining tokens prefilled; one that equals it needs none.

The entries own their arrays: whoever inserts gives arrays nothing else writes to (in particular nothing
that is later donated to a jitted call), and :meth:`PrefixCache.lookup` hands out the stored arrays, which
callers must not donate either (the engine copies them before it writes to them).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from xlstm_jax.models.xlstm_parallel.model import ModelStates

__all__ = ["PrefixCache", "PrefixEntry"]


class PrefixEntry(NamedTuple):
    """The states after a prefix: ``states`` (``ModelStates``, batch 1) and ``logits`` (1, V) float32."""

    states: ModelStates
    logits: jax.Array


def entry_nbytes(entry: PrefixEntry) -> int:
    """The bytes an entry holds (its states and logits)."""
    return sum(int(x.nbytes) for x in (*entry.states, entry.logits))


class PrefixCache:
    """States after prompt prefixes keyed by their token ids, at most ``max_bytes`` in all, LRU eviction.

    Thread-safe: every method takes the cache's lock.

    Args:
        max_bytes: The byte budget (0 disables the cache: nothing is stored).

    Raises:
        TypeError: ``max_bytes`` is not an int.
        ValueError: ``max_bytes`` < 0.
    """

    def __init__(self, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
            raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__} {max_bytes!r}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[PrefixEntry, int]] = OrderedDict()
        self._lengths: Counter[int] = Counter()  # how many entries have each prefix length
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, prefix: Sequence[int]) -> bool:
        with self._lock:
            return tuple(prefix) in self._entries

    @property
    def nbytes(self) -> int:
        """The bytes held now."""
        with self._lock:
            return self._bytes

    def keys(self) -> list[tuple[int, ...]]:
        """The cached prefixes, least recently used first."""
        with self._lock:
            return list(self._entries)

    def put(self, prefix: Sequence[int], entry: PrefixEntry) -> bool:
        """Stores ``entry`` as the states after ``prefix`` (replacing an entry of the same prefix), then evicts
        least recently used entries until the cache fits its budget.

        Returns:
            Whether the entry was stored (False when it alone exceeds ``max_bytes``, or for an empty prefix).
        """
        key = tuple(map(int, prefix))
        size = entry_nbytes(entry)
        if not key or size > self.max_bytes:
            return False
        with self._lock:
            self._remove(key)
            self._entries[key] = (entry, size)
            self._lengths[len(key)] += 1
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))
                self.evictions += 1
        return True

    def _remove(self, key: tuple[int, ...]) -> None:
        item = self._entries.pop(key, None)
        if item is not None:
            self._bytes -= item[1]
            self._lengths[len(key)] -= 1
            if not self._lengths[len(key)]:
                del self._lengths[len(key)]

    def get(self, prefix: Sequence[int]) -> PrefixEntry | None:
        """The entry of exactly ``prefix`` (marked as recently used), or None; counts no hit or miss."""
        key = tuple(map(int, prefix))
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                return None
            self._entries.move_to_end(key)
            return item[0]

    def lookup(self, prompt: Sequence[int], max_length: int | None = None) -> tuple[int, PrefixEntry | None]:
        """The longest cached prefix of ``prompt`` (of at most ``max_length`` tokens), marked as recently used.

        Returns:
            ``(length, entry)``: the prefix length and its entry, or ``(0, None)`` when none is cached.
            Counts a hit or a miss.
        """
        prompt = tuple(map(int, prompt))
        limit = len(prompt) if max_length is None else min(max_length, len(prompt))
        with self._lock:
            for length in sorted((n for n in self._lengths if n <= limit), reverse=True):
                item = self._entries.get(prompt[:length])
                if item is not None:
                    self._entries.move_to_end(prompt[:length])
                    self.hits += 1
                    return length, item[0]
            self.misses += 1
            return 0, None

    def clear(self) -> None:
        """Drops every entry."""
        with self._lock:
            self._entries.clear()
            self._lengths.clear()
            self._bytes = 0

    def stats(self) -> dict[str, Any]:
        """``entries``, ``bytes``, ``max_bytes``, ``hits``, ``misses``, ``evictions``."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
