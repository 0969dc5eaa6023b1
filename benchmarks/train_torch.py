"""The PyTorch anchor of ``benchmarks/train.py``: NX-AI's xLSTM trained with mlstm_kernels' TFLA kernel.

The same model as ``benchmarks/train.py`` (its ``--D``, ``--blocks``, ``--heads``, ``--vocab``, ``--S``;
checked: the parameter count must equal ``xLSTMLMConfig.num_params()``) built with NX-AI's ``xlstm``
package, ``xlstm.xlstm_large`` (``xLSTMLarge``), float32 parameters under bf16 autocast, trained with fused
AdamW on the next-token cross-entropy of random tokens: eager (``--eager-batch``, 4 by default) and under
``torch.compile`` (``--compiled-batch``, 8), each mode's loss function (model and loss) compiled whole. The
mLSTM cell is ``mlstm_kernels``' TFLA kernel ``chunkwise--triton_xl_chunk`` (chunk ``--torch-chunk-size``)
on a GPU and the package's native PyTorch kernels on a CPU. The model returns its last states
(``return_last_states=True``): the package's training path without them unpacks a state that is not
returned and fails.

Also torch's bf16 matrix rate: ``torch.mm`` of random n x n bf16 matrices for each n of ``--matmul-sizes``,
the best rate being the MFU ceiling of this anchor and of ``benchmarks/train.py`` (``matmul_flops_per_s``).

Timing (``benchmarks/harness.py``'s ``time_jitted`` on a callable): ``--warmup`` untimed samples (the first
compiles: its time is ``warmup_s``), then the median of ``--repeats`` samples, per step. A sample is
``--queue`` steps launched back to back and ended by one ``torch.cuda.synchronize()`` (one row per value: 1
synchronises after every step). A mode that runs out of memory is kept as ``OOM``.

``benchmarks/train.py`` runs this script in its own process (so that its GPU memory is released before JAX
starts) and merges the JSON into its own. Alone, on a GPU machine with the wheels of ``xlstm`` and
``mlstm_kernels``::

    PYTHONPATH=/tmp/site:. python3 benchmarks/train_torch.py --json train_torch.json

On a CPU (a check of the API at a tiny size, native kernels): ``PYTHONPATH=. python3
benchmarks/train_torch.py --tiny``. The TFLA kernels need ``DISABLE_LLVM_OPT=1`` under Triton 3.6: set here,
unless set, before triton is imported. Without torch, xlstm or mlstm_kernels the script says which is
missing and exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

os.environ.setdefault("DISABLE_LLVM_OPT", "1")  # the TFLA kernels under Triton 3.6; set before triton is imported
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX (the harness's environment) beside torch

from benchmarks.harness import Column, GpuMonitor, Report, time_jitted
from benchmarks.train import add_model_arguments, model_config, resolve_model_arguments
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.training.flops import flops_per_token

TRITON_KERNELS = {"chunkwise_kernel": "chunkwise--triton_xl_chunk", "sequence_kernel": "native_sequence__triton",
                  "step_kernel": "triton"}  # fmt: skip
NATIVE_KERNELS = {"chunkwise_kernel": "chunkwise--native_autograd", "sequence_kernel": "native_sequence__native",
                  "step_kernel": "native"}  # fmt: skip
COLUMNS = [Column("mode", "mode", width=9), Column("B", "B", width=4), Column("queue", "queue", width=5),
           Column("status", "status", width=8),
           Column("step ms", "median_s", ".1f", 1e3), Column("spread", "spread", ".2f"),
           Column("ktok/s", "tokens_per_s", ".2f", 1e-3), Column("mfu", "mfu", ".3f"),
           Column("warmup s", "warmup_s", ".1f"), Column("loss", "loss", ".3f")]  # fmt: skip
MATMUL_COLUMNS = [Column("n", "n", width=6), Column("us", "median_s", ".1f", 1e6),
                  Column("TFLOP/s", "flops_per_s", ".1f", 1e-12)]  # fmt: skip


def missing(what: str, error: BaseException) -> NoReturn:
    """Exits with status 2 naming what is missing (no traceback)."""
    hint = "install the wheels: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl"
    print(f"train_torch.py: needs {what} ({error}); {hint}; PYTHONPATH=/tmp/site:.", file=sys.stderr)
    raise SystemExit(2)


def xlstm_large_config(config: xLSTMLMConfig, chunk_size: int, weight_mode: str, kernels: dict[str, str]) -> Any:
    """The ``xLSTMLargeConfig`` of the model ``config`` describes (training mode, last states returned)."""
    from xlstm.xlstm_large.model import xLSTMLargeConfig

    if config.tie_word_embeddings:
        raise ValueError("xlstm_large has no tied embeddings: use tie_word_embeddings=False")
    return xLSTMLargeConfig(
        embedding_dim=config.embedding_dim,
        num_heads=config.num_heads,
        num_blocks=config.num_blocks,
        vocab_size=config.vocab_size,
        use_bias=False,
        norm_eps=config.norm_eps,
        norm_reduction_force_float32=config.norm_reduction_force_float32,
        add_out_norm=True,
        qk_dim_factor=config.qk_dim_factor,
        v_dim_factor=config.v_dim_factor,
        mode="train",
        chunk_size=chunk_size,
        return_last_states=True,
        autocast_kernel_dtype="bfloat16",
        eps=config.eps,
        ffn_proj_factor=config.ffn_proj_factor,
        ffn_round_up_to_multiple_of=config.ffn_round_up_to_multiple_of,
        gate_soft_cap=config.gate_soft_cap,
        output_logit_soft_cap=config.output_logit_soft_cap,
        weight_mode=weight_mode,
        **kernels,
    )


def build_model(config: xLSTMLMConfig, a: argparse.Namespace, device: str) -> Any:
    """``xLSTMLarge`` with float32 parameters on ``device``; raises unless it has the parameters of ``config``."""
    import torch
    from xlstm.xlstm_large.model import xLSTMLarge

    kernels = TRITON_KERNELS if device == "cuda" else NATIVE_KERNELS
    torch.manual_seed(0)
    model = xLSTMLarge(xlstm_large_config(config, a.torch_chunk_size, a.weight_mode, kernels)).to(device)
    count = sum(p.numel() for p in model.parameters())
    if count != config.num_params() or any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError(f"xLSTMLarge has {count} parameters, the model {config.num_params()} (or not all float32)")
    return model


def make_step(model: Any, B: int, S: int, compiled: bool, device: str) -> tuple[Callable[[int], None], list]:
    """``steps(n)``: n training steps on a fixed random batch (B, S) (autocast forward, cross-entropy, backward,
    fused AdamW), launched back to back and synchronised once at the end; and a list that holds the last step's
    loss (a tensor)."""
    import torch
    import torch.nn.functional as F

    V = model.config.vocab_size
    g = torch.Generator(device).manual_seed(B)
    tokens = torch.randint(0, V, (B, S + 1), device=device, generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits, _ = model(x)  # (B, S, V), and the last states (return_last_states=True)
        return F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))

    loss = torch.compile(loss_fn) if compiled else loss_fn
    last = [None]

    def steps(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            value = loss(x, y)
            value.backward()
            optimizer.step()
            last[0] = value.detach()
        if device == "cuda":
            torch.cuda.synchronize()

    return steps, last


def matmul_rates(report: Report, sizes: Sequence[int], device: str, repeats: int) -> float:
    """Times ``torch.mm`` of random bf16 n x n matrices (10 products per sample); the best rate, FLOP/s."""
    import torch

    best = 0.0
    for n in sizes:
        g = torch.Generator(device).manual_seed(n)
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
        c = torch.empty_like(a)

        def products(a=a, b=b, c=c) -> None:
            for _ in range(10):
                torch.mm(a, b, out=c)
            if device == "cuda":
                torch.cuda.synchronize()

        timing = time_jitted(products, repeats=repeats, warmup=3, iterations=10)
        rate = 2 * n**3 / timing.median_s
        best = max(best, rate)
        report.add("matmul", {"n": n, **timing.as_row(), "flops_per_s": rate})
        del a, b, c
    return best


def release(device: str) -> None:
    """Frees what the last mode held (and torch.compile's caches)."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the anchor; returns the report's data (what ``--json`` writes). Exits with 2 without its packages."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    p.add_argument("--eager-batch", type=int, default=None, help="default 4 (2 with --tiny)")
    p.add_argument("--compiled-batch", type=int, default=None, help="default 8 (2 with --tiny)")
    p.add_argument("--torch-chunk-size", type=int, default=None, help="the TFLA kernel's chunk (128; 16: --tiny)")
    p.add_argument("--weight-mode", choices=("single", "fused"), default="single", help="xlstm_large's projections")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=None, help="default 4096 8192 16384 (256: --tiny)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (at least 1: the first compiles)")
    p.add_argument("--repeats", type=int, default=5, help="timed samples")
    p.add_argument("--queue", type=int, nargs="+", default=[1], help="steps per sample, synchronised once (a row each)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    a = p.parse_args(argv)
    resolve_model_arguments(a)
    a.eager_batch = a.eager_batch or (2 if a.tiny else 4)
    a.compiled_batch = a.compiled_batch or (2 if a.tiny else 8)
    a.torch_chunk_size = a.torch_chunk_size or (16 if a.tiny else 128)
    a.matmul_sizes = a.matmul_sizes or ([256] if a.tiny else [4096, 8192, 16384])
    if min(a.warmup, a.repeats, *a.queue) < 1:
        p.error("--warmup, --repeats and --queue must be >= 1")
    try:
        import torch
        import xlstm
    except ImportError as error:
        missing("torch and NX-AI's xlstm", error)
    try:
        import mlstm_kernels
    except ImportError as error:
        missing("mlstm_kernels", error)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.tiny:
        print("train_torch.py: no CUDA GPU; on a CPU run --tiny (native kernels)", file=sys.stderr)
        raise SystemExit(2)

    config = model_config(a)
    fpt = flops_per_token(config, a.S, chunk_size=a.chunk_size)
    report = Report("train_torch", "benchmarks/train_torch.py", vars(a), a.json, argv)
    versions = {"torch": torch.__version__, "xlstm": xlstm.__version__, "mlstm_kernels": mlstm_kernels.__version__}
    if device == "cuda":
        import triton

        versions.update(triton=triton.__version__, cuda_device=torch.cuda.get_device_name())
    kernels = TRITON_KERNELS if device == "cuda" else NATIVE_KERNELS
    report.set("anchor", {**versions, **kernels, "device": device, "DISABLE_LLVM_OPT": os.environ["DISABLE_LLVM_OPT"]})
    report.set("flops_per_token", fpt)

    report.table("matmul", MATMUL_COLUMNS)
    rate = matmul_rates(report, a.matmul_sizes, device, a.repeats)
    report.set("matmul_flops_per_s", rate)
    report.table("train", COLUMNS)
    for mode in a.modes:
        B = a.compiled_batch if mode == "compiled" else a.eager_batch
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = steps = last_loss = None
        for queue in a.queue:
            row: dict[str, Any] = {"mode": mode, "B": B, "queue": queue, "S": a.S, "flops_per_token": fpt}
            try:
                if steps is None:
                    model = build_model(config, a, device)
                    steps, last_loss = make_step(model, B, a.S, mode == "compiled", device)
                monitor = GpuMonitor()  # the GPU's clock and power during the timed steps
                sample = functools.partial(steps, queue)
                timing = time_jitted(sample, repeats=a.repeats, warmup=a.warmup, iterations=queue, monitor=monitor)
            except torch.cuda.OutOfMemoryError as error:
                report.add("train", {**row, "status": "OOM", "error": str(error)[:2000]})
                report.note(f"{mode} B={B} queue={queue}: out of memory")
                break
            except Exception as error:  # every failure becomes a row, and the run goes on to the next mode
                report.add("train", {**row, "status": "error", "error": f"{type(error).__name__}: {str(error)[:2000]}"})
                report.note(f"{mode} B={B} queue={queue}: {type(error).__name__}: {str(error)[:300]}")
                break
            tokens_per_s = B * a.S / timing.median_s
            row.update(status="ok", **timing.as_row(), tokens_per_s=tokens_per_s, mfu=tokens_per_s * fpt / rate)
            row.update(monitor.stats)
            row["loss"] = float(last_loss[0])  # of the last step: finite, and near log(V) on random tokens
            if device == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30  # of this mode so far (reset before it)
            report.add("train", row)
        model = steps = last_loss = None
        release(device)
    return report.data


if __name__ == "__main__":
    main()
