"""xlstm-jax: the xLSTM matrix-memory cell (mLSTM) in JAX."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xlstm-jax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
