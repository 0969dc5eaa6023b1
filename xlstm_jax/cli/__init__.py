"""The ``xlstm-jax`` command line: one module per subcommand, registered in ``SUBCOMMANDS``.

``xlstm-jax`` (or ``python -m xlstm_jax``) without a subcommand runs ``demo`` with its defaults (train a
small byte-level model on the Python standard library, reload it, sample from it, check the backends);
``xlstm-jax --help`` lists the subcommands and ``xlstm-jax COMMAND --help`` describes one.

A subcommand is a module with ``HELP`` (its line in the listing), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status). Every argument is checked before any work starts (a model is
loaded, a form compiled): an argument's ``type`` raises ``argparse.ArgumentTypeError``, and ``run``
raises :class:`CommandError` for what depends on several arguments or on input files. Either way the
command prints ``xlstm-jax COMMAND: error: ...`` on stderr and exits with status 2, as argparse does for
its own usage errors; never a traceback.

Example:
    $ xlstm-jax demo --steps 100
    $ xlstm-jax train --preset byte-small --data-kind stdlib --checkpoint-dir runs/ckpt
    $ xlstm-jax verify --S 128
    $ xlstm-jax generate path/to/xLSTM-7b --prompt "The mLSTM cell" --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "DEFAULT_SUBCOMMAND",
    "PROG",
    "SUBCOMMANDS",
    "CommandError",
    "build_parser",
    "main",
    "mesh_shape",
    "parse_args",
]

PROG = "xlstm-jax"
# Subcommand name -> module. A new subcommand is one module and one line here.
SUBCOMMANDS = {
    "demo": "xlstm_jax.cli.demo",
    "train": "xlstm_jax.cli.train",
    "generate": "xlstm_jax.cli.generate",
    "verify": "xlstm_jax.cli.verify",
    "serve": "xlstm_jax.cli.serve",
}
DEFAULT_SUBCOMMAND = "demo"


class CommandError(Exception):
    """A bad argument or input file, found before the work starts: reported as ``error: ...``, exit status 2."""


def number_type(kind: type, accept: Callable[[Any], bool], description: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``text`` read as ``kind`` (int or float), kept if ``accept(value)``, else the error
    ``must be {description}, got {text}``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text}")
        return value

    return parse


positive_int = number_type(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = number_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number_type(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
non_negative_float = number_type(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")


def mesh_shape(text: str) -> dict[str, int]:
    """An argparse ``type``: ``data,fsdp,tensor``, three positive integers, one of which may be -1 (the remaining
    devices); returns ``{"data": ..., "fsdp": ..., "tensor": ...}`` (the fields of ``MeshConfig``)."""
    parts = text.split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(parts) != 3 or len(sizes) != 3 or any(s < 1 and s != -1 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"must be data,fsdp,tensor: three positive integers (one may be -1: the remaining devices), got {text!r}"
        )
    return dict(zip(("data", "fsdp", "tensor"), sizes, strict=True))


def prng_seed(text: str) -> int:
    """An argparse ``type``: a seed that ``jax.random.key`` maps to its own key.

    Without ``jax_enable_x64`` the key keeps the low 32 bits of the seed (2**32 gives the key of 0), so
    the seeds are 0 <= seed < 2**32; with it, 0 <= seed < 2**63.
    """
    import jax

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    bits = 63 if jax.config.jax_enable_x64 else 32
    if not 0 <= value < 2**bits:
        raise argparse.ArgumentTypeError(
            f"must be in [0, 2**{bits}) (the seeds jax.random.key tells apart"
            f"{'' if bits == 63 else ' without jax_enable_x64'}), got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``xlstm-jax``, with one subparser per registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=f"xLSTM in JAX. Without a COMMAND, runs '{DEFAULT_SUBCOMMAND}' on its default workload.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line; no arguments at all mean the default subcommand on its defaults.

    Raises:
        SystemExit: ``--help`` (status 0) or a usage error (status 2), printed by argparse.
    """
    argv = list(argv) or [DEFAULT_SUBCOMMAND]
    parser = build_parser()
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        parser.error(f"options follow a COMMAND, e.g. '{PROG} {DEFAULT_SUBCOMMAND} {' '.join(argv)}'")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``xlstm-jax`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    0: success; 1: the command ran and failed (``verify``: forms disagree; ``demo``: a check failed); 2: a
    bad argument or input file (``error: ...`` on stderr); 130: interrupted.
    """
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.run(args)
    except CommandError as e:
        sys.stderr.write(f"{PROG} {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
