"""The tiny peer fixture (``tests/fixtures/xlstm_tiny``, made by ``scripts/make_peer_fixture.py``), loaded once."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from xlstm_jax.models.xlstm_parallel.hf import load_hf

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "xlstm_tiny"
# Chunks of 16 so that the fixture's sequences (45 and 21 tokens) span several chunks and a remainder.
CHUNKWISE = {"prefill_backend": "chunkwise", "prefill_backend_kwargs": (("chunk_size", 16),)}


@functools.cache
def peer() -> dict[str, np.ndarray]:
    """What the transformers model computed: input_ids, logits, prompt, greedy, greedy_logits, greedy_margin."""
    with np.load(FIXTURE / "peer.npz") as data:
        return {k: data[k] for k in data.files}


@functools.cache
def _load(items: tuple) -> tuple:
    return load_hf(FIXTURE, **dict(items))


def load(**overrides):
    """``(config, params)`` of the fixture with our config fields ``overrides`` (cached)."""
    return _load(tuple(sorted({**CHUNKWISE, **overrides}.items())))
