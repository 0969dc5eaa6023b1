"""Probe: the mLSTM decode step with n and m ALSO updated in place (no fresh n/m buffers, no copy kernels).

Run on a GPU from the repository root::

    PYTHONPATH=. python benchmarks/experiments/step_inplace.py [--batch 32,128] [--only head,pp] [--budget 210]

On a CPU (interpret mode on tiny shapes + Triton lowering at the real shapes, no timing)::

    PYTHONPATH=. python benchmarks/experiments/step_inplace.py --cpu

Variants (state c (B,NH,DHQK,DHV) f32, n (B,NH,DHQK) f32, m (B,NH,1) f32; q/k/v bf16; i/f f32 (B,NH,1)):

* ``xla``: ``recurrent_step_fw`` (the reference).
* ``default``: ``recurrent_step_pallas`` with its default config (c in place, n/m fresh + copies).
* ``head-bvX-bkY-wW[-stS]``: grid (B*NH,), ONE program per head, c, n, m all aliased in place. The program
  first reads all of n (DHQK), m, q, k, i, f (and requests its first c tile), computes m', n', q̂·n' and
  the normaliser, then ``debug_barrier()`` (bar.sync: every warp's loads of n and m are complete before
  any warp stores), then stores n', m' and walks all (bk x bv) tiles of its head's c (DHV blocks outer, row
  blocks inner, next tile prefetched), writing each c' tile and, after the last row block of a DHV block,
  that block of h. Nothing reads n or m after the barrier; no other program touches this head.
* ``pp-...``: the repo's own kernel body (``_step_kernel``) and tiled grid (DHV blocks x DHQK splits x
  heads, several programs per head), with n and m kept in ping-pong halves n2 (2,B,NH,DHQK), m2
  (2,B,NH,1), both aliased: step with parity p reads half p and writes half 1-p (static parity; the loop
  body runs two steps, p=0 then p=1). No address is both read and written by one launch (except c tiles,
  which, as in the repo kernel, each belong to one program), so there is no race within or across
  programs, and no barrier is needed. ``pp-s1-*`` keep DHQK unsplit (h in the kernel); ``pp-default`` uses
  the default tiling (DHQK split in 4, h from a small XLA epilogue).

This is an experiment, kept so that the fourth session's numbers in BENCHMARKS.md can be rerun. ``_pp_call``
repeats the plumbing of ``xlstm_jax.kernels.recurrent_step._step_call`` with other n and m specs; if ping-pong
is adopted, it belongs there as an option, and this copy goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

import xlstm_jax.kernels.recurrent_step as rs
from xlstm_jax.kernels.config import StepKernelConfig
from xlstm_jax.kernels.recurrent_step import _step_kernel, recurrent_step_pallas
from xlstm_jax.mlstm.recurrent import recurrent_step_fw
from xlstm_jax.mlstm.stabilizer import normalizer, step_gates

F32, BF16 = jnp.float32, jnp.bfloat16
EPS = 1e-6
COPY_TBPS = 4.27e12  # H200 device-to-device copy ceiling (bytes read + written per second), benchmarks/kernels.py
TOL = {"h": 1e-2, "c": 1e-5, "n": 1e-5, "m": 1e-5}  # h is bf16: one ulp flip is ~4e-3 of its value


# ---------------------------------------------------------------------------------------------------------
# Variant 1: one program per head, c, n, m in place, barrier between the reads and the writes of n and m.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeadCfg:
    block_v: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 1
    prefetch: bool = True

    @property
    def name(self) -> str:
        st = f"-st{self.num_stages}" if self.num_stages != 1 else ""
        return f"head-bv{self.block_v}-bk{self.block_k}-w{self.num_warps}{st}" + ("" if self.prefetch else "-nopf")


def _head_kernel(
    c_ref,  # (DHQK, DHV) f32: the whole head's c
    n_ref,  # (DHQK,) f32
    m_ref,  # (1,) f32
    q_ref,  # (DHQK,)
    k_ref,  # (DHQK,)
    v_ref,  # (DHV,)
    i_ref,  # (1,)
    f_ref,  # (1,)
    c_out_ref,  # aliased to c_ref
    n_out_ref,  # aliased to n_ref
    m_out_ref,  # aliased to m_ref
    h_ref,  # (DHV,) fresh, q's dtype
    *,
    eps: float,
    block_v: int,
    block_k: int,
    prefetch: bool,
    barrier: bool,
):
    DHQK, DHV = c_ref.shape
    nrb, nvb = DHQK // block_k, DHV // block_v
    total = nrb * nvb
    scale = 1.0 / math.sqrt(DHQK)

    def ds(blk, size):
        if isinstance(blk, int):
            return pl.ds(blk * size, size)
        return pl.ds(pl.multiple_of(blk * size, size), size)

    def coords(t):  # tile t: DHV block t // nrb (outer), row block t % nrb (inner); t >= 0
        if isinstance(t, int):
            return t // nrb, t % nrb
        return jax.lax.div(t, jnp.int32(nrb)), jax.lax.rem(t, jnp.int32(nrb))

    def load(t):
        vb, j = coords(t)
        return c_ref[ds(j, block_k), ds(vb, block_v)]

    first = load(0) if prefetch else None  # c only: never re-read after its own store

    # Phase 1: every read of n and m (and the gate math that needs them), consumed before the barrier.
    m_new, f_act, i_act = step_gates(m_ref[0], i_ref[0].astype(F32), f_ref[0].astype(F32))
    n_new = f_act * n_ref[...] + i_act * k_ref[...].astype(F32)
    qn = jnp.sum(q_ref[...].astype(F32) * scale * n_new)
    denom = normalizer(qn, m_new, eps)
    if barrier:  # bar.sync; not in interpret mode (sequential there, and it has no interpret rule)
        pl_triton.debug_barrier()
    # Phase 2: the writes of n and m; nothing below reads n_ref or m_ref.
    n_out_ref[...] = n_new
    m_out_ref[0] = m_new

    def update(t, c, acc):
        vb, j = coords(t)
        r, cols = ds(j, block_k), ds(vb, block_v)
        ik = i_act * k_ref[r].astype(F32)
        c = f_act * c + ik[:, None] * v_ref[cols].astype(F32)[None, :]
        c_out_ref[r, cols] = c
        acc = acc + (q_ref[r].astype(F32) * scale)[:, None] * c

        def write_h():
            h_ref[cols] = (jnp.sum(acc, axis=0) / denom).astype(h_ref.dtype)

        if isinstance(j, int):
            if j == nrb - 1:
                write_h()
                return jnp.zeros_like(acc)
            return acc
        last = j == nrb - 1
        pl.when(last)(write_h)
        return jnp.where(last, jnp.zeros_like(acc), acc)

    acc0 = jnp.zeros((block_k, block_v), F32)
    if prefetch:

        def body(t, carry):
            tile, acc = carry
            nxt = load(t + 1)  # a different tile from t's: distinct addresses
            return nxt, update(t, tile, acc)

        last_tile, acc = first, acc0
        if total > 1:
            last_tile, acc = jax.lax.fori_loop(0, total - 1, body, (first, acc0))
        update(total - 1, last_tile, acc)
    else:
        jax.lax.fori_loop(0, total, lambda t, acc: update(t, load(t), acc), acc0)


def _head_call(c, n, m, q, k, v, i, f, *, cfg: HeadCfg, eps: float, interpret: bool):
    """c (BH, DHQK, DHV), n (BH, DHQK), m (BH, 1), q/k (BH, DHQK), v (BH, DHV), i/f (BH, 1)."""
    BH, DHQK, DHV = c.shape
    bv, bk = min(cfg.block_v, DHV), min(cfg.block_k, DHQK)
    c_spec = pl.BlockSpec((None, DHQK, DHV), lambda bh: (bh, 0, 0))
    k_spec = pl.BlockSpec((None, DHQK), lambda bh: (bh, 0))
    v_spec = pl.BlockSpec((None, DHV), lambda bh: (bh, 0))
    s_spec = pl.BlockSpec((None, 1), lambda bh: (bh, 0))
    kernel = functools.partial(
        _head_kernel, eps=eps, block_v=bv, block_k=bk, prefetch=cfg.prefetch, barrier=not interpret
    )
    c, n, m, h = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(c.shape, F32),
            jax.ShapeDtypeStruct(n.shape, F32),
            jax.ShapeDtypeStruct(m.shape, F32),
            jax.ShapeDtypeStruct((BH, DHV), q.dtype),
        ],
        grid=(BH,),
        in_specs=[c_spec, k_spec, s_spec, k_spec, k_spec, v_spec, s_spec, s_spec],
        out_specs=[c_spec, k_spec, s_spec, v_spec],
        input_output_aliases={0: 0, 1: 1, 2: 2},
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="mlstm_step_head_inplace",
    )(c, n, m, q, k, v, i, f)
    return h, c, n, m


def head_step(c, n, m, q, k, v, i, f, eps=EPS, *, cfg: HeadCfg, interpret: bool = False):
    B, NH, DHQK, DHV = c.shape
    BH = B * NH
    h, c2, n2, m2 = _head_call(
        c.reshape(BH, DHQK, DHV), n.reshape(BH, DHQK), m.reshape(BH, 1),
        q.reshape(BH, DHQK), k.reshape(BH, DHQK), v.reshape(BH, DHV), i.reshape(BH, 1), f.reshape(BH, 1),
        cfg=cfg, eps=float(eps), interpret=interpret,
    )  # fmt: skip
    return h.reshape(B, NH, DHV), (c2.reshape(c.shape), n2.reshape(n.shape), m2.reshape(m.shape))


# ---------------------------------------------------------------------------------------------------------
# Variant 2: the repo kernel body and tiled grid, n and m in ping-pong halves (read half p, write half 1-p).
# ---------------------------------------------------------------------------------------------------------
def _pp_call(c, n2, m2, parity: int, q, k, v, i, f, *, config: StepKernelConfig, eps: float, interpret: bool):
    """c (BH, DHQK, DHV), n2 (2, BH, DHQK), m2 (2, BH, 1); parity a Python int (compiled into index maps)."""
    BH, DHQK, DHV = c.shape
    block_dhv, splits, block_dhqk = config.splits(BH, DHQK, DHV)
    rows = DHQK // splits
    rd, wr = parity, 1 - parity
    grid = (DHV // block_dhv, splits, BH)  # "tiles" order: DHV blocks fastest

    def idx(fn):
        return lambda vb, ks, bh: fn(bh, vb, ks)

    tile = pl.BlockSpec((None, rows, block_dhv), idx(lambda bh, vb, ks: (bh, ks, vb)))
    n_in = pl.BlockSpec((None, None, rows), idx(lambda bh, vb, ks: (rd, bh, ks)))
    n_out = pl.BlockSpec((None, None, rows), idx(lambda bh, vb, ks: (wr, bh, ks)))
    m_in = pl.BlockSpec((None, None, 1), idx(lambda bh, vb, ks: (rd, bh, 0)))
    m_out = pl.BlockSpec((None, None, 1), idx(lambda bh, vb, ks: (wr, bh, 0)))
    rows_spec = pl.BlockSpec((None, rows), idx(lambda bh, vb, ks: (bh, ks)))
    cols_spec = pl.BlockSpec((None, block_dhv), idx(lambda bh, vb, ks: (bh, vb)))
    head_spec = pl.BlockSpec((None, 1), idx(lambda bh, vb, ks: (bh, 0)))
    out_shape = [
        jax.ShapeDtypeStruct(c.shape, F32),
        jax.ShapeDtypeStruct(n2.shape, F32),
        jax.ShapeDtypeStruct(m2.shape, F32),
    ]
    out_specs = [tile, n_out, m_out]
    if splits == 1:
        out_shape.append(jax.ShapeDtypeStruct((BH, DHV), q.dtype))
        out_specs.append(cols_spec)
    else:
        out_shape += [jax.ShapeDtypeStruct((BH, splits, DHV), F32), jax.ShapeDtypeStruct((BH, splits), F32)]
        out_specs += [
            pl.BlockSpec((None, None, block_dhv), idx(lambda bh, vb, ks: (bh, ks, vb))),
            pl.BlockSpec((None, 1), idx(lambda bh, vb, ks: (bh, ks))),
        ]
    kernel = functools.partial(
        _step_kernel, eps=eps, DHQK=DHQK, rows=rows, block_dhqk=block_dhqk, prefetch=config.prefetch,
        evict_first=config.evict_first, vb_axis=0, ks_axis=1,
    )  # fmt: skip
    if splits == 1:
        kernel = functools.partial(kernel, qn_ref=None)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[tile, n_in, m_in, rows_spec, rows_spec, cols_spec, head_spec, head_spec],
        out_specs=out_specs,
        input_output_aliases={0: 0, 1: 1, 2: 2},
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="mlstm_step_pingpong",
    )(c, n2, m2, q, k, v, i, f)
    c_new, n2_new, m2_new = outs[:3]
    if splits == 1:
        return outs[3], c_new, n2_new, m2_new
    num, qn = outs[3].sum(axis=1), outs[4].sum(axis=1)
    h = rs.normalize_readout(num, qn, m2_new[wr, :, 0], eps).astype(q.dtype)
    return h, c_new, n2_new, m2_new


def pp_step(c, n2, m2, parity, q, k, v, i, f, eps=EPS, *, config: StepKernelConfig, interpret: bool = False):
    B, NH, DHQK, DHV = c.shape
    BH = B * NH
    h, c2, n2n, m2n = _pp_call(
        c.reshape(BH, DHQK, DHV), n2.reshape(2, BH, DHQK), m2.reshape(2, BH, 1), parity,
        q.reshape(BH, DHQK), k.reshape(BH, DHQK), v.reshape(BH, DHV), i.reshape(BH, 1), f.reshape(BH, 1),
        config=config, eps=float(eps), interpret=interpret,
    )  # fmt: skip
    return h.reshape(B, NH, DHV), (c2.reshape(c.shape), n2n.reshape(n2.shape), m2n.reshape(m2.shape))


# ---------------------------------------------------------------------------------------------------------
# Harness.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    name: str
    step: object  # std: (c, n, m, q, k, v, i, f, eps) -> h, (c, n, m); pp: (c, n2, m2, parity, ...) -> ...
    pp: bool = False


def make_inputs(B, NH, DHQK, DHV, T, seed=0):
    """Initial state and T steps of random inputs (stacked on a leading axis)."""
    ks = jax.random.split(jax.random.key(seed), 8)
    state = (
        jax.random.normal(ks[0], (B, NH, DHQK, DHV), F32),
        jax.random.normal(ks[1], (B, NH, DHQK), F32),
        jax.random.uniform(ks[2], (B, NH, 1), F32, -2.0, 2.0),
    )
    xs = (
        jax.random.normal(ks[3], (T, B, NH, DHQK), BF16),
        jax.random.normal(ks[4], (T, B, NH, DHQK), BF16),
        jax.random.normal(ks[5], (T, B, NH, DHV), BF16),
        2.0 * jax.random.normal(ks[6], (T, B, NH, 1), F32),  # input gate: sometimes above logsig(f) + m
        3.0 + jax.random.normal(ks[7], (T, B, NH, 1), F32),  # forget gate
    )
    return state, xs


def init_carry(var: Variant, state, h0):
    c, n, m = (jnp.copy(a) for a in state)
    if var.pp:  # unused half filled with NaN: any read of it would show
        n = jnp.stack([n, jnp.full_like(n, jnp.nan)])
        m = jnp.stack([m, jnp.full_like(m, jnp.nan)])
    return c, n, m, h0


def make_run(var: Variant, T: int, collect: bool):
    """jit(fori_loop) over T steps; carry (c, n, m, h) donated. collect: xs stacked over T, h for every step."""

    def one(t, carry, xs, parity):
        c, n, m, h = carry
        x = tuple(a[t] for a in xs) if collect else xs
        if var.pp:
            hn, (c, n, m) = var.step(c, n, m, parity, *x, eps=EPS)
        else:
            hn, (c, n, m) = var.step(c, n, m, *x, eps=EPS)
        return c, n, m, (h.at[t].set(hn) if collect else hn)

    if var.pp:
        assert T % 2 == 0

        def body(u, carry, xs):
            carry = one(2 * u, carry, xs, 0)
            return one(2 * u + 1, carry, xs, 1)

        iters = T // 2
    else:

        def body(t, carry, xs):
            return one(t, carry, xs, None)

        iters = T
    return jax.jit(lambda carry, xs: jax.lax.fori_loop(0, iters, functools.partial(body, xs=xs), carry),
                   donate_argnums=(0,))  # fmt: skip


def final_state(var: Variant, carry):
    c, n, m, h = carry
    if var.pp:  # after an even number of steps the current half is 0
        n, m = n[0], m[0]
    return h, c, n, m


@jax.jit
def rel_err(out, ref):
    out, ref = out.astype(F32), ref.astype(F32)
    return jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30)


def check(var: Variant, state, xs, ref, T):
    h0 = jnp.zeros((T, *xs[2].shape[1:]), xs[0].dtype)
    out = final_state(var, make_run(var, T, True)(init_carry(var, state, h0), xs))
    return {k: float(rel_err(o, r)) for k, o, r in zip("hcnm", out, ref, strict=True)}


def variants(DHQK, DHV, interpret: bool, gpu_sweep: bool = True) -> list[Variant]:
    C = StepKernelConfig
    out = [Variant("xla", recurrent_step_fw)]
    if interpret:
        out.append(
            Variant(
                "default",
                functools.partial(
                    recurrent_step_pallas, interpret=True, config=C(block_dhv=16, block_dhqk=8, dhqk_splits=2)
                ),
            )
        )
        heads = [HeadCfg(16, 8), HeadCfg(32, 16), HeadCfg(16, 16, prefetch=False)]
        pps = {"pp-s1-bv16-bk8": C(16, 8, 1), "pp-s2-bv16-bk8": C(16, 8, 2), "pp-s1-bv32-bk16": C(32, 16, 1)}
    else:
        out.append(Variant("default", recurrent_step_pallas))
        # Priority order: a time budget cuts the tail.
        heads = [HeadCfg(64, 64, 4), HeadCfg(32, 64, 4), HeadCfg(64, 64, 8), HeadCfg(128, 64, 8),
                 HeadCfg(32, 64, 8), HeadCfg(128, 32, 4), HeadCfg(64, 64, 4, num_stages=2)]  # fmt: skip
        pps = {
            "pp-default": C.get_default(DHQK, DHV),
            "pp-s1-bv64-bk64-w4": C(64, 64, 1, num_warps=4),
            "pp-s1-bv32-bk64-w4": C(32, 64, 1, num_warps=4),
            "pp-s1-bv64-bk64-w8": C(64, 64, 1, num_warps=8),
            "pp-s1-bv128-bk64-w8": C(128, 64, 1, num_warps=8),
            "pp-s1-bv32-bk64-w8": C(32, 64, 1, num_warps=8),
            "pp-s1-bv128-bk32-w4": C(128, 32, 1, num_warps=4),
        }
    hv = [Variant(h.name, functools.partial(head_step, cfg=h, interpret=interpret)) for h in heads]
    pv = [Variant(nm, functools.partial(pp_step, config=cf, interpret=interpret), pp=True) for nm, cf in pps.items()]
    # interleave head and pp variants so that a budget cut drops the tail of both
    mixed = [x for pair in zip(hv, pv, strict=False) for x in pair] + hv[len(pv) :] + pv[len(hv) :]
    return out + mixed


def fmt_err(e):
    if not e:
        return "-"
    bad = [k for k in "hcnm" if not (e[k] <= TOL[k])]
    return " ".join(f"{k}{e[k]:.1e}" for k in "hcnm") + ("  FAIL(" + ",".join(bad) + ")" if bad else "  ok")


# ---------------------------------------------------------------------------------------------------------
# CPU: interpret mode on tiny shapes, and the Triton lowering at the real shapes.
# ---------------------------------------------------------------------------------------------------------
def cpu_main() -> int:
    B, NH, DHQK, DHV, T = 2, 2, 16, 32, 8
    state, xs = make_inputs(B, NH, DHQK, DHV, T, seed=3)
    vs = variants(DHQK, DHV, interpret=True)
    ref_carry = make_run(vs[0], T, True)(init_carry(vs[0], state, jnp.zeros((T, B, NH, DHV), BF16)), xs)
    ref = final_state(vs[0], ref_carry)
    ok = True
    print(f"[interpret] B={B} NH={NH} DHQK={DHQK} DHV={DHV}, {T} steps in a jitted fori_loop, errors vs xla:")
    for var in vs[1:]:
        try:
            e = check(var, state, xs, ref, T)
            ok &= all(e[k] <= TOL[k] for k in "hcnm")
            print(f"  {var.name:24s} {fmt_err(e)}")
        except Exception as ex:  # noqa: BLE001
            ok = False
            print(f"  {var.name:24s} ERROR {type(ex).__name__}: {str(ex)[:300]}")
    # Lowering to Triton for CUDA at the real shapes (compiled mode forced for the repo's wrapper).
    rs.kernel_mode = lambda interpret: "compiled"
    NH, DHQK, DHV, T = 8, 256, 512, 50
    print(f"[lower cuda] NH={NH} DHQK={DHQK} DHV={DHV}, jit(fori_loop {T} steps).trace().lower(('cuda',)):")
    for B in (32, 128):
        sds = lambda s, d: jax.ShapeDtypeStruct(s, d)  # noqa: E731
        xs_s = (sds((B, NH, DHQK), BF16), sds((B, NH, DHQK), BF16), sds((B, NH, DHV), BF16),
                sds((B, NH, 1), F32), sds((B, NH, 1), F32))  # fmt: skip
        for var in variants(DHQK, DHV, interpret=False)[1:]:
            lead = (2,) if var.pp else ()
            carry = (sds((B, NH, DHQK, DHV), F32), sds((*lead, B, NH, DHQK), F32), sds((*lead, B, NH, 1), F32),
                     sds((B, NH, DHV), BF16))  # fmt: skip
            try:
                t0 = time.time()
                txt = make_run(var, T, False).trace(carry, xs_s).lower(lowering_platforms=("cuda",)).as_text()
                calls = [ln for ln in txt.splitlines() if "__gpu$xla.gpu.triton" in ln]
                pat = r"output_tuple_indices = \[(\d+)\], operand_index"
                aliases = sorted({a for ln in calls for a in re.findall(pat, ln)})
                barrier = any("gpu.barrier" in ln for ln in calls)
                want = ["0", "1", "2"] if var.name != "default" else ["0"]
                good = len(calls) >= 1 and aliases == want and (barrier or not var.name.startswith("head"))
                ok &= good
                print(
                    f"  B={B:3d} {var.name:24s} {'ok ' if good else 'BAD'} {len(calls)} triton call(s)/loop body, "
                    f"aliased outputs {','.join(aliases)}, gpu.barrier {'yes' if barrier else 'no'} "
                    f"({time.time() - t0:.1f} s)"
                )
            except Exception as ex:  # noqa: BLE001
                ok = False
                print(f"  B={B:3d} {var.name:24s} ERROR {type(ex).__name__}: {str(ex)[:300]}")
    print("CPU checks:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------------------
# GPU: correctness over T steps and per-step time over `steps` steps.
# ---------------------------------------------------------------------------------------------------------
def gpu_main(args) -> int:
    from benchmarks.step_trace import trace

    NH, DHQK, DHV = (2, 16, 32) if args.dry else (8, 256, 512)
    batches = [int(b) for b in args.batch.split(",")]
    vs = variants(DHQK, DHV, interpret=args.dry)
    if args.only:
        keys = args.only.split(",")
        vs = [v for v in vs if v.name in ("xla", "default") or any(k in v.name for k in keys)]
    t_start = time.time()
    data = {B: make_inputs(B, NH, DHQK, DHV, args.check_steps, seed=1) for B in batches}
    refs = {}
    for B in batches:
        state, xs = data[B]
        T = args.check_steps
        ref_carry = make_run(vs[0], T, True)(init_carry(vs[0], state, jnp.zeros((T, B, NH, DHV), BF16)), xs)
        refs[B] = final_state(vs[0], ref_carry)
    rows = []
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; NH={NH} DHQK={DHQK} DHV={DHV}; "
          f"check {args.check_steps} steps, time {args.steps} steps", flush=True)  # fmt: skip
    for var in vs:
        for B in batches:
            if time.time() - t_start > args.budget:
                rows.append((var.name, B, None, None, None, None, "skipped (time budget)"))
                continue
            floor = 2 * B * NH * (DHQK * DHV + DHQK + 1) * 4 / COPY_TBPS * 1e6
            state, xs = data[B]
            t0 = time.time()
            err, tr, note = None, {}, ""
            try:
                err = check(var, state, xs, refs[B], args.check_steps)
                x1 = tuple(a[0] for a in xs)
                run = make_run(var, args.steps, False)
                carry = jax.block_until_ready(run(init_carry(var, state, jnp.zeros(xs[2].shape[1:], BF16)), x1))
                tr = trace(lambda s, run=run, x1=x1: run(s, x1), carry, args.steps)
                del carry
            except Exception as ex:  # noqa: BLE001
                note = f"ERROR {type(ex).__name__}: {str(ex).splitlines()[0][:200] if str(ex) else ''}"
                if args.verbose:
                    traceback.print_exc()
            main_us, span_us = tr.get("main_us"), tr.get("span_us")
            other = tr.get("other_kernels")
            row = (var.name, B, main_us, span_us, floor, other, note or fmt_err(err))
            rows.append(row)
            print(f"  [{time.time() - t0:5.1f} s] " + fmt_row(row), flush=True)
    print(f"\nSummary (floor = c+n+m read+written once at {COPY_TBPS / 1e12:.2f} TB/s; "
          f"total {time.time() - t_start:.0f} s):")  # fmt: skip
    print(f"{'variant':26s} {'B':>4s} {'main_us':>8s} {'span_us':>8s} {'main/fl':>7s} {'span/fl':>7s} "
          f"{'oth/st':>6s}  max rel err (h c n m)")  # fmt: skip
    for B in batches:
        for row in rows:
            if row[1] == B:
                print(fmt_row(row))
    return 0


def fmt_row(row):
    name, B, main_us, span_us, floor, other, note = row
    if main_us is None:
        return f"{name:26s} {B:4d} {'-':>8s} {'-':>8s} {'-':>7s} {'-':>7s} {'-':>6s}  {note}"
    return (f"{name:26s} {B:4d} {main_us:8.1f} {span_us:8.1f} {main_us / floor:7.3f} {span_us / floor:7.3f} "
            f"{other:6.1f}  {note}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="interpret mode on tiny shapes + lowering check only")
    p.add_argument("--batch", default="32,128")
    p.add_argument("--steps", type=int, default=50, help="steps per timed loop (even)")
    p.add_argument("--check-steps", type=int, default=8, help="steps of the correctness loop (even)")
    p.add_argument("--only", default="", help="comma-separated substrings of variant names (xla, default kept)")
    p.add_argument("--budget", type=float, default=210.0, help="seconds; later variants are skipped after it")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--dry", action="store_true", help="the GPU harness on a CPU: tiny shapes, interpret mode")
    args = p.parse_args()
    if args.cpu:
        return cpu_main()
    if args.dry:
        args.batch = "2"
    elif jax.default_backend() != "gpu":
        print("no GPU: run with --cpu for the interpret-mode and lowering checks")
        return 1
    return gpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
