"""Model FLOPs of the xLSTM language model per token: the numerator of MFU (model FLOPs utilisation).

Convention (PaLM's, Chowdhery et al. 2022, appendix B): a multiply-add is 2 FLOPs; only matrix products are
counted; a training step costs 3x the forward (the backward's two products per forward product, one for
the input's gradient and one for the weight's); recomputation under remat is not counted (these are
*model* FLOPs, the same for every remat policy and implementation, so that MFU compares implementations).
PaLM's per-token training cost is ``6 N + 12 L_b H Q T`` (N parameters in matrix products, L_b blocks,
H heads of width Q, attention over T positions); the xLSTM's is ``6 N`` plus an attention-like term of the
mLSTM cell, whose quadratic part spans one chunk (L positions) instead of the whole sequence:

    training FLOPs per token = 3 x forward = 6 N + 3 L_b NH (4 DHQK DHV + L (DHQK + DHV))      (causal)

**N**, the parameters that enter matrix products (the embedding table is a lookup; norm weights and gate
biases are element-wise), and the forward FLOPs per token, ``2 N``, per block:

    q, k, v, o projections   2 D (2 qk_dim + 2 v_dim)
    input and forget gates   2 D (2 NH)
    output projection        2 v_dim D
    FFN gate and up          2 D (2 ffn_dim)
    FFN down                 2 ffn_dim D

and once, the LM head ``2 D V`` (also with tied embeddings, where the embedding matrix is the product's
operand).

**The mLSTM cell** in chunkwise form (:func:`xlstm_jax.mlstm.chunkwise_fw`), per head and token, with chunks
of ``L = min(chunk_size, S)`` steps (the model's chunk size; 256 by default, the chunkwise backend's):

- inter-chunk: each chunk's summary ``C̄ = k̃ᵀ v`` (DHQK x L times L x DHV per chunk: ``2 DHQK DHV`` per
  token) and the read-out of the border state ``q C`` (L x DHQK times DHQK x DHV: ``2 DHQK DHV`` per token):
  ``4 DHQK DHV``;
- intra-chunk: the gated scores ``q kᵀ`` (L x DHQK times DHQK x L) and their product with ``v`` (L x L times
  L x DHV). Counted **causal** by default: the lower triangle, ``L²/2`` entries of each, ``L DHQK`` and
  ``L DHV`` per token, ``L (DHQK + DHV)`` in all, which is the work the function needs and what a causal
  kernel (NX-AI's TFLA) does; PaLM's attention term counts the full square instead. ``causal=False``
  counts the full L x L blocks, ``2 L (DHQK + DHV)``, which is what the XLA chunkwise form multiplies
  (it masks the upper triangle after the product).

The normaliser's vector products (``q·n``, the key sums) are O(DHQK) per token and not counted, nor are
element-wise operations (gates, norms, soft caps, the loss). S enters only through ``L = min(chunk_size,
S)``: a padded last chunk is not counted (per-token FLOPs of the real tokens).

For the shapes of the training benchmark (D=2048, 24 blocks, NH=4, DHQK=256, DHV=512, V=50304, S=4096, L=256:
8.11 GFLOPs per trained token) the FFN is 60% of the total, the q, k, v, o projections 22%, the LM head 8%,
the output projection 7% and the mLSTM cell's products 2.6%.
"""

from __future__ import annotations

import numbers

from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import mLSTMBackendChunkwiseConfig
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig

__all__ = ["DEFAULT_CHUNK_SIZE", "flops_per_token", "flops_per_token_by_part"]

DEFAULT_CHUNK_SIZE = mLSTMBackendChunkwiseConfig.chunk_size  # the chunkwise backend's default chunk size


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {name}={value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return int(value)


def flops_per_token_by_part(
    config: xLSTMLMConfig,
    seq_len: int,
    *,
    training: bool = True,
    chunk_size: int | None = None,
    causal: bool = True,
) -> dict[str, float]:
    """Model FLOPs per token by part of the model (the module docstring derives each term).

    Args:
        config: The model's architecture.
        seq_len: Sequence length S of a training row (or a prompt).
        training: Forward and backward (3x the forward) rather than the forward alone.
        chunk_size: The chunkwise form's chunk size L (None: the chunkwise backend's default, 256); the
            intra-chunk products span ``min(chunk_size, seq_len)`` positions.
        causal: Count the causal half of the L x L intra-chunk products (True) or the full blocks.

    Returns:
        FLOPs per token of each part, summed over the blocks: ``"qkvo"`` (q, k, v and output-gate
        projections), ``"gates"`` (input and forget gates), ``"out_proj"``, ``"ffn"`` (gate, up and down),
        ``"lm_head"``, ``"mlstm_inter"`` (chunk summaries and read-outs of the border states) and
        ``"mlstm_intra"`` (the products inside chunks).

    Raises:
        TypeError: ``config`` is not an ``xLSTMLMConfig``, or a size is not an int, or a flag not a bool.
        ValueError: ``seq_len`` or ``chunk_size`` is not positive.
    """
    if not isinstance(config, xLSTMLMConfig):
        raise TypeError(f"config must be an xLSTMLMConfig, got {type(config).__name__}")
    S = _positive_int("seq_len", seq_len)
    L = min(_positive_int("chunk_size", DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size), S)
    for name, flag in (("training", training), ("causal", causal)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {name}={flag!r}")
    D, NB, NH = config.embedding_dim, config.num_blocks, config.num_heads
    DHQK, DHV = config.qk_head_dim, config.v_head_dim
    intra = (1 if causal else 2) * L * (DHQK + DHV)
    forward = {
        "qkvo": NB * 2 * D * (2 * config.qk_dim + 2 * config.v_dim),
        "gates": NB * 2 * D * 2 * NH,
        "out_proj": NB * 2 * config.v_dim * D,
        "ffn": NB * 3 * 2 * D * config.ffn_dim,
        "lm_head": 2 * D * config.vocab_size,
        "mlstm_inter": NB * NH * 4 * DHQK * DHV,
        "mlstm_intra": NB * NH * intra,
    }
    factor = 3 if training else 1
    return {part: float(factor * flops) for part, flops in forward.items()}


def flops_per_token(
    config: xLSTMLMConfig,
    seq_len: int,
    *,
    training: bool = True,
    chunk_size: int | None = None,
    causal: bool = True,
) -> float:
    """Model FLOPs per token of the forward (``training=False``) or of a training step (3x the forward).

    Every matrix product counts (projections q, k, v, o, the gates, the output projection, the FFN's gate,
    up and down, the LM head) and the mLSTM cell's chunkwise products at chunk size L; the module docstring
    gives the derivation and the convention (PaLM's ``6 N`` plus an attention-like term over one chunk).

    Args:
        config: The model's architecture.
        seq_len: Sequence length S.
        training: Forward and backward (3x) rather than the forward alone.
        chunk_size: The chunk size L (None: the chunkwise backend's default, 256).
        causal: Count the causal half of the intra-chunk products (True) or the full L x L blocks.

    Returns:
        FLOPs per token (a float).

    Raises:
        TypeError, ValueError: as :func:`flops_per_token_by_part`.

    Example:
        >>> config = xLSTMLMConfig(embedding_dim=2048, num_blocks=24, num_heads=4)
        >>> round(flops_per_token(config, 4096) / 1e9, 2)  # GFLOPs per trained token
        8.11
    """
    parts = flops_per_token_by_part(config, seq_len, training=training, chunk_size=chunk_size, causal=causal)
    return sum(parts.values())
