"""A tiny training run shared by the tests of the loop and of ``xlstm-jax train``: a one-block model of width 32,
rows of 16 bytes, 4 rows a step, and a corpus of twelve short text files (four of them held out at 25%).

Both test files use exactly these settings, so the run's compiled programs are built once per test process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODEL_OVERRIDES = {"embedding_dim": 32, "num_blocks": 1, "num_heads": 1}
SEQ_LEN = 16
BATCH_SIZE = 4
VALIDATION_FRACTION = 0.25
OPTIMIZER = {"learning_rate": 1e-3, "total_steps": 4, "warmup_steps": 1}
WORDS = ("the", "cell", "keeps", "a", "matrix", "memory", "gate", "forget", "input", "state", "def", "return")


def write_corpus(folder: Path, files: int = 12) -> Path:
    """Writes ``doc00.txt`` ... into ``folder``: 40 to 80 random words each (seeded); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        words = rng.choice(WORDS, size=int(rng.integers(40, 80)))
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
    return folder
