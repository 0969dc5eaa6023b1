"""Builds the alias fixture: a tiny ``transformers`` xLSTM configured as a user writes it, and its logits.

Optional tooling, not a runtime or CI dependency; run it in the environment described in
``make_peer_fixture.py``, from the repository root::

    /tmp/peer/bin/python scripts/make_alias_fixture.py

The config is written the way a user calls ``xLSTMConfig``: ``num_blocks=3`` (so ``config.json`` also
carries transformers' default ``num_hidden_layers: 32``, which its model does not use for the blocks),
``hidden_size`` without ``embedding_dim``, ``tie_word_embeddings=True`` (transformers' xLSTM keeps its own
``lm_head`` anyway, and the script draws it apart from the embedding), a query/key factor whose width is not
a multiple of 64 (transformers' ``config.qk_dim`` rounds it up; its layer does not), and an FFN width
``32 * 1.51 = 48.32`` that transformers rounds *down* to 48 at multiples of 16.

It writes ``tests/fixtures/xlstm_aliases/``:

- ``config.json`` and ``model.safetensors`` as ``save_pretrained`` writes them (float32, about 150 kB);
- ``peer.npz``: ``input_ids`` (B, S) and the model's ``logits`` (B, S, V) for them;
- ``transformers_defaults.json``: ``xLSTMConfig().to_dict()``, the defaults transformers fills in for keys
  that a ``config.json`` leaves out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from make_peer_fixture import randomize
from transformers import xLSTMConfig, xLSTMForCausalLM

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "xlstm_aliases"
SEED = 1


def build_config() -> xLSTMConfig:
    return xLSTMConfig(
        vocab_size=61,
        hidden_size=32,
        num_blocks=3,
        num_heads=2,
        qk_dim_factor=0.75,
        v_dim_factor=1.0,
        ffn_proj_factor=1.51,
        ffn_round_up_to_multiple_of=16,
        tie_word_embeddings=True,
        chunk_size=16,
        autocast_kernel_dtype="float32",
    )


def main() -> int:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    config = build_config()
    model = xLSTMForCausalLM(config).eval()
    randomize(model, gen)
    blocks = len(model.backbone.blocks)
    up = model.backbone.blocks[0].ffn.proj_up.weight.shape[0]
    if (blocks, up, config.num_hidden_layers) != (3, 48, 32):
        print(f"unexpected transformers sizes: {blocks} blocks, FFN width {up}", file=sys.stderr)
        return 1
    if torch.equal(model.lm_head.weight, model.backbone.embeddings.weight):
        print("lm_head and the embedding are the same tensor", file=sys.stderr)
        return 1

    rng = np.random.default_rng(SEED)
    B, S = 2, 37  # S = 2 whole chunks of 16 + 5 recurrent steps
    input_ids = rng.integers(0, config.vocab_size, (B, S))
    with torch.no_grad():
        logits = model(torch.as_tensor(input_ids), use_cache=False).logits.numpy()

    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    (OUT / "generation_config.json").unlink(missing_ok=True)
    np.savez_compressed(OUT / "peer.npz", input_ids=input_ids.astype(np.int32), logits=logits.astype(np.float32))
    defaults = xLSTMConfig().to_dict()
    (OUT / "transformers_defaults.json").write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")
    cfg = json.loads((OUT / "config.json").read_text())
    keys = ("num_blocks", "num_hidden_layers", "hidden_size", "embedding_dim", "tie_word_embeddings")
    print(f"wrote {OUT}:", {k: cfg[k] for k in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())
