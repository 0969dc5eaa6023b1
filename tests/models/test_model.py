"""The xLSTM language model against the transformers peer, and its config and input checks."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.fixture import load, peer
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels.add_rms_norm import rms_norm
from xlstm_jax.models.xlstm_parallel.blocks.dense import project_wide
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.layer import mLSTMLayer
from xlstm_jax.models.xlstm_parallel.blocks.norm import RMSNorm
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import ModelStates, xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import DecodeFusion, KernelMode, RuntimeConfig


def _logits(config, params, rt, ids, **kwargs):
    return jax.jit(lambda p, x: xLSTMLMModel(config, rt).apply({"params": p}, x, **kwargs))(params, jnp.asarray(ids))


@pytest.mark.parametrize("backend", ["chunkwise", "parallel_stabilized", "recurrent"])
def test_peer_logits(backend):
    """Our model, loaded from the transformers checkpoint, reproduces its logits (S=45: chunks and a rest)."""
    config, params, rt = load(prefill_backend=backend)
    ref = peer()["logits"]
    assert_close(f"logits ({backend})", ref, _logits(config, params, rt, peer()["input_ids"]), TOL["float32-model"])


def test_scanned_and_unrolled_blocks_agree():
    """nn.scan over the blocks (stacked parameters) computes what the unrolled blocks compute."""
    config, params, rt = load(scan_blocks=True)
    config_u, params_u, rt_u = load(scan_blocks=False)
    assert params["blocks"]["mlstm_layer"]["qkvo_kernel"].shape == (2, 128, 64 + 64 + 128 + 128)
    assert "blocks" not in params_u and params_u["blocks_1"]["mlstm_layer"]["if_kernel"].shape == (128, 2 + 2)
    np.testing.assert_array_equal(
        params["blocks"]["ffn"]["proj_gate_up"]["kernel"][1], params_u["blocks_1"]["ffn"]["proj_gate_up"]["kernel"]
    )
    ids = peer()["input_ids"][:, :20]
    a = _logits(config, params, rt, ids)
    b = _logits(config_u, params_u, rt_u, ids)
    assert_close("scanned vs unrolled", np.asarray(a, np.float64), b, TOL["float32-model"])


def test_states_carry_over_calls_and_last_only():
    """Prefill of a prefix, then the rest from the returned states, equals one call; last_only gives the last row."""
    config, params, rt = load()
    model = xLSTMLMModel(config, rt)
    ids = jnp.asarray(peer()["input_ids"])

    @jax.jit
    def run(p, ids):
        full, states_full = model.apply({"params": p}, ids, return_states=True)
        _, states = model.apply({"params": p}, ids[:, :30], return_states=True)
        rest, states_rest = model.apply({"params": p}, ids[:, 30:], states, return_states=True, last_only=True)
        return full, states_full, rest, states_rest

    full, states_full, rest, states_rest = run(params, ids)
    assert rest.shape == (2, 1, config.vocab_size)
    assert_close("split prefill", np.asarray(full[:, -1:], np.float64), rest, TOL["float32-model"])
    for name, a, b in zip("cnm", states_full, states_rest, strict=True):
        assert_close(f"state {name}", np.asarray(a, np.float64), b, TOL["float32-model"])


def test_gradients_flow():
    """jax.grad through the model (chunkwise prefill): finite, non-zero gradients for every parameter in float32,
    and in float64 the directional derivative along a random direction equals the central difference of the
    loss (TOL["float64-grad"], scaled by the loss)."""
    ids = jnp.asarray(peer()["input_ids"][:, :17])

    def loss_fn(config, rt):
        def loss(p):
            logits = xLSTMLMModel(config, rt).apply({"params": p}, ids[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))

        return loss

    config, params, rt = load()
    grads = jax.jit(jax.grad(loss_fn(config, rt)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), path

    with jax.enable_x64(True):
        config, params, rt = load(dtype="float64", param_dtype="float64", state_dtype="float64")
        loss = jax.jit(loss_fn(config, rt))
        keys = jax.random.split(jax.random.key(1), len(jax.tree_util.tree_leaves(params)))
        leaves, tree = jax.tree_util.tree_flatten(params)
        direction = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
        norm = jnp.sqrt(sum(jnp.sum(d * d) for d in direction))  # a unit direction: the truncation error stays small
        direction = tree.unflatten([d / norm for d in direction])
        value, grads = jax.jit(jax.value_and_grad(loss_fn(config, rt)))(params)
        pairs = zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction), strict=True)
        along = sum(jnp.vdot(g, d) for g, d in pairs)
        delta = 1e-6
        step = lambda sign: jax.tree_util.tree_map(lambda p, d: p + sign * delta * d, params, direction)
        central = (loss(step(1.0)) - loss(step(-1.0))) / (2 * delta)
        assert_close("directional derivative", np.float64(central), np.float64(along), TOL["float64-grad"], scale=value)


@pytest.mark.parametrize(
    ("backend", "remat"),
    [("chunkwise", "none"), ("chunkwise", "dots"), ("parallel_stabilized", "full"), ("recurrent", "none")],
)
def test_no_states_is_zero_states(backend, remat):
    """A call that neither takes nor returns states (training) starts each block's cell from zeros itself, reading
    no stacked states: its logits and its parameters' gradients equal those of the same call from explicit zero
    states (the stacked path), and its program writes no states into stacks."""
    config, params, rt = load(prefill_backend=backend, remat=remat)
    model = xLSTMLMModel(config, rt)
    ids = jnp.asarray(peer()["input_ids"][:, :33])
    zeros = ModelStates.zeros(config, ids.shape[0])

    def loss(p, states):
        logits = model.apply({"params": p}, ids[:, :-1], states)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    programs = {name: step.lower(params, states).compile() for name, states in (("none", None), ("zeros", zeros))}
    (_, logits), grads = programs["none"](params, None)
    (_, logits_z), grads_z = programs["zeros"](params, zeros)
    assert_close("logits", np.asarray(logits_z, np.float64), logits, TOL["float32-model"])
    for (path, g), g_z in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_z), strict=True
    ):
        assert_close(f"gradient {jax.tree_util.keystr(path)}", np.asarray(g_z, np.float64), g, TOL["float32-model"])
    # each block's new states written into the stacks (.at[layer].set), where the unrolled blocks carry them
    assert "mlstm_layer/scatter" not in programs["none"].as_text()
    assert ("mlstm_layer/scatter" in programs["zeros"].as_text()) == (remat == "none")


def test_decode_needs_states():
    """The decode step continues from given states: a layer called in decode without them is a ValueError."""
    config, params, rt = load()
    layer = mLSTMLayer(config, rt, decode=True)
    x = jnp.ones((1, 1, config.embedding_dim), jnp.float32)
    with pytest.raises(ValueError, match="the decode step continues from states: state must be given, got None"):
        layer.init(jax.random.key(0), x, None)


def test_presets():
    cfg = xLSTMLMConfig.xlstm_7b()
    assert (cfg.embedding_dim, cfg.num_blocks, cfg.num_heads, cfg.vocab_size) == (4096, 32, 8, 50304)
    assert (cfg.qk_head_dim, cfg.v_head_dim, cfg.ffn_dim) == (256, 512, 10944)
    assert 6.5e9 < cfg.num_params() < 7.5e9
    tiny = xLSTMLMConfig.tiny()
    assert (tiny.qk_head_dim, tiny.v_head_dim, tiny.ffn_dim) == (32, 64, 384)
    assert hash(tiny) == hash(xLSTMLMConfig.tiny())  # static argument of jax.jit


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"num_heads": 3}, ValueError, "multiple of num_heads"),
        ({"vocab_size": 0}, ValueError, "vocab_size"),
        ({"dtype": "int32"}, ValueError, "floating"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"gate_soft_cap": -1.0}, ValueError, "gate_soft_cap"),
    ],
)
def test_config_errors(changes, error, match):
    with pytest.raises(error, match=match):
        xLSTMLMConfig.tiny(**changes)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"prefill_backend": "nope"}, ValueError, "prefill_backend must be one of"),
        ({"prefill_backend_kwargs": {"chunk_size": 8}}, TypeError, "prefill_backend_kwargs"),
        ({"prefill_backend_kwargs": (("no_such_field", 1),)}, ValueError, "no_such_field"),
        ({"step_backend": "nope"}, ValueError, "step_backend must be one of"),
        ({"scan_blocks": "false"}, TypeError, "scan_blocks"),
        ({"decode_fusion": True}, ValueError, "decode_fusion"),
        ({"kernel_mode": "gpu"}, ValueError, "kernel_mode"),
        ({"step_kernel": {"block_dhv": 64}}, TypeError, "step_kernel"),
    ],
)
def test_runtime_config_errors(changes, error, match):
    with pytest.raises(error, match=match):
        RuntimeConfig(**changes)


def test_runtime_config_is_hashable_and_takes_enum_values():
    rt = RuntimeConfig(decode_fusion="off", kernel_mode="interpret")
    assert rt.decode_fusion is DecodeFusion.OFF and rt.kernel_mode is KernelMode.INTERPRET and rt.interpret is True
    assert hash(rt) == hash(RuntimeConfig(decode_fusion=DecodeFusion.OFF, kernel_mode=KernelMode.INTERPRET))
    assert RuntimeConfig().interpret is None and RuntimeConfig(kernel_mode="compiled").interpret is False


def _prefill_and_decode(config, ids, runtime=RuntimeConfig()):
    """A randomly initialised model's logits over ``ids`` (B, S) in one call, and of the last token decoded after
    a prefill of the others (jitted: eager Flax dispatch is slow); also the params and the prefill states."""
    model = xLSTMLMModel(config, runtime)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]

    @jax.jit
    def run(params):
        full = model.apply({"params": params}, ids)
        _, states = model.apply({"params": params}, ids[:, :-1], return_states=True)
        return full, model.apply({"params": params}, ids[:, -1:], states, decode=True), states

    full, last, states = run(params)
    return full, last, params, states


def test_step_backend_auto_falls_back_for_head_sizes_without_kernels():
    """``step_backend="auto"`` (the default) runs the Pallas step where its kernels cover the heads, else the XLA
    step; asking for the kernel explicitly on such heads is an error on every platform."""
    rt = RuntimeConfig()
    assert rt.step_form(256, 512) == "recurrent_pallas"
    assert rt.step_form(24, 96) == "recurrent"
    assert rt.replace(step_backend="recurrent").step_form(256, 512) == "recurrent"
    with pytest.raises(ValueError, match="DHQK=24, DHV=96"):
        rt.replace(step_backend="recurrent_pallas").step_form(24, 96)
    # A model of heads (DHQK, DHV) = (24, 48) decodes with the defaults.
    config = xLSTMLMConfig.tiny(embedding_dim=96, num_heads=2)
    ids = jnp.ones((1, 3), jnp.int32)
    full, last, params, states = _prefill_and_decode(config, ids)
    assert_close("decode vs prefill", np.asarray(full[:, 2:], np.float64), last, TOL["float32-model"])
    with pytest.raises(ValueError, match="recurrent_pallas"):
        xLSTMLMModel(config, rt.replace(step_backend="recurrent_pallas")).apply(
            {"params": params}, ids[:, 2:], states, decode=True
        )


def test_defaults_decode_a_float64_model():
    """The default runtime's "auto" choices (Pallas step, fused decode) fall back to XLA for dtypes the kernels do
    not take: a float64 model decodes with the defaults, and its decode equals its prefill to float64 accuracy."""
    rt = RuntimeConfig()
    assert rt.step_form(64, 64, "float64", "float64") == "recurrent" and not rt.fuse_decode(True, "float64")
    assert rt.step_form(64, 64, "bfloat16", "float32") == "recurrent_pallas" and rt.fuse_decode(True, "bfloat16")
    with jax.enable_x64(True):
        config = xLSTMLMConfig.tiny(dtype="float64", param_dtype="float64", state_dtype="float64")
        full, last, _, _ = _prefill_and_decode(config, jnp.asarray([[3, 1, 4, 1]], jnp.int32))
        assert full.dtype == last.dtype == jnp.float64  # logits are float32, or wider for a wider model
        assert_close("decode vs prefill", np.asarray(full[:, 3:], np.float64), last, TOL["float32-model"])


def test_model_input_errors():
    config, params, rt = load()
    model = xLSTMLMModel(config, rt)
    ids = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="input_ids"):
        model.apply({"params": params}, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="valid.shape"):
        model.apply({"params": params}, ids, None, jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="states shapes"):
        model.apply({"params": params}, ids, ModelStates.zeros(config, 3))
    with pytest.raises(ValueError, match="one token per call"):
        model.apply({"params": params}, ids, decode=True)


@pytest.mark.parametrize("backend", ["chunkwise", "parallel_stabilized", "recurrent"])
def test_gradients_finite_with_padding(backend):
    """Padded positions (input gate -inf) filling a whole chunk are exact no-op steps for the gradient too: the
    gradient of a loss over the real positions of a left-padded batch equals that of the rows run unpadded."""
    kwargs = (("chunk_size", 4),) if backend == "chunkwise" else ()
    config, params, rt = load(prefill_backend=backend, prefill_backend_kwargs=kwargs)
    model = xLSTMLMModel(config, rt)
    ids = jnp.asarray(peer()["input_ids"][:, :17])
    valid = jnp.ones(ids.shape, bool).at[0, :5].set(False)  # 5 padded steps: chunk 0 is all padding

    def padded(p):
        logits = model.apply({"params": p}, ids, valid=valid)
        return jnp.sum(jnp.where(valid[..., None], logits, 0.0) ** 2)

    def unpadded(p):
        return sum(jnp.sum(model.apply({"params": p}, row) ** 2) for row in (ids[:1, 5:], ids[1:]))

    grads = jax.jit(jax.grad(padded))(params)
    want = jax.jit(jax.grad(unpadded))(params)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(want), strict=True):
        assert_close(jax.tree_util.keystr(path), np.asarray(w, np.float64), g, TOL["float32-model"])


def test_packed_rows_equal_documents_alone():
    """With ``segment_ids`` every document of a packed row gives the logits it gives alone, and the states returned
    are those of each row's last document; each row's first document starts from the given states, later ones
    from zeros. Chunkwise prefill (chunks of 16) under nn.scan over the blocks (the unrolled blocks in
    tests/test_generation.py); documents of length 1, ending on the chunk border, crossing it. The documents run
    alone as the rows of one left-padded batch (padding is an exact no-op step, tested elsewhere)."""
    config, params, rt = load(scan_blocks=True)
    model = xLSTMLMModel(config, rt)
    ids = jnp.asarray(peer()["input_ids"][:, :21])
    B, S = ids.shape
    segment_ids = np.array([[0] * 1 + [1] * 15 + [2] * 5, [3] * 7 + [9] * 14])
    docs = [(0, 0, 1), (0, 1, 16), (0, 16, 21), (1, 0, 7), (1, 7, 21)]  # (row, start, end)
    alone_ids = np.zeros((len(docs), S), np.int32)
    valid = np.zeros((len(docs), S), bool)
    for r, (b, lo, hi) in enumerate(docs):
        alone_ids[r, S - (hi - lo) :] = np.asarray(ids[b, lo:hi])
        valid[r, S - (hi - lo) :] = True
    first = np.array([lo == 0 for _, lo, _ in docs])
    rows = np.array([b for b, _, _ in docs])

    @jax.jit
    def run(p):
        keys = jax.random.split(jax.random.key(3), 3)  # random states to start from
        zeros = ModelStates.zeros(config, B)
        states = ModelStates(*(jax.random.normal(key, x.shape, x.dtype) for key, x in zip(keys, zeros, strict=True)))
        packed, packed_states = model.apply(
            {"params": p}, ids, states, segment_ids=jnp.asarray(segment_ids), return_states=True
        )
        # Per document: the row's states for a row's first document, zeros for the others.
        alone_states = ModelStates(
            *(jnp.where(first.reshape((1, -1) + (1,) * (x.ndim - 2)), x[:, rows], 0) for x in states)
        )
        alone, alone_last = model.apply(
            {"params": p}, jnp.asarray(alone_ids), alone_states, jnp.asarray(valid), return_states=True
        )
        return packed, packed_states, alone, alone_last

    packed, packed_states, alone, alone_last = run(params)
    expected = np.zeros(packed.shape)
    for r, (b, lo, hi) in enumerate(docs):
        expected[b, lo:hi] = alone[r, S - (hi - lo) :]
    assert_close("packed logits", expected, packed, TOL["float32-model"])
    last = [r for r, (_, _, hi) in enumerate(docs) if hi == S]
    for name, a, b in zip("cnm", alone_last, packed_states, strict=True):
        assert_close(f"state {name}", np.asarray(a[:, last], np.float64), b, TOL["float32-model"])


def test_segment_ids_errors():
    config, params, rt = load()
    model = xLSTMLMModel(config, rt)
    ids = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids must be integer \(B, S\)=\(2, 5\).*shape=\(2, 4\)"):
        model.apply({"params": params}, ids, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"segment_ids must be integer.*dtype=float32"):
        model.apply({"params": params}, ids, segment_ids=jnp.zeros((2, 5), jnp.float32))


def _dots(jaxpr) -> list[tuple]:
    """``(precision, operand dtypes)`` of every dot_general in a jaxpr, sub-jaxprs (scan, jit, ...) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            precision = eqn.params["precision"]
            precision = (precision,) if not isinstance(precision, tuple) else tuple(set(precision))
            found.append((precision, tuple(str(v.aval.dtype) for v in eqn.invars)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dots(sub)
    return found


@pytest.mark.parametrize("tie", [False, True], ids=["lm-head", "tied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_products_are_not_rounded(dtype, tie):
    """Every product with float32 operands asks for HIGHEST precision (GPUs would round them to TF32); bf16
    products keep the default (tensor cores). A float32 model has only the former; a bf16 one has both (its
    gate projections run in float32)."""
    ids = jnp.zeros((1, 5), jnp.int32)
    model = xLSTMLMModel(xLSTMLMConfig.tiny(dtype=dtype, tie_word_embeddings=tie))
    params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    dots = _dots(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids))(params).jaxpr)
    f32 = [precision for precision, dtypes in dots if dtypes == ("float32", "float32")]
    bf16 = [precision for precision, dtypes in dots if dtypes == ("bfloat16", "bfloat16")]
    assert len(f32) + len(bf16) == len(dots), dots
    assert all(p == (jax.lax.Precision.HIGHEST,) for p in f32), dots
    assert all(p in ((None,), (jax.lax.Precision.DEFAULT,)) for p in bf16), dots
    assert len(f32) >= (5 if dtype == "float32" else 1) and len(bf16) >= (0 if dtype == "float32" else 4), dots


@pytest.mark.parametrize("kernel_dtype", [jnp.bfloat16, jnp.float32])
def test_project_wide_is_a_float32_product(kernel_dtype):
    """The gates' product: bf16 x times a bf16 kernel goes to the product as bf16 accumulated in float32; a float32
    kernel widens x (HIGHEST). Either way the result is the float32 product of the same values (not rounded to
    bf16) against float64."""
    kx, kk = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (3, 7, 64), jnp.float32).astype(jnp.bfloat16)
    kernel = (jax.random.normal(kk, (64, 16), jnp.float32) / 8).astype(kernel_dtype)
    y = project_wide(x, kernel, jnp.float32)
    assert y.dtype == jnp.float32 and y.shape == (3, 7, 16)
    dots = _dots(jax.make_jaxpr(lambda x, k: project_wide(x, k, jnp.float32))(x, kernel).jaxpr)
    narrow = kernel_dtype == jnp.bfloat16
    want = ((None,), ("bfloat16", "bfloat16")) if narrow else ((jax.lax.Precision.HIGHEST,), ("float32", "float32"))
    assert dots == [want], dots
    xn, kn = np.asarray(x, np.float64), np.asarray(kernel.astype(jnp.float32), np.float64)
    scale = np.einsum("bsk,kn->bsn", np.abs(xn), np.abs(kn))  # sum_k |x_k w_kn|: the accumulation's error scale
    assert_close("x @ kernel", xn @ kn, y, TOL["float32-sum"], scale=scale)


def test_rms_norm_output_passes_a_barrier():
    """RMSNorm's rows, weight applied, are the operand of an optimization barrier (so XLA writes them once rather
    than folding the weight multiply into each product that reads them), and equal the unfenced function's."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 16), jnp.float32).astype(jnp.bfloat16)
    weight = jax.random.normal(jax.random.key(1), (16,), jnp.float32)
    norm = RMSNorm(1e-6, True, jnp.float32)

    def apply(x, weight):
        return norm.apply({"params": {"weight": weight}}, x)

    eqns = jax.make_jaxpr(apply)(x, weight).jaxpr.eqns
    barriers = [e for e in eqns if e.primitive.name == "optimization_barrier"]
    assert len(barriers) == 1 and barriers[0].outvars[0].aval.shape == x.shape
    producer = next(e for e in eqns if barriers[0].invars[0] in e.outvars)
    assert producer.primitive.name == "mul"  # the weight multiply happens before the barrier
    np.testing.assert_array_equal(np.asarray(apply(x, weight)), np.asarray(rms_norm(x, weight, 1e-6)))
