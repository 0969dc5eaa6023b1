"""The tolerance table catches the regressions it is meant to: a float32 gradient check fails when the products
lose precision (TF32's 10-bit or bfloat16's 7-bit mantissa), while the float32 form passes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from tests.mlstm.form_checks import check_gradients, random_inputs
from xlstm_jax.mlstm.parallel import parallel_stabilized_fw


def _round_mantissa(x: jax.Array, bits: int) -> jax.Array:
    """float32 ``x`` rounded to nearest (ties to even) with ``bits`` mantissa bits: 10 is TF32, 7 bfloat16."""
    drop = 23 - bits
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    b = (b + jnp.uint32((1 << (drop - 1)) - 1) + ((b >> drop) & 1)) & jnp.uint32((0xFFFFFFFF >> drop) << drop)
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def _with_rounded_operands(bits: int):
    """The parallel form with q, k and v rounded to ``bits`` mantissa bits (gradients passed straight through):
    the operand rounding of a matrix unit that runs float32 products in TF32 or bfloat16."""

    def form(q, k, v, *rest, **kwargs):
        q, k, v = (x + jax.lax.stop_gradient(_round_mantissa(x, bits) - x) for x in (q, k, v))
        return parallel_stabilized_fw(q, k, v, *rest, **kwargs)

    return form


def test_round_mantissa():
    x = jnp.asarray([1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -3.0 - 2.0**-20, 1.0 + 2.0**-8], jnp.float32)
    assert _round_mantissa(x, 10).tolist() == [1.0, 1.0 + 2.0**-9, -3.0, 1.0 + 2.0**-8]  # ties to even
    y = jnp.asarray([1.2345, -0.07, 3e-3], jnp.float32)
    assert _round_mantissa(y, 7).tolist() == y.astype(jnp.bfloat16).astype(jnp.float32).tolist()


@pytest.mark.parametrize(("bits", "name"), [(None, "float32"), (10, "TF32"), (7, "bfloat16")])
def test_float32_gradient_bound_catches_reduced_precision_products(bits, name):
    x = random_inputs(0, 1, 1, 12, 16, 16)
    if bits is None:
        check_gradients(parallel_stabilized_fw, x, "float32")
    else:
        with pytest.raises(AssertionError, match="scaled max error"):
            check_gradients(_with_rounded_operands(bits), x, "float32")
