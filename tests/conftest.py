"""Test setup: makes ``tests/`` importable as a package root for the shared helpers, and sizes XLA's CPU pool.

Mosaic GPU interpret mode runs each warpgroup thread of a kernel on XLA's CPU thread pool, which XLA sizes from the
``NPROC`` environment variable (else the CPUs): two warpgroups need three pool threads
(:func:`xlstm_jax.kernels.mosaic.require_mosaic_interpreter`), more than a 2-CPU machine gives. It is set here
(to the CPU count, at least 4), before any test module starts JAX; the tests' subprocesses inherit it.
"""

import os

# Read without importing the package, which imports JAX (the pool is sized when JAX starts its CPU backend).
_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
os.environ.setdefault("NPROC", str(max(4, _cpus)))
