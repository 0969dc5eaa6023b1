"""The README's usage example runs as written, and its claim holds."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from tests.numerics import TOL

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102
    h_last, h = scope["h_last"], scope["h"]
    assert h_last.shape == h[:, :, -1].shape and h_last.dtype == jnp.bfloat16
    # Both are float32 computations rounded to bf16 (see TOL["bfloat16/float32"]).
    err = np.max(np.abs(np.asarray(h_last, np.float32) - np.asarray(h[:, :, -1], np.float32)))
    assert err <= TOL["bfloat16/float32"].max_err * np.max(np.abs(np.asarray(h, np.float32)))
