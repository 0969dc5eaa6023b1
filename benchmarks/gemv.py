"""The batch-1 decode projections of xLSTM-7B: XLA's product against the Pallas vector-matrix kernel.

Run on a GPU from the repository root::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gemv.py [--json out.json]

For each weight shape of a decode step (qkvo 4096 x 12288, out-proj 4096 x 4096, down 10944 x 4096, gate+up
4096 x 21888; bf16, one bf16 row), 64 products run in one jitted loop (each row depends on the last
product, so none is hoisted) under ``jax.profiler``; the table gives the product kernel's median device time,
its fraction of the floor (the weight read once at 4.27 TB/s) and the other kernels per product (the sum of
the split partials, the loop's own update). Every variant is checked against a float32 product first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import COPY_TBPS
from benchmarks.step_trace import trace
from xlstm_jax.kernels import GemvConfig, gemv_pallas
from xlstm_jax.kernels.gemv import gemv_fits

SHAPES = {"qkvo": (4096, 12288), "out_proj": (4096, 4096), "down": (10944, 4096), "gate_up": (4096, 21888)}
CONFIGS = {
    "default": GemvConfig(),
    "bn32": GemvConfig(block_n=32),
    "bn128-bk32": GemvConfig(block_n=128, block_k=32),
    "programs528": GemvConfig(min_programs=528),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for shape_name, (K, N) in SHAPES.items():
        kw = jax.random.split(jax.random.key(K + N))
        w = (jax.random.normal(kw[0], (K, N), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
        x0 = jax.random.normal(kw[1], (1, K), jnp.float32).astype(jnp.bfloat16)
        ref = np.asarray(jnp.dot(x0.astype(jnp.float32), w.astype(jnp.float32), precision="highest"))
        floor = K * N * 2 / COPY_TBPS * 1e6
        variants = {"xla": lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)}
        for name, cfg in CONFIGS.items():
            if gemv_fits(K, N, cfg):
                variants[name] = lambda x, w, cfg=cfg: gemv_pallas(x, w, config=cfg)
        print(f"{shape_name} K={K} N={N}: floor {floor:.1f} us", flush=True)
        for name, fn in variants.items():
            y = np.asarray(jax.jit(fn)(x0, w), np.float32)
            err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))

            def body(_, x, fn=fn, w=w):
                y = fn(x, w)
                return x + (y[:, :1] * 0).astype(x.dtype)  # a dependency on the product: nothing to hoist

            run = jax.jit(lambda x, body=body: jax.lax.fori_loop(0, args.steps, body, x))
            jax.block_until_ready(run(x0))
            t = trace(run, x0, args.steps)
            blocks = GemvConfig().blocks(K, N) if name == "xla" else CONFIGS[name].blocks(K, N)
            rows.append({"shape": shape_name, "variant": name, "err": err, "blocks": blocks, **t})
            print(
                f"  {name:12s} main {t.get('main_us', float('nan')):6.1f} us ({floor / t.get('main_us', 1):.2f} of "
                f"floor) + {t.get('other_us', float('nan')):4.1f} us in {t.get('other_kernels', 0):.0f} others | "
                f"err {err:.1e} | {'' if name == 'xla' else blocks}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
