"""Generation: the peer's greedy tokens, agreement with one parallel pass, padding, sampling, stop tokens."""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET
from tests.models.fixture import load, peer
from tests.numerics import TOL, assert_close
from xlstm_jax.generation import SamplingConfig, _step_jit, generate, pad_prompts, sample_logits, stream
from xlstm_jax.kernels import recurrent_step_pallas
from xlstm_jax.mlstm.recurrent import recurrent_step_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS, create_mlstm_backend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.layer import PAD_IGATE
from xlstm_jax.models.xlstm_parallel.model import ModelStates, xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import DecodeFusion, KernelMode, RuntimeConfig

SAMPLED = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)
# Prompts from the peer prompt: lengths 21 and 4, so with chunks of 16 the short one's 17 padded positions
# fill a whole chunk.
PROMPTS = [peer()["prompt"][0].tolist(), peer()["prompt"][0, 5:9].tolist()]


def test_greedy_matches_peer():
    """The transformers model's greedy continuation, token for token, and the logits it chose from."""
    config, params, rt = load()
    out = generate(config, params, peer()["prompt"], 24, stop_tokens=(), return_logits=True, runtime=rt)
    np.testing.assert_array_equal(np.asarray(out.tokens), peer()["greedy"])
    np.testing.assert_array_equal(np.asarray(out.num_generated), [24])
    assert_close("decode logits", peer()["greedy_logits"], out.logits, TOL["float32-model"])


# The model's kernels in Pallas interpret mode on a CPU, compiled on a GPU: the kernels' own code runs either way.
KERNELS = KernelMode.INTERPRET if INTERPRET else KernelMode.COMPILED


def _kernels_in_jaxpr(config, params, rt) -> set[str]:
    """Names of the Pallas kernels in one decode step of the model (``pallas_call`` equations of its jaxpr)."""
    states = ModelStates.zeros(config, 1)
    model = xLSTMLMModel(config, rt)
    step = lambda p, s: model.apply({"params": p}, jnp.ones((1, 1), jnp.int32), s, decode=True)
    jaxpr = jax.make_jaxpr(step)(params, states)
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                names.add(str(eqn.params.get("name_and_src_info", eqn.params.get("name", ""))).split(" ")[0])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return names


@pytest.mark.parametrize("scan_blocks", [False, True], ids=["unrolled-stacked-step", "scanned-layer-step"])
def test_pallas_decode_step_matches_peer(scan_blocks):
    """The Pallas decode step in the model (interpret mode here; compiled on a GPU): the peer's greedy tokens.

    Unrolled blocks call the stacked step (each layer's slice updated in place by the kernel), scanned blocks
    the step on one layer's states.
    """
    config, params, rt = load(step_backend="recurrent_pallas", scan_blocks=scan_blocks, kernel_mode=KERNELS)
    if scan_blocks and not INTERPRET:
        # Known limitation (H200, jax 0.11.2, flax 0.12.10): flax's nn.scan rejects the compiled kernel in its
        # body. The model says so and what to use instead.
        with pytest.raises(ValueError, match="scan_blocks=False"):
            generate(config, params, peer()["prompt"], 6, stop_tokens=(), return_logits=True, runtime=rt)
        return
    assert "mlstm_recurrent_step" in _kernels_in_jaxpr(config, params, rt)
    out = generate(config, params, peer()["prompt"], 6, stop_tokens=(), return_logits=True, runtime=rt)
    np.testing.assert_array_equal(np.asarray(out.tokens), peer()["greedy"][:, :6])
    assert_close("decode logits", peer()["greedy_logits"][:, :6], out.logits, TOL["float32-model"])


@pytest.mark.parametrize("scan_blocks", [False, True], ids=["unrolled", "scanned"])
def test_decode_fused_matches_peer(scan_blocks):
    """The default ``decode_fusion="auto"``: with unrolled blocks each residual add with its RMSNorm, the first
    with the gates, in ``add_rms_norm_pallas`` (interpret mode here; compiled on a GPU); scanned blocks decode
    unfused. Either way the peer's greedy tokens and logits."""
    config, params, rt = load(scan_blocks=scan_blocks, step_backend="recurrent", kernel_mode=KERNELS)
    assert rt.decode_fusion is DecodeFusion.AUTO and rt.fuse_decode(True) == (not scan_blocks)
    kernels = _kernels_in_jaxpr(config, params, rt)
    assert ("add_rms_norm" in kernels) == (not scan_blocks), kernels
    out = generate(config, params, peer()["prompt"], 6, stop_tokens=(), return_logits=True, runtime=rt)
    np.testing.assert_array_equal(np.asarray(out.tokens), peer()["greedy"][:, :6])
    assert_close("decode logits", peer()["greedy_logits"][:, :6], out.logits, TOL["float32-model"])


@pytest.mark.parametrize("step_backend", ["recurrent", "recurrent_pallas"])
def test_decode_fused_padded_batch_matches_unfused(step_backend):
    """A left-padded batch of two prompts (padded positions and finished rows fed as no-op steps) decodes to
    the same tokens, logits and states with and without the fused decode, with either decode step (the Pallas
    one with its read-out kernel, ``head_norm``)."""
    config, params, rt = load(scan_blocks=False, decode_fusion="off", step_backend="recurrent")
    reference = generate(config, params, PROMPTS, 6, stop_tokens=(), return_logits=True, runtime=rt)
    fused = rt.replace(decode_fusion="on", step_backend=step_backend, kernel_mode=KERNELS)
    out = generate(config, params, PROMPTS, 6, stop_tokens=(), return_logits=True, runtime=fused)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
    assert_close("logits", np.asarray(reference.logits, np.float64), out.logits, TOL["float32-model"])
    for name, x, y in zip("cnm", reference.states, out.states, strict=True):
        assert_close(f"state {name}", np.asarray(x, np.float64), y, TOL["float32-model"])


def test_decode_fusion_resolves_where_it_applies():
    rt = RuntimeConfig()
    assert rt.fuse_decode(True) and not rt.replace(decode_fusion="off").fuse_decode(True)
    assert not rt.fuse_decode(False)  # auto: off where it cannot apply
    with pytest.raises(ValueError, match="norm_reduction_force_float32"):
        rt.replace(decode_fusion=DecodeFusion.ON).fuse_decode(False)  # the kernel's statistics are float32
    with pytest.raises(ValueError, match="scan_blocks=False"):
        rt.replace(scan_blocks=True, decode_fusion="on")
    with pytest.raises(ValueError, match="decode_fusion"):
        rt.replace(decode_fusion="yes")


@functools.cache
def _sampled():
    config, params, rt = load()
    kwargs = {"sampling": SAMPLED, "key": jax.random.key(7), "stop_tokens": (), "return_logits": True}
    return generate(config, params, PROMPTS, 8, **kwargs, runtime=rt)


def test_generation_equals_one_parallel_pass():
    """Logits seen while decoding (sampled, padded batch) equal one parallel pass over prompt + tokens."""
    config, params, rt = load(prefill_backend="parallel_stabilized")
    out = _sampled()
    model = xLSTMLMModel(config, rt)
    for b, prompt in enumerate(PROMPTS):
        seq = np.concatenate([prompt, np.asarray(out.tokens[b, :-1])])[None]
        logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(seq))
        ref = np.asarray(logits[0, len(prompt) - 1 :], np.float64)
        assert_close(f"row {b}", ref, out.logits[b], TOL["float32-model"])


def test_padded_and_unpadded_prompts_agree():
    """Each prompt alone (no padding) gives the tokens, logits and states it gets in the left-padded batch."""
    config, params, rt = load()
    batch = generate(config, params, PROMPTS, 8, stop_tokens=(), return_logits=True, runtime=rt)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(config, params, [prompt], 8, stop_tokens=(), return_logits=True, runtime=rt)
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(batch.tokens[b]))
        assert_close(f"logits {b}", np.asarray(alone.logits[0], np.float64), batch.logits[b], TOL["float32-model"])
        for name, x, y in zip("cnm", alone.states, batch.states, strict=True):
            assert_close(f"state {name} {b}", np.asarray(x[:, 0], np.float64), y[:, b], TOL["float32-model"])


def _forms():
    """Every prefill backend (the Pallas one in interpret mode) and every decode step, as sequence callables."""
    forms = {}
    for name in BACKENDS:
        kwargs = {
            "recurrent": {"use_scan": True},
            "chunkwise": {"chunk_size": 8},
            "recurrent_pallas": {"interpret": True},
        }
        backend = create_mlstm_backend(name, state_dtype="float32", **kwargs.get(name, {}))
        forms[name] = functools.partial(backend, return_last_states=True)
    steps = {
        "recurrent": recurrent_step_fw,
        "recurrent_pallas": functools.partial(recurrent_step_pallas, interpret=True),
    }
    for name, step in steps.items():

        def run(q, k, v, i, f, c, n, m, step=step):
            (c, n, m), h = jax.lax.scan(
                lambda s, x: (lambda h, s2: (s2, h))(*step(*s, *x, eps=1e-6)),
                (c, n, m[..., None]),
                tuple(jnp.moveaxis(t, 2, 0) for t in (q, k, v, i[..., None], f[..., None])),
            )
            return h, (c, n, m[..., 0])

        forms[f"step {name}"] = run
    return forms


@pytest.mark.parametrize("form", sorted(_forms()))
def test_padding_steps_are_exact_no_ops(form):
    """A sequence of padding steps (i = PAD_IGATE, f = +inf) returns the initial states bit for bit, no NaN."""
    rng = np.random.default_rng(3)
    B, NH, S, DHQK, DHV = 2, 2, 19, 16, 32  # S: two whole chunks of 8 and a rest; Pallas needs dims >= 16
    q, k = (jnp.asarray(rng.standard_normal((B, NH, S, DHQK)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, NH, S, DHV)), jnp.float32)
    i = jnp.full((B, NH, S), PAD_IGATE, jnp.float32)
    f = jnp.full((B, NH, S), jnp.inf, jnp.float32)
    c0 = jnp.asarray(rng.standard_normal((B, NH, DHQK, DHV)), jnp.float32)
    n0 = jnp.asarray(rng.standard_normal((B, NH, DHQK)), jnp.float32)
    m0 = jnp.asarray(rng.uniform(-20.0, 15.0, (B, NH)), jnp.float32)
    h, states = jax.jit(_forms()[form])(q, k, v, i, f, c0, n0, m0)  # jitted: eager dispatch compiles op by op
    assert np.all(np.isfinite(np.asarray(h)))
    for name, x, x0 in zip("cnm", states, (c0, n0, m0), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(x0), err_msg=f"{form}: state {name}")


def test_sampling_is_reproducible_and_stream_matches():
    config, params, rt = load()
    again = generate(config, params, PROMPTS, 8, sampling=SAMPLED, key=jax.random.key(7), stop_tokens=(), runtime=rt)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(_sampled().tokens))
    compiled = _step_jit._cache_size()
    kwargs = {"sampling": SAMPLED, "stop_tokens": (), "runtime": rt}
    streamed = list(stream(config, params, PROMPTS, 8, key=jax.random.key(7), **kwargs))
    np.testing.assert_array_equal(np.stack(streamed, axis=1), np.asarray(_sampled().tokens))
    assert _step_jit._cache_size() <= compiled + 1  # one compiled step for all 8 tokens
    compiled = _step_jit._cache_size()
    list(stream(config, params, PROMPTS, 8, sampling=SAMPLED, key=jax.random.key(9), stop_tokens=(), runtime=rt))
    assert _step_jit._cache_size() == compiled  # and none for a new run of the same shapes
    other = generate(config, params, PROMPTS, 8, sampling=SAMPLED, key=jax.random.key(8), stop_tokens=(), runtime=rt)
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(_sampled().tokens))


def test_sample_logits_filters():
    """top_k and top_p restrict the support exactly; top_k=1 and a tiny top_p are greedy."""
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]], jnp.float32))
    keys = jax.random.split(jax.random.key(0), 400)

    def support(sampling):
        draws = jax.vmap(lambda key: sample_logits(logits, key, sampling))(keys)
        return set(np.unique(np.asarray(draws)).tolist())

    assert support(SamplingConfig(temperature=1.0)) == {0, 1, 2, 3, 4}
    assert support(SamplingConfig(temperature=1.0, top_k=2)) == {1, 3}
    assert support(SamplingConfig(temperature=1.0, top_k=1)) == {1}
    # Sorted: 0.4, 0.3, 0.15, 0.1, 0.05; mass before each: 0, 0.4, 0.7, 0.85, 0.95.
    assert support(SamplingConfig(temperature=1.0, top_p=0.5)) == {1, 3}
    assert support(SamplingConfig(temperature=1.0, top_p=0.72)) == {1, 3, 4}
    assert support(SamplingConfig(temperature=1.0, top_p=1e-6)) == {1}
    assert support(SamplingConfig(temperature=1.0, top_k=3, top_p=0.5)) == {1, 3}
    assert int(sample_logits(logits, keys[0], SamplingConfig())[0]) == 1


def test_stop_tokens():
    """A sequence ends at its first stop token (kept); later positions are padding; others go on."""
    config, params, rt = load()
    greedy = peer()["greedy"][0]
    stop = int(greedy[2])
    first = int(np.argmax(greedy == stop))
    prompts = [peer()["prompt"][0].tolist(), PROMPTS[1]]
    out = generate(config, params, prompts, 24, stop_tokens=(stop,), pad_token_id=0, runtime=rt)
    tokens, count = np.asarray(out.tokens), np.asarray(out.num_generated)
    assert count[0] == first + 1
    np.testing.assert_array_equal(tokens[0, : first + 1], greedy[: first + 1])
    np.testing.assert_array_equal(tokens[0, first + 1 :], 0)
    assert stop not in tokens[1, : count[1] - 1] and (count[1] == 24 or tokens[1, count[1] - 1] == stop)
    streamed = np.stack(list(stream(config, params, [prompts[0]], 24, stop_tokens=(stop,), runtime=rt)), axis=1)
    np.testing.assert_array_equal(streamed[0], greedy[: first + 1])


def test_pad_prompts_and_errors():
    ids, valid = pad_prompts([[5, 6, 7], [8]], pad_token_id=1, multiple_of=4)
    np.testing.assert_array_equal(ids, [[1, 5, 6, 7], [1, 1, 1, 8]])
    np.testing.assert_array_equal(valid, [[False, True, True, True], [False, False, False, True]])
    config, params, rt = load()
    with pytest.raises(ValueError, match="non-empty"):
        generate(config, params, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="PRNG key"):
        generate(config, params, [[1, 2]], 4, sampling=SamplingConfig(temperature=0.5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(config, params, [[1, 2]], 0)
    with pytest.raises(ValueError, match="prompt token ids"):
        generate(config, params, [[1, 99]], 4)
    with pytest.raises(ValueError, match="stop_tokens"):
        generate(config, params, [[1, 2]], 4, stop_tokens=(100,))
    for bad in ({"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
