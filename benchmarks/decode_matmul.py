"""The decode-step products of xLSTM-7B with what surrounds them: XLA against the fused Pallas kernel.

Run on a GPU from the repository root::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/decode_matmul.py [--rows 1,16] [--json out.json]

For each product of a decode layer, as the model computes it:

- ``qkvo``: RMSNorm, then x (M, 4096) @ (4096, 12288), plus the float32 gate product (4096, 16) + bias,
  soft-capped;
- ``out``: x (M, 4096) @ (4096, 4096) + residual;
- ``gate_up``: RMSNorm, then ``silu(x W_gate) * (x W_up)`` with W (4096, 2 x 10944);
- ``down``: x (M, 10944) @ (10944, 4096) + residual;

bf16 weights and rows, ``--layers`` distinct weights (so that, as in the model, no weight stays in the 50 MB
L2 cache between uses) applied in turn, ``--steps`` times, in one jitted loop under ``jax.profiler``. The
table gives the device time per product from the trace, after half a second of warm-up (the span from the
first kernel to the last, over all products: every kernel XLA launches around the product counts), its
fraction of the floor (the weight read once at 4.27 TB/s), and the kernels per product. Every variant is
first checked against a float64 computation of the same function (max |diff| / max |ref|).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import COPY_TBPS
from benchmarks.step_trace import trace
from xlstm_jax.kernels import DecodeMatmulConfig, decode_matmul_pallas
from xlstm_jax.kernels.decode_matmul import decode_matmul_fits

D, V, FFN, G = 4096, 4096, 10944, 16
PRODUCTS = {  # name: (K, N of the weight, keyword arrays of decode_matmul_pallas besides x and w, static keywords)
    "qkvo": (D, 3 * V, ("norm_weight", "side_weight", "side_bias"), {"side_cap": 15.0}),
    "out": (V, D, ("residual",), {}),
    "gate_up": (D, 2 * FFN, ("norm_weight",), {"glu": True}),
    "down": (FFN, D, ("residual",), {}),
}
C = DecodeMatmulConfig
VARIANTS = {  # None: the same function in XLA (decode_matmul_pallas without a GPU)
    "xla": None,
    "default": C(),
    "pf2": C(num_stages=1, prefetch=2),
    "pf2-bn32": C(block_n=32, num_stages=1, prefetch=2),
    "fma-bk64-pf1": C(block_k=64, num_stages=1, prefetch=1, fma=True),  # the removed gemv_pallas' tiling
    "fma-bk32-pf3": C(block_k=32, num_stages=1, prefetch=3, fma=True),
    "fma-bn128-bk32-pf2-w8": C(block_n=128, block_k=32, num_warps=8, num_stages=1, prefetch=2, fma=True),
    "fma-bn32-bk64-pf2": C(block_n=32, block_k=64, num_stages=1, prefetch=2, fma=True),
}


def arrays(name: str, M: int, layers: int, seed: int = 0) -> tuple[jax.Array, list[dict]]:
    """The first rows x (M, K) and, per layer, the keyword arrays of ``decode_matmul_pallas`` (w first)."""
    K, N, extra, _ = PRODUCTS[name]
    keys = iter(jax.random.split(jax.random.key(seed), 8 * layers + 1))

    def normal(shape, scale=1.0):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(jnp.bfloat16)

    makers = {
        "norm_weight": lambda: 1 + normal((K,), 0.1),
        "side_weight": lambda: normal((K, G), K**-0.5),
        "side_bias": lambda: normal((G,)),
        "residual": lambda: normal((M, N // 2 if name == "gate_up" else N)),
    }
    x = normal((M, K))
    return x, [{"w": normal((K, N), K**-0.5), **{e: makers[e]() for e in extra}} for _ in range(layers)]


def reference(name: str, x, a: dict) -> list[np.ndarray]:
    """The product in float64 from the same (rounded) inputs: [y] or, for qkvo, [y, capped gates]."""
    f = lambda t: np.asarray(t, np.float64)  # noqa: E731
    x = f(x)
    if "norm_weight" in a:
        x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * f(a["norm_weight"])
    y = x @ f(a["w"])
    if name == "gate_up":
        g, u = np.split(y, 2, -1)
        y = g / (1 + np.exp(-g)) * u
    if "residual" in a:
        y = y + f(a["residual"])
    if name != "qkvo":
        return [y]
    return [y, 15 * np.tanh((x @ f(a["side_weight"]) + f(a["side_bias"])) / 15)]


def variant_fn(name: str, config: DecodeMatmulConfig | None):
    """``fn(x, w, **arrays)`` for a product: the Pallas kernel with ``config``, or XLA's (config None)."""
    static = PRODUCTS[name][3]
    if config is not None:
        return functools.partial(decode_matmul_pallas, config=config, **static)
    from xlstm_jax.kernels.decode_matmul import _xla

    def xla(x, w, **a):
        keys = ("norm_weight", "residual", "side_weight", "side_bias")
        nw, r, sw, sb = (a.get(k) for k in keys)
        return _xla(x, w, nw, 1e-6, static.get("glu", False), r, sw, sb, static.get("side_cap"))

    return xla


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--products", default="qkvo,gate_up,out,down")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; floor: the weight read once at 4.27 TB/s")
    header = ("product", "M", "variant", "us/prod", "x floor", "kernels", "main us", "err")
    print("{:8s} {:>3s} {:14s} {:>8s} {:>8s} {:>7s} {:>8s} {}".format(*header))
    for M in (int(m) for m in args.rows.split(",")):
        for name in args.products.split(","):
            K, N, _, static = PRODUCTS[name]
            x0, layers = arrays(name, M, args.layers)
            refs = reference(name, x0, layers[0])
            floor = K * N * 2 / COPY_TBPS * 1e6
            for variant in args.variants.split(","):
                config = VARIANTS[variant]
                if config is not None and not decode_matmul_fits(K, N, config, static.get("glu", False)):
                    continue
                op = variant_fn(name, config)

                def step(_, x, op=op, layers=layers):
                    for a in layers:  # the next rows depend on this product: nothing is hoisted
                        out = op(x, **a)
                        y = out[0] if isinstance(out, tuple) else out
                        x = y if y.shape == x.shape else x + (y[:, :1] * 0).astype(x.dtype)
                    return x

                try:
                    out = jax.jit(op)(x0, **layers[0])
                    outs = out if isinstance(out, tuple) else (out,)
                    err = max(
                        float(np.max(np.abs(np.asarray(o, np.float64) - r)) / np.max(np.abs(r)))
                        for o, r in zip(outs, refs, strict=True)
                    )
                    run = jax.jit(lambda x, step=step: jax.lax.fori_loop(0, args.steps, step, x))
                    jax.block_until_ready(run(x0))
                    t = trace(run, x0, args.steps * args.layers)
                except Exception as e:  # noqa: BLE001 (one variant failing must not stop the sweep)
                    print(f"{name:8s} {M:3d} {variant:14s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append({"product": name, "M": M, "variant": variant, "err": err, "floor_us": floor, **t})
                span = t.get("span_us", np.nan)
                print(
                    f"{name:8s} {M:3d} {variant:14s} {span:8.2f} {span / floor:8.3f} {t.get('kernels', np.nan):7.1f} "
                    f"{t.get('main_us', np.nan):8.2f} {err:.1e}",
                    flush=True,
                )
    if args.json:
        result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
