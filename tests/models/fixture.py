"""The tiny peer fixture (``tests/fixtures/xlstm_tiny``, made by ``scripts/make_peer_fixture.py``), loaded once."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from xlstm_jax.models.xlstm_parallel.hf import load_hf
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "xlstm_tiny"
# Chunks of 16 so that the fixture's sequences (45 and 21 tokens) span several chunks and a remainder.
RUNTIME = RuntimeConfig(prefill_backend="chunkwise", prefill_backend_kwargs=(("chunk_size", 16),))
_RUNTIME_FIELDS = {f.name for f in dataclasses.fields(RuntimeConfig)}


@functools.cache
def peer() -> dict[str, np.ndarray]:
    """What the transformers model computed: input_ids, logits, prompt, greedy, greedy_logits, greedy_margin."""
    with np.load(FIXTURE / "peer.npz") as data:
        return {k: data[k] for k in data.files}


@functools.cache
def _load(items: tuple, scan_blocks: bool) -> tuple:
    return load_hf(FIXTURE, scan_blocks=scan_blocks, **dict(items))


def load(**overrides):
    """``(config, params, runtime)`` of the fixture (cached).

    ``overrides`` are fields of ``RuntimeConfig`` (on top of ``RUNTIME``; a new ``prefill_backend`` starts from
    no backend kwargs) or of the model config.
    """
    runtime_changes = {k: v for k, v in overrides.items() if k in _RUNTIME_FIELDS}
    if "prefill_backend" in runtime_changes and runtime_changes["prefill_backend"] != RUNTIME.prefill_backend:
        runtime_changes.setdefault("prefill_backend_kwargs", ())
    runtime = RUNTIME.replace(**runtime_changes)
    config_overrides = {k: v for k, v in overrides.items() if k not in _RUNTIME_FIELDS}
    config, params = _load(tuple(sorted(config_overrides.items())), runtime.scan_blocks)
    return config, params, runtime
