"""``python -m xlstm_jax``: the ``xlstm-jax`` command (see :mod:`xlstm_jax.cli`); without a subcommand, the main
job ``demo`` (:mod:`xlstm_jax.cli.demo`), which ``make run`` runs."""

from __future__ import annotations

import sys

from xlstm_jax.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
