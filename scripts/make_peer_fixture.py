"""Builds the peer fixture: a tiny random Hugging Face ``transformers`` xLSTM and what it computes.

Optional tooling, not a runtime or CI dependency. Run it in a separate environment that has torch,
transformers, safetensors and tokenizers, from the repository root::

    python3 -m venv /tmp/peer
    /tmp/peer/bin/pip install torch==2.13.0 transformers safetensors tokenizers
    /tmp/peer/bin/python scripts/make_peer_fixture.py

It writes ``tests/fixtures/xlstm_tiny/``:

- ``config.json`` and ``model.safetensors``: the model as ``save_pretrained`` writes it (float32);
- ``peer.npz``: ``input_ids`` (B, S), the model's ``logits`` (B, S, V) for them (one forward pass in
  inference mode: chunkwise for whole chunks, recurrent steps for the rest), ``prompt`` (1, P) and its
  greedy continuation ``greedy`` (1, N) from ``model.generate`` (which decodes with the recurrent step
  and the carried cache) with the raw logits of each step ``greedy_logits`` (1, N, V), and
  ``greedy_margin``: the smallest gap between the best and the second-best logit over the greedy steps;
- ``tokenizer.json``: a word-level tokenizer trained on a few sentences, for the command-line test.

Every weight is drawn at random (the library's own initialisation zeroes the gate weights, which would
leave the gates constant and untested). The greedy continuation is a sound exact-match test only if
no step is a near-tie, so the script refuses to write a fixture whose margin is below ``MIN_MARGIN``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import xLSTMConfig, xLSTMForCausalLM

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "xlstm_tiny"
SEED = 0
# A greedy step whose two best logits differ by less than this could flip under float32 rounding of a
# different (but equally valid) evaluation order: logits are O(1) here and a float32 forward pass of
# this size carries errors ~1e-5, so 1e-3 leaves a factor 100.
MIN_MARGIN = 1e-3

SENTENCES = [
    "the cell keeps a matrix memory and a normaliser",
    "the forget gate decays the memory and the input gate writes to it",
    "a language model predicts the next word from the words before it",
    "the quick brown fox jumps over the lazy dog",
    "generation feeds each new word back into the model",
]


def build_config() -> xLSTMConfig:
    return xLSTMConfig(
        vocab_size=99,
        hidden_size=128,
        num_hidden_layers=2,
        num_heads=2,
        qk_dim_factor=0.5,
        v_dim_factor=1.0,
        ffn_proj_factor=2.667,
        chunk_size=16,
        mode="inference",
        autocast_kernel_dtype="float32",
        inference_state_dtype="float32",
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Draws every weight at random, with scales that keep activations O(1) and the gates varied."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_mlstm.weight") or name.endswith("norm_ffn.weight") or "norm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "igate_preact" in name or "fgate_preact" in name:
                fan_in = p.shape[-1] if p.ndim == 2 else 1
                scale = 3.0 / fan_in**0.5 if p.ndim == 2 else 2.0
                shift = 2.0 if ("fgate" in name and p.ndim == 1) else 0.0
                p.copy_(shift + scale * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        model.lm_head.weight.mul_(4.0)  # spread the logits so that greedy steps are not near-ties


def build_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=["<bos>", "<pad>", "<eos>", "<unk>"], min_frequency=1
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


def main() -> int:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    config = build_config()
    model = xLSTMForCausalLM(config).eval()
    randomize(model, gen)

    rng = np.random.default_rng(SEED)
    B, S = 2, 45  # S = 2 whole chunks of 16 + 13 recurrent steps
    input_ids = rng.integers(3, config.vocab_size, (B, S))
    with torch.no_grad():
        logits = model(torch.as_tensor(input_ids), use_cache=False).logits.numpy()

    prompt = rng.integers(3, config.vocab_size, (1, 21))
    n_new = 24
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(prompt),
            max_new_tokens=n_new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=config.pad_token_id,
            eos_token_id=None,
        )
    greedy = out.sequences[:, prompt.shape[1] :].numpy()
    scores = torch.stack(out.logits, dim=1).numpy()  # (1, N, V) raw logits, before any processor
    if greedy.shape[1] != n_new or not np.array_equal(np.argmax(scores, axis=-1), greedy):
        print("generate did not return n_new tokens that are the argmax of its raw logits", file=sys.stderr)
        return 1
    top2 = np.sort(scores, axis=-1)[..., -2:]
    margin = float(np.min(top2[..., 1] - top2[..., 0]))
    if margin < MIN_MARGIN:
        print(f"greedy margin {margin:.2e} < {MIN_MARGIN:g}: choose another SEED", file=sys.stderr)
        return 1

    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    for extra in ("generation_config.json",):
        (OUT / extra).unlink(missing_ok=True)
    np.savez_compressed(
        OUT / "peer.npz",
        input_ids=input_ids.astype(np.int32),
        logits=logits.astype(np.float32),
        prompt=prompt.astype(np.int32),
        greedy=greedy.astype(np.int32),
        greedy_logits=scores.astype(np.float32),
        greedy_margin=np.float32(margin),
    )
    build_tokenizer(config.vocab_size).save(str(OUT / "tokenizer.json"))
    cfg = json.loads((OUT / "config.json").read_text())
    print(f"wrote {OUT}: config {cfg['hidden_size']}x{cfg['num_hidden_layers']}, greedy margin {margin:.3e}")
    print("greedy:", greedy.tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
