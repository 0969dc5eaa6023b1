"""Serving: a continuous-batching engine over the xLSTM language model, with a prefix-state cache."""

from xlstm_jax.serving.engine import (
    FINISH_REASONS,
    LATENCY_BUCKETS,
    SWITCH_INTERVAL_S,
    Engine,
    EngineOverloaded,
    RequestStream,
    SamplingParams,
    TokenEvent,
)
from xlstm_jax.serving.prefix_cache import PrefixCache, PrefixEntry

__all__ = [
    "FINISH_REASONS",
    "LATENCY_BUCKETS",
    "SWITCH_INTERVAL_S",
    "Engine",
    "EngineOverloaded",
    "PrefixCache",
    "PrefixEntry",
    "RequestStream",
    "SamplingParams",
    "TokenEvent",
]
