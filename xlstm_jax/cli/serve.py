"""Serve an xLSTM language model over an OpenAI-compatible HTTP API.

``xlstm-jax serve MODEL_DIR [--host H] [--port P] [--num-slots N] ...``: MODEL_DIR is a Hugging Face xLSTM
directory (``config.json``, safetensors weights and, unless ``--tokenizer`` names another, ``tokenizer.json``).
The server answers ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health`` and ``/metrics``
(see :mod:`xlstm_jax.serving.api`) until Ctrl-C (a graceful shutdown, then exit status 130). Requests share
the engine's ``--num-slots`` decode slots (see :mod:`xlstm_jax.serving.engine`); the engine's programs are
compiled before the address is announced. With ``--mesh DATA,FSDP,TENSOR`` the model is served sharded over the
devices: each device reads its shards of the weights, the slots are split over ``data`` (and ``fsdp`` where it
divides them too) and the heads over ``tensor`` (``data`` must divide ``--num-slots``, ``tensor`` the heads).

Every argument is checked, the tokenizer and the chat template read and the address bound before the weights
are loaded: a bad one is reported as ``error: ...`` with exit status 2.

Examples:
    $ xlstm-jax serve path/to/xLSTM-7b --port 8000 --num-slots 16 --prefix-cache-mb 2048
    $ xlstm-jax serve path/to/xLSTM-7b --num-slots 32 --mesh 4,1,2
    $ curl localhost:8000/v1/completions -d '{"model": "xLSTM-7b", "prompt": "The mLSTM", "max_tokens": 16}'
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from xlstm_jax.cli import CommandError, mesh_shape, non_negative_float, number_type, positive_int

__all__ = ["HELP", "add_arguments", "run"]

HELP = "serve an xLSTM language model over an OpenAI-compatible HTTP API"

BYTES = "bytes"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


_port = number_type(int, lambda v: 0 <= v <= 65535, "an integer in [0, 65535]")  # 0: any free port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model directory, the address, the engine's capacity and the API's names."""
    p = parser
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="Hugging Face xLSTM directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0 for any free one (default 8000)")
    p.add_argument("--model-name", default=None, help="the name requests give as 'model' (default: MODEL_DIR's name)")
    p.add_argument(
        "--tokenizer",
        metavar="bytes|FILE",
        default=None,
        help="'bytes' (UTF-8 bytes, BOS 256, EOS 257) or a tokenizer.json (default MODEL_DIR/tokenizer.json)",
    )
    p.add_argument("--add-bos", action="store_true", help="start each text prompt with the config's bos_token_id")
    p.add_argument(
        "--chat-template",
        default=None,
        help="format string with {role} and {content}, rendered per chat message (default '<|{role}|>\\n{content}\\n')",
    )
    p.add_argument("--num-slots", type=positive_int, default=8, help="requests decoded together (default 8)")
    p.add_argument(
        "--max-prompt-tokens", type=positive_int, default=4096, help="longest prompt accepted, in tokens (default 4096)"
    )
    p.add_argument(
        "--prefill-chunk-tokens", type=positive_int, default=256, help="prompt tokens run per engine step (default 256)"
    )
    p.add_argument(
        "--max-prefill-rows",
        type=positive_int,
        default=4,
        help="waiting requests prefilled together per engine step (default 4)",
    )
    p.add_argument(
        "--max-queue", type=positive_int, default=64, help="requests waiting for a slot before 429s (default 64)"
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=non_negative_float,
        default=0.0,
        help="memory for the states of seen prompt prefixes, in MiB (default 0: no prefix cache)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "float64"),
        default=None,
        help="activation and parameter dtype (default: the checkpoint's; float64 needs JAX_ENABLE_X64=1)",
    )
    p.add_argument(
        "--mesh",
        type=mesh_shape,
        metavar="DATA,FSDP,TENSOR",
        default=None,
        help="serve the model sharded over a device mesh, e.g. 4,1,2 (-1: the remaining devices; default: one device)",
    )
    p.add_argument(
        "--stable-scratch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run every prefill chunk shape as command buffers recorded once (jaxlib 0.11+, jax's VMM allocator, "
        "which the command selects where XLA_PYTHON_CLIENT_ALLOCATOR is unset); default: on a GPU where both hold",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="the server's log level (default info)")


def _read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise CommandError(f"MODEL_DIR {model_dir} is not a directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CommandError(f"{path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise CommandError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _token_id(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise CommandError(f"config.json: {key} must be a token id (an int >= 0) or null, got {value!r}")


def _tokenizer(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """The tokenizer (checked against the config's vocabulary), read before the weights."""
    from xlstm_jax.training.data import ByteTokenizer, load_tokenizer

    bos_id, eos_id = _token_id(config, "bos_token_id"), _token_id(config, "eos_token_id")
    if args.tokenizer == BYTES:
        tokenizer = ByteTokenizer()
    else:
        path = args.model_dir / "tokenizer.json" if args.tokenizer is None else Path(args.tokenizer)
        if not path.is_file():
            raise CommandError(f"{path} does not exist (--tokenizer names another file, or 'bytes')")
        try:
            tokenizer = load_tokenizer(path, bos_id=bos_id, eos_id=eos_id)
        except (TypeError, ValueError) as e:
            raise CommandError(str(e)) from None
    if args.add_bos and tokenizer.bos_id is None:
        raise CommandError("--add-bos needs a bos_token_id in config.json")
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, int) and tokenizer.vocab_size > vocab_size:
        raise CommandError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size={vocab_size}"
        )
    return tokenizer


def _note_jinja_template(model_dir: Path) -> None:
    """Says so when the directory's ``tokenizer_config.json`` has a (Jinja) chat template, which is not used."""
    try:
        tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # no such file (or not one that we read)
        return
    if isinstance(tokenizer_config, dict) and tokenizer_config.get("chat_template"):
        sys.stderr.write(
            "note: tokenizer_config.json has a Jinja chat_template, which is not rendered (no jinja2); chats use "
            "--chat-template or the default '<|{role}|>\\n{content}\\n'\n"
        )


def _mesh(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """The device mesh of ``--mesh`` (None without it), checked against the devices, ``--num-slots`` and the
    config's heads before the weights are read."""
    if args.mesh is None:
        return None
    from xlstm_jax.models.xlstm_parallel.sharding import MeshConfig, make_mesh
    from xlstm_jax.serving.engine import check_mesh

    try:
        mesh = make_mesh(MeshConfig(**args.mesh))
        num_heads = config.get("num_heads")
        if isinstance(num_heads, int) and not isinstance(num_heads, bool) and num_heads > 0:
            check_mesh(mesh, args.num_slots, num_heads)
    except ValueError as e:
        raise CommandError(f"--mesh {','.join(map(str, args.mesh.values()))}: {e}") from None
    return mesh


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (so that a taken port is reported before the weights load); uvicorn
    accepts its connections once it runs."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CommandError(f"--host {host!r} is not an address to listen on: {e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)  # connections queue from now on, so a client may connect as soon as "serving" is printed
    except OSError as e:
        sock.close()
        raise CommandError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _select_vmm_allocator(environ: MutableMapping[str, str]) -> bool:
    """Selects jax's VMM allocator in ``environ`` (``XLA_PYTHON_CLIENT_ALLOCATOR=vmm``), which stable scratch needs,
    where the variable is unset and the installed jaxlib (0.11 and later) has a stable scratch mode; returns
    whether it did. Read when jax starts its GPU client, so it acts only before the command's first computation;
    elsewhere (CPU) the variable is not read."""
    import jaxlib

    if "XLA_PYTHON_CLIENT_ALLOCATOR" in environ:
        return False
    major, minor = (int(part) for part in jaxlib.__version__.split(".")[:2])
    if (major, minor) < (0, 11):
        return False
    environ["XLA_PYTHON_CLIENT_ALLOCATOR"] = "vmm"
    return True


def run(args: argparse.Namespace) -> int:
    """Checks the arguments, reads the tokenizer, binds the address, loads the model, then serves.

    Returns 0 once the server stops; Ctrl-C stops it gracefully and then ends the command as interrupted (130).
    """
    if args.stable_scratch is not False:  # before jax starts its GPU client, which reads the allocator
        _select_vmm_allocator(os.environ)
    import uvicorn

    from xlstm_jax.models.xlstm_parallel.hf import load_hf
    from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
    from xlstm_jax.serving.api import create_app, render_chat
    from xlstm_jax.serving.engine import SWITCH_INTERVAL_S, Engine, require_stable_scratch

    if args.chat_template is not None:
        try:
            render_chat([], args.chat_template)
        except (TypeError, ValueError) as e:
            raise CommandError(f"--chat-template: {e}") from None
    if args.dtype == "float64":
        import jax

        if not jax.config.jax_enable_x64:
            raise CommandError("--dtype float64 needs 64-bit JAX: set JAX_ENABLE_X64=1")
    if args.stable_scratch:
        try:
            require_stable_scratch("--stable-scratch")
        except ValueError as e:
            raise CommandError(str(e)) from None
    config_json = _read_config(args.model_dir)
    tokenizer = _tokenizer(args, config_json)
    model_name = args.model_name or args.model_dir.resolve().name
    if args.chat_template is None:
        _note_jinja_template(args.model_dir)
    mesh = _mesh(args, config_json)
    sock = _listen(args.host, args.port)
    try:
        overrides = {} if args.dtype is None else {"dtype": args.dtype, "param_dtype": args.dtype}
        runtime = RuntimeConfig()
        try:
            config, params = load_hf(args.model_dir, scan_blocks=runtime.scan_blocks, mesh=mesh, **overrides)
            engine = Engine(
                config,
                params,
                num_slots=args.num_slots,
                runtime=runtime,
                max_prompt_tokens=args.max_prompt_tokens,
                prefill_chunk_tokens=args.prefill_chunk_tokens,
                max_prefill_rows=args.max_prefill_rows,
                max_queue=args.max_queue,
                prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
                stable_scratch=args.stable_scratch,
                mesh=mesh,
            )
        except (OSError, TypeError, ValueError) as e:  # a missing or corrupted file, a setting the engine rejects
            raise CommandError(str(e)) from None
        app = create_app(
            engine, tokenizer, model_name=model_name, chat_template=args.chat_template, add_bos=args.add_bos
        )
        try:
            engine.warmup()  # compiles here, not in the first request
        except (TypeError, ValueError, RuntimeError) as e:
            raise CommandError(f"the model cannot run with these settings: {e}") from None
        host, port = sock.getsockname()[:2]
        layout = "" if mesh is None else ", mesh " + " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
        layout += ", stable scratch" if engine.stable_scratch else ""
        sys.stderr.write(f"serving {model_name!r} on http://{host}:{port} ({args.num_slots} slots{layout})\n")
        sys.stderr.flush()
        server = _server_class()(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # the engine's thread and uvicorn's hand tokens over quickly
        with engine:
            server.run(sockets=[sock])
            if server.interrupted:  # uvicorn's own re-raise of the signal can end as a cancelled task instead
                raise KeyboardInterrupt
    finally:
        sock.close()
    return 0


def _server_class() -> type:
    """uvicorn's ``Server`` that remembers a Ctrl-C (imported here: uvicorn loads only for ``serve``).

    uvicorn shuts down gracefully on SIGINT and then raises the signal again from inside its event loop, where
    asyncio's runner handles it; that does not always reach the caller as ``KeyboardInterrupt`` (the command
    could exit 0). ``interrupted`` keeps the fact for the exit status.
    """
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        interrupted = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGINT:
                self.interrupted = True
            super().handle_exit(sig, frame)

    return Server
