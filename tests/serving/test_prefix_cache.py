"""The prefix-state cache: longest-prefix lookup, LRU eviction by bytes, byte accounting."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.models.xlstm_parallel.model import ModelStates
from xlstm_jax.serving.prefix_cache import PrefixCache, PrefixEntry, entry_nbytes


def _entry(seed: int, width: int = 4) -> PrefixEntry:
    """An entry of (2 + 2 + 2 + 3) * width float32 numbers: 36 * width bytes."""
    rng = np.random.default_rng(seed)
    states = ModelStates(*(jnp.asarray(rng.standard_normal((1, 1, 2, width)), jnp.float32) for _ in range(3)))
    return PrefixEntry(states, jnp.asarray(rng.standard_normal((1, 3 * width)), jnp.float32))


def test_entry_bytes():
    assert entry_nbytes(_entry(0)) == 9 * 4 * 4
    assert entry_nbytes(_entry(0, width=5)) == 9 * 5 * 4


def test_longest_prefix_wins_and_counts_hits():
    cache = PrefixCache(10_000)
    short, long = _entry(1), _entry(2)
    assert cache.put((1, 2), short) and cache.put([1, 2, 3, 4], long)
    length, entry = cache.lookup([1, 2, 3, 4, 5])
    assert length == 4 and entry is long
    length, entry = cache.lookup([1, 2, 3, 9])
    assert length == 2 and entry is short
    assert cache.lookup([1, 2, 3, 4], max_length=3) == (2, short)
    assert cache.lookup([2, 1]) == (0, None)
    assert cache.lookup([1]) == (0, None)  # shorter than every prefix
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 2
    assert cache.get((1, 2, 3)) is None and cache.get((1, 2)) is short


def test_lru_eviction_by_bytes():
    size = entry_nbytes(_entry(0))
    cache = PrefixCache(3 * size)
    for k in range(3):
        cache.put((k,), _entry(k))
    assert cache.nbytes == 3 * size and len(cache) == 3
    cache.lookup((0, 7))  # (0,) is now the most recently used
    cache.put((3,), _entry(3))
    assert cache.keys() == [(2,), (0,), (3,)]  # (1,) was the least recently used
    assert cache.nbytes == 3 * size and cache.stats()["evictions"] == 1
    big = _entry(4, width=8)  # twice the size: two more go
    cache.put((4,), big)
    assert cache.keys() == [(3,), (4,)] and cache.nbytes == size + entry_nbytes(big)
    assert cache.stats()["evictions"] == 3


def test_replace_and_oversized():
    size = entry_nbytes(_entry(0))
    cache = PrefixCache(2 * size)
    cache.put((5, 6), _entry(0))
    cache.put((5, 6), _entry(1))  # replaces, not counted twice
    assert cache.nbytes == size and len(cache) == 1
    assert not cache.put((7,), _entry(2, width=12))  # larger than the budget: not stored, nothing evicted
    assert cache.keys() == [(5, 6)]
    assert not cache.put((), _entry(3))
    disabled = PrefixCache(0)
    assert not disabled.put((1,), _entry(0)) and len(disabled) == 0
    cache.clear()
    assert cache.nbytes == 0 and cache.lookup((5, 6, 7)) == (0, None)


def test_bad_budget():
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(-1)
    with pytest.raises(TypeError, match="max_bytes"):
        PrefixCache(1.5)
