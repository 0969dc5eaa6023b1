"""Records how ``transformers`` initialises an xLSTM model: per-tensor statistics for ``tests/training/test_init.py``.

Optional tooling, not a runtime or CI dependency. Run it in an environment with torch and transformers (as for
``scripts/make_peer_fixture.py``), from the repository root::

    /tmp/peer/bin/python scripts/make_init_stats.py

It builds ``xLSTMForCausalLM`` from the config below (freshly initialised by ``transformers``, nothing loaded)
and writes ``tests/training/init_stats.json``: the config and, per Hugging Face tensor name, its shape, number
of elements, mean and standard deviation, and its exact values where the tensor is constant or has at most
``MAX_VALUES`` elements (the gate biases).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import xLSTMConfig, xLSTMForCausalLM

OUT = Path(__file__).resolve().parents[1] / "tests" / "training" / "init_stats.json"
SEED = 0
MAX_VALUES = 16
# Four blocks and four heads, so that the depth-scaled (wang) init differs from the small init and the forget
# gate biases take four distinct values; widths large enough for the stds to be estimated to ~1%.
CONFIG = {
    "vocab_size": 256,
    "hidden_size": 128,
    "embedding_dim": 128,
    "num_hidden_layers": 4,
    "num_blocks": 4,
    "num_heads": 4,
}


def main() -> None:
    torch.manual_seed(SEED)
    model = xLSTMForCausalLM(xLSTMConfig(**CONFIG))
    tensors = {}
    for name, param in model.named_parameters():
        x = param.detach().to(torch.float64).flatten()
        entry = {
            "shape": list(param.shape),
            "numel": x.numel(),
            "mean": float(x.mean()),
            "std": float(x.std(unbiased=False)),
        }
        if x.numel() <= MAX_VALUES or bool(torch.all(x == x[0])):
            entry["values"] = x.tolist() if x.numel() <= MAX_VALUES else float(x[0])
        tensors[name] = entry
    OUT.write_text(json.dumps({"config": CONFIG, "seed": SEED, "tensors": tensors}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
