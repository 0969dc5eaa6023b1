"""Tests of the ``xlstm-jax`` command line (``xlstm_jax.cli``), one file per subcommand."""
