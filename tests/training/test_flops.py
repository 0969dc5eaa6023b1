"""flops_per_token against an independent count: the matrix products in the jaxpr of the model itself.

The count walks the jaxpr of a tiny model's forward (and of its loss gradient), sums ``2 x`` the
multiply-adds of every ``dot_general`` (into scans, times their length; into jitted, remat'ed and custom
calls), and sets that against ``flops_per_token(...) x B x S``. The XLA chunkwise form multiplies full
L x L blocks inside chunks, so the jaxpr matches ``causal=False`` exactly; the causal count is the jaxpr's
total less half of its products on L x L blocks.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
from xlstm_jax.training.flops import DEFAULT_CHUNK_SIZE, flops_per_token, flops_per_token_by_part

B = 2
# Odd sizes: D=96 with 3 heads (DHQK=16, DHV=32), FFN 256, vocabulary 37, 2 blocks.
CONFIG = xLSTMLMConfig.tiny(embedding_dim=96, num_heads=3, vocab_size=37)


def dot_flops(jaxpr: jax.extend.core.Jaxpr, square: int | None = None) -> tuple[int, int]:
    """``(all, on_square)``: 2 x the multiply-adds of every dot_general in ``jaxpr`` and its sub-jaxprs, and of
    those among them with an operand or result whose last two axes are ``square`` x ``square``."""
    total = on_square = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            rhs_free = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
            flops = 2 * math.prod(lhs) * math.prod(rhs_free)
            total += flops
            shapes = (lhs, rhs, eqn.outvars[0].aval.shape)
            if square is not None and any(tuple(s[-2:]) == (square, square) for s in shapes):
                on_square += flops
            continue
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr, or a Jaxpr
                if isinstance(inner, jax.extend.core.Jaxpr):
                    t, s = dot_flops(inner, square)
                    total, on_square = total + times * t, on_square + times * s
    return total, on_square


def model_and_params(chunk_size: int):
    model = xLSTMLMModel(CONFIG, RuntimeConfig(prefill_backend_kwargs=(("chunk_size", chunk_size),)))
    ids = jnp.zeros((B, 8), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
    return model, params


def forward_jaxpr(chunk_size: int, S: int):
    model, params = model_and_params(chunk_size)
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
    return jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, ids).jaxpr


def loss_grad_jaxpr(chunk_size: int, S: int, remat: bool):
    model, params = model_and_params(chunk_size)
    apply = nn.remat(lambda mdl, x: mdl(x)) if remat else (lambda mdl, x: mdl(x))

    def loss(p, ids, targets):
        logits = nn.apply(apply, model)({"params": p}, ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))

    ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
    return jax.make_jaxpr(jax.grad(loss))(params, ids, ids).jaxpr


@pytest.mark.parametrize(
    "chunk_size, S",
    [(8, 24), (24, 24), (32, 20)],  # three chunks; one chunk; S < chunk size (L = S). L is never DHQK or DHV
)
def test_forward_matches_the_jaxpr(chunk_size, S):
    L = min(chunk_size, S)
    total, square = dot_flops(forward_jaxpr(chunk_size, S), L)
    full = flops_per_token(CONFIG, S, training=False, chunk_size=chunk_size, causal=False)
    causal = flops_per_token(CONFIG, S, training=False, chunk_size=chunk_size)
    assert full * B * S == total
    assert square > 0 and causal * B * S == total - square / 2


def test_training_is_three_forwards_in_the_gradient_jaxpr():
    """Each forward product has two in the backward (input and weight gradients): the loss gradient's jaxpr
    holds 3x the forward's products; under remat the recomputed forward adds one more (not counted)."""
    S, chunk_size = 16, 8
    forward, _ = dot_flops(forward_jaxpr(chunk_size, S))
    plain, _ = dot_flops(loss_grad_jaxpr(chunk_size, S, remat=False))
    remat, _ = dot_flops(loss_grad_jaxpr(chunk_size, S, remat=True))
    training = flops_per_token(CONFIG, S, chunk_size=chunk_size, causal=False)
    assert plain == 3 * forward == training * B * S
    assert remat == 4 * forward


def test_parts_sum_and_scale():
    parts = flops_per_token_by_part(CONFIG, 64, training=False, chunk_size=16)
    assert set(parts) == {"qkvo", "gates", "out_proj", "ffn", "lm_head", "mlstm_inter", "mlstm_intra"}
    assert math.isclose(sum(parts.values()), flops_per_token(CONFIG, 64, training=False, chunk_size=16))
    trained = flops_per_token_by_part(CONFIG, 64, chunk_size=16)
    assert all(trained[k] == 3 * parts[k] for k in parts)
    # The matrix-product parameters N (num_params less the embedding table, norms and gate biases): 2N forward.
    D, NB, NH = CONFIG.embedding_dim, CONFIG.num_blocks, CONFIG.num_heads
    norms_and_biases = NB * (2 * D + CONFIG.v_dim + 2 * NH) + D
    N = CONFIG.num_params() - CONFIG.vocab_size * D - norms_and_biases
    dense = sum(v for k, v in parts.items() if not k.startswith("mlstm"))
    assert dense == 2 * N
    # The default chunk size is the chunkwise backend's; a longer chunk only adds intra-chunk work.
    assert flops_per_token(CONFIG, 4096) == flops_per_token(CONFIG, 4096, chunk_size=DEFAULT_CHUNK_SIZE)
    longer = flops_per_token_by_part(CONFIG, 64, training=False, chunk_size=32)
    assert longer["mlstm_intra"] == 2 * parts["mlstm_intra"] and longer["qkvo"] == parts["qkvo"]
    # Tied embeddings still multiply by the (V, D) matrix in the LM head.
    tied = flops_per_token_by_part(CONFIG.replace(tie_word_embeddings=True), 64, training=False, chunk_size=16)
    assert tied == parts


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"config": {"embedding_dim": 96}}, TypeError, "config must be an xLSTMLMConfig"),
        ({"seq_len": 0}, ValueError, "seq_len must be a positive int, got seq_len=0"),
        ({"seq_len": 64.0}, TypeError, "seq_len must be a positive int"),
        ({"seq_len": np.int64(64)}, None, None),
        ({"chunk_size": -8}, ValueError, "chunk_size must be a positive int, got chunk_size=-8"),
        ({"chunk_size": True}, TypeError, "chunk_size must be a positive int"),
        ({"training": 1}, TypeError, "training must be a bool"),
        ({"causal": "yes"}, TypeError, "causal must be a bool"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    args = {"config": CONFIG, "seq_len": 64, **kwargs}
    config, seq_len = args.pop("config"), args.pop("seq_len")
    if error is None:
        assert flops_per_token(config, seq_len, **args) == flops_per_token(CONFIG, 64)
        return
    with pytest.raises(error, match=match):
        flops_per_token(config, seq_len, **args)
