"""The training data pipeline (xlstm_jax/training/data.py): tokenizers, sources, packing, determinism,
resumption, sharding, the validation split, the standard-library corpus and its unigram entropy."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from xlstm_jax.training.data import (
    ByteTokenizer,
    Split,
    TextFileSource,
    TokenArraySource,
    is_validation_document,
    load_tokenizer,
    make_batch_iterator,
    resolve_paths,
    stdlib_python_files,
    unigram_entropy,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "xlstm_tiny"
KEYS = ("input_ids", "targets", "segment_ids", "loss_mask")


def _save(path: Path, tokens) -> Path:
    np.save(path, np.asarray(tokens, dtype=np.int32))
    return path


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The packed rows (S + 1 tokens) of a batch."""
    return np.concatenate([batch["input_ids"], batch["targets"][:, -1:]], axis=1)


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(KEYS) == set(y)
        for k in KEYS:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _documents_with_values(rng: np.random.Generator, n: int, eos: int = 1) -> tuple[list[list[int]], np.ndarray]:
    """n documents, document j = (j + 2) repeated 1..20 times, then ``eos``; and their concatenation."""
    docs = [[j + 2] * int(rng.integers(1, 21)) + [eos] for j in range(n)]
    return docs, np.concatenate(docs)


def _value_counts(batches: list[dict]) -> Counter:
    """How often each token value occurs in the rows (padding, id 0, left out)."""
    counts = Counter()
    for b in batches:
        rows = _rows(b)
        counts.update(rows[rows != 0].tolist())
    return counts


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    rng = np.random.default_rng(0)
    points = np.concatenate(
        [rng.integers(32, 127, 60), rng.integers(0xA0, 0x800, 20), rng.integers(0x4E00, 0x9FFF, 20)]
    )
    text = "".join(map(chr, rng.permutation(points))) + "\U0001f600\n\t"
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    ids = tok.encode(text, add_bos=True, add_eos=True)
    raw = text.encode("utf-8")
    assert ids.dtype == np.int32 and ids.shape == (len(raw) + 2,)
    assert ids[0] == 256 and ids[-1] == 257
    assert bytes(ids[1:-1].astype(np.uint8)) == raw
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(raw)) == text  # bytes in, same ids
    assert tok.encode("").shape == (0,)
    # A cut inside a multi-byte character decodes to U+FFFD, as the streaming printer expects.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_byte_tokenizer_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="258"):
        tok.decode([65, 258])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="text"):
        tok.encode(65)


def test_hf_tokenizer_frames_documents(tmp_path):
    tok = load_tokenizer(FIXTURE, bos_id=0, eos_id=2)
    plain = tok.encode("the model")
    assert plain.dtype == np.int32 and plain.size > 0 and 0 not in plain and 2 not in plain
    framed = tok.encode("the model", add_bos=True, add_eos=True)
    np.testing.assert_array_equal(framed, np.concatenate([[0], plain, [2]]))
    (tmp_path / "doc.txt").write_text("the model")
    np.testing.assert_array_equal(TextFileSource(tmp_path, tok)[0], framed)
    with pytest.raises(ValueError, match="eos_id"):
        load_tokenizer(FIXTURE, eos_id=tok.vocab_size)
    with pytest.raises(ValueError, match="add_bos"):
        load_tokenizer(FIXTURE).encode("the", add_bos=True)
    with pytest.raises(ValueError, match="no tokenizer file"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


def test_text_file_source_and_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"second")
    (tmp_path / "a.txt").write_text("first é")
    (tmp_path / "sub" / "c.md").write_bytes(b"")
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "sub" / "c.md"
    assert resolve_paths(tmp_path) == [a, b, c]
    assert resolve_paths([str(tmp_path / "*.txt"), b]) == [a, b]
    assert resolve_paths(str(tmp_path / "**" / "*.md")) == [c]
    assert resolve_paths(tmp_path, suffixes=(".md",)) == [c]
    src = TextFileSource(tmp_path)
    assert len(src) == 3 and src.vocab_size == 258
    assert [src.document_key(i) for i in range(3)] == ["a.txt", "b.txt", "sub/c.md"]
    np.testing.assert_array_equal(src[0], [256, *"first é".encode(), 257])
    np.testing.assert_array_equal(src[2], [256, 257])
    with pytest.raises(ValueError, match="matched no files"):
        resolve_paths(str(tmp_path / "*.rst"))
    with pytest.raises(ValueError, match="missing"):
        resolve_paths(tmp_path / "missing")
    with pytest.raises(ValueError, match="matched no files"):
        TextFileSource(tmp_path, suffixes=(".py",))


def test_token_array_source(tmp_path):
    tokens = [5, 6, 9, 9, 7, 9, 8, 8]
    src = TokenArraySource(_save(tmp_path / "t.npy", tokens), eos_id=9, vocab_size=10)
    assert [src[i].tolist() for i in range(len(src))] == [[5, 6, 9], [9], [7, 9], [8, 8]]
    assert all(src[i].dtype == np.int32 for i in range(len(src)))
    assert src.document_key(3) == "3"
    stream = TokenArraySource(tmp_path / "t.npy", chunk_len=3)
    assert [stream[i].tolist() for i in range(len(stream))] == [[5, 6, 9], [9, 7, 9], [8, 8]]
    np.asarray(tokens, np.uint16).tofile(tmp_path / "t.bin")
    raw = TokenArraySource(tmp_path / "t.bin", eos_id=9, dtype=np.uint16)
    assert [raw[i].tolist() for i in range(len(raw))] == [src[i].tolist() for i in range(len(src))]


def test_token_array_source_errors(tmp_path):
    path = _save(tmp_path / "t.npy", [1, 2, 3])
    with pytest.raises(ValueError, match="chunk_len is required"):
        TokenArraySource(path)
    with pytest.raises(ValueError, match="chunk_len"):
        TokenArraySource(path, eos_id=3, chunk_len=2)
    with pytest.raises(ValueError, match="eos_id=12"):
        TokenArraySource(path, eos_id=12, vocab_size=10)
    with pytest.raises(ValueError, match="1-D"):
        TokenArraySource(_save(tmp_path / "m.npy", [[1, 2], [3, 4]]), eos_id=2)
    np.save(tmp_path / "f.npy", np.ones(4, np.float32))
    with pytest.raises(TypeError, match="integers"):
        TokenArraySource(tmp_path / "f.npy", eos_id=1)
    (tmp_path / "raw.bin").write_bytes(b"1234")
    with pytest.raises(ValueError, match="dtype="):
        TokenArraySource(tmp_path / "raw.bin", eos_id=1)
    with pytest.raises(ValueError, match="not a file"):
        TokenArraySource(tmp_path / "none.npy", eos_id=1)
    with pytest.raises(ValueError, match="token id 7 >= vocab_size=5"):
        TokenArraySource(_save(tmp_path / "v.npy", [1, 7, 0]), eos_id=0, vocab_size=5)[0]


# ----------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------


def test_packing_is_exact(tmp_path):
    """Hand-made documents (end-of-document id 9) packed into rows of S + 1 = 6 tokens, in corpus order:

    row 0: 1 2 9 | 3 9 | 4      the third document starts at the row's end ...
    row 1: 5 6 7 8 6 5          ... continues over a whole row (segment 1 again) ...
    row 2: 4 3 2 9 | 7 9        ... and ends in the next one
    row 3: 8 8 9 . . .          the end of the stream: padding (id 0, segment 0)
    """
    docs = [[1, 2, 9], [3, 9], [4, 5, 6, 7, 8, 6, 5, 4, 3, 2, 9], [7, 9], [8, 8, 9]]
    src = TokenArraySource(_save(tmp_path / "t.npy", np.concatenate(docs)), eos_id=9, vocab_size=10)
    it = make_batch_iterator(
        src, seq_len=5, global_batch_size=3, shuffle=False, num_epochs=1, shard_index=0, shard_count=1
    )
    with it:
        batches = list(it)
    expected = [
        {
            "input_ids": [[1, 2, 9, 3, 9], [5, 6, 7, 8, 6], [4, 3, 2, 9, 7]],
            "targets": [[2, 9, 3, 9, 4], [6, 7, 8, 6, 5], [3, 2, 9, 7, 9]],
            "segment_ids": [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [1, 1, 1, 1, 2]],
            "loss_mask": [[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 1]],
        },
        {  # the last batch is filled with padding rows
            "input_ids": [[8, 8, 9, 0, 0], [0] * 5, [0] * 5],
            "targets": [[8, 9, 0, 0, 0], [0] * 5, [0] * 5],
            "segment_ids": [[1, 1, 1, 0, 0], [0] * 5, [0] * 5],
            "loss_mask": [[1, 1, 0, 0, 0], [0] * 5, [0] * 5],
        },
    ]
    dtypes = {"input_ids": np.int32, "targets": np.int32, "segment_ids": np.int32, "loss_mask": np.float32}
    _assert_same_batches(batches, [{k: np.asarray(v, dtypes[k]) for k, v in e.items()} for e in expected])


def test_epochs_repeat_with_a_new_order(tmp_path):
    """One document per row (a stream cut into chunks of S + 1 tokens): the rows show the document order."""
    n, seq_len = 7, 3
    stream = np.repeat(np.arange(1, n + 1), seq_len + 1)
    src = TokenArraySource(_save(tmp_path / "s.npy", stream), chunk_len=seq_len + 1)
    args = {"seq_len": seq_len, "global_batch_size": 1, "seed": 3, "shard_index": 0, "shard_count": 1}
    with make_batch_iterator(src, row_shuffle_window=0, **args) as it:
        order = [int(_rows(b)[0, 0]) for b in _take(it, 3 * n)]
        b = next(it)
    with make_batch_iterator(src, row_shuffle_window=3, **args) as it:
        mixed = [int(_rows(b)[0, 0]) for b in _take(it, 3 * n)]
    epochs = [order[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(1, n + 1)) for e in epochs)  # every epoch: each document once
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(1, n + 1))
    # The row shuffle permutes the rows within each window of 3.
    assert mixed != order and all(sorted(mixed[k : k + 3]) == sorted(order[k : k + 3]) for k in range(0, 3 * n, 3))
    np.testing.assert_array_equal(b["segment_ids"], 1)  # a row is one contiguous piece of the stream
    np.testing.assert_array_equal(b["loss_mask"], 1)


# ----------------------------------------------------------------------------------------------------------
# Determinism, resumption, sharding, validation
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> Path:
    """Twelve files of random bytes, 0 to 70 long, so that documents span up to five rows of 17 tokens."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    for j in range(12):
        (root / f"doc{j:02d}.txt").write_bytes(rng.integers(0, 256, int(rng.integers(0, 71)), np.uint8).tobytes())
    return root


def _text_iterator(root: Path, **kw):
    args = {"seq_len": 16, "global_batch_size": 2, "seed": 5, "row_shuffle_window": 5}
    args |= {"shard_index": 0, "shard_count": 1} | kw
    return make_batch_iterator(TextFileSource(root), **args)


def test_same_arguments_same_batches(text_corpus):
    with _text_iterator(text_corpus) as a, _text_iterator(text_corpus, num_threads=0, prefetch=0) as b:
        first = _take(a, 12)
        _assert_same_batches(first, _take(b, 12))
    with _text_iterator(text_corpus, seed=6) as c:
        other = _take(c, 12)
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, other, strict=True))


@pytest.mark.parametrize("n", [0, 3, 10])
def test_resume_is_bit_exact(text_corpus, n):
    """Take n batches, save the state through JSON, take 9 more; a new iterator restored from the state gives
    the same 9 (12 documents over rows of 17 tokens, rows shuffled in windows of 5: the states fall inside
    split documents, row windows and epochs)."""
    with _text_iterator(text_corpus) as it:
        _take(it, n)
        state = json.loads(json.dumps(it.get_state()))
        after = _take(it, 9)
    with _text_iterator(text_corpus) as fresh:
        fresh.set_state(state)
        _assert_same_batches(after, _take(fresh, 9))


def test_set_state_refuses_another_pipeline(text_corpus):
    with _text_iterator(text_corpus) as it:
        state = it.get_state()
    with _text_iterator(text_corpus, seed=6) as other, pytest.raises(ValueError, match="seed=5"):
        other.set_state(state)
    with _text_iterator(text_corpus) as same, pytest.raises(ValueError, match="format"):
        same.set_state({**state, "format": 0})


def test_shards_are_disjoint_and_cover(tmp_path):
    docs, stream = _documents_with_values(np.random.default_rng(2), 15)
    src = TokenArraySource(_save(tmp_path / "t.npy", stream), eos_id=1)
    counts = []
    for shard in range(2):
        it = make_batch_iterator(src, seq_len=7, global_batch_size=4, num_epochs=1, shard_index=shard, shard_count=2)
        with it:
            batches = list(it)
        assert it.batch_size == 2 and all(b["input_ids"].shape == (2, 7) for b in batches)
        counts.append(_value_counts(batches))
    eos = counts[0].pop(1) + counts[1].pop(1)
    assert eos == len(docs)
    assert not set(counts[0]) & set(counts[1])  # no document in both shards
    assert counts[0] + counts[1] == Counter({d[0]: len(d) - 1 for d in docs})  # every token of every document


def test_validation_split_is_disjoint_from_training(tmp_path):
    docs, stream = _documents_with_values(np.random.default_rng(3), 40)
    src = TokenArraySource(_save(tmp_path / "t.npy", stream), eos_id=1)
    seen = {}
    for split in ("train", "validation"):
        it = make_batch_iterator(
            src, seq_len=7, global_batch_size=2, num_epochs=1, split=split, validation_fraction=0.3, shard_count=1
        )
        with it:
            seen[split] = set(_value_counts(list(it))) - {1}
    held_out = {j + 2 for j in range(40) if is_validation_document(str(j), 0.3)}
    assert seen["validation"] == held_out and 0 < len(held_out) < 40
    assert seen["train"] == {j + 2 for j in range(40)} - held_out


def test_pipeline_argument_errors(tmp_path):
    src = TokenArraySource(_save(tmp_path / "t.npy", [2, 3, 1, 4, 1]), eos_id=1, vocab_size=5)
    ok = {"seq_len": 4, "global_batch_size": 2, "shard_index": 0, "shard_count": 1}
    for bad, match in [
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"global_batch_size": 3, "shard_count": 2}, "global_batch_size=3 must be divisible by shard_count=2"),
        ({"shard_index": 2, "shard_count": 2}, "shard_index=2"),
        ({"shard_count": 3, "global_batch_size": 3}, "shard_count=3 exceeds the 2 documents"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"split": "test"}, "split must be one of"),
        ({"split": Split.VALIDATION}, "validation_fraction > 0"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"seed": 2**32}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_batch_iterator(src, **(ok | bad))
    with pytest.raises(TypeError, match="seq_len must be an int"):
        make_batch_iterator(src, **(ok | {"seq_len": 4.0}))
    with pytest.raises(TypeError, match="DocumentSource"):
        make_batch_iterator([np.arange(3)], **ok)
    with make_batch_iterator(src, **(ok | {"vocab_size": 4})) as it, pytest.raises(ValueError, match="vocab_size=4"):
        next(it)  # token 4 >= the model's vocabulary of 4


# ----------------------------------------------------------------------------------------------------------
# The standard-library corpus
# ----------------------------------------------------------------------------------------------------------


def test_stdlib_python_files(tmp_path):
    for name in ["z.py", "a.py", "pkg/b.py", "pkg/notes.txt", "test/t.py", "pkg/tests/u.py", "idlelib/idle_test/v.py",
                 "site-packages/w.py", "dist-packages/x.py", "__pycache__/y.py"]:  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    rel = lambda files: [f.relative_to(tmp_path).as_posix() for f in files]
    assert rel(stdlib_python_files(tmp_path)) == ["a.py", "pkg/b.py", "z.py"]
    assert rel(stdlib_python_files(tmp_path, include_tests=True)) == [
        "a.py",
        "idlelib/idle_test/v.py",
        "pkg/b.py",
        "pkg/tests/u.py",
        "test/t.py",
        "z.py",
    ]
    real = stdlib_python_files()
    assert any(f.name == "os.py" for f in real) and real == stdlib_python_files()
    assert not any({"site-packages", "test"} & set(f.parts) for f in real)
    with pytest.raises(ValueError, match="not a directory"):
        stdlib_python_files(tmp_path / "a.py")


def test_unigram_entropy(tmp_path):
    (tmp_path / "one").write_bytes(b"abab")
    (tmp_path / "two").write_bytes(b"cdcd")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "three").write_bytes(b"aaaa")
    # bytes a, b, c, d equally often: 2 bits, ln 4 nats
    assert unigram_entropy([tmp_path / "one", tmp_path / "two"], unit="bits") == pytest.approx(2.0, rel=1e-12)
    assert unigram_entropy([tmp_path / "one", tmp_path / "two"]) == pytest.approx(math.log(4), rel=1e-12)
    # the whole folder: a 6/12, b, c, d 2/12 each
    h = -(0.5 * math.log(0.5) + 3 * (1 / 6) * math.log(1 / 6))
    assert unigram_entropy(tmp_path) == pytest.approx(h, rel=1e-12)
    assert unigram_entropy(tmp_path / "sub") == 0.0
    with pytest.raises(ValueError, match="unit"):
        unigram_entropy(tmp_path, unit="bytes")


# ----------------------------------------------------------------------------------------------------------
# Global arrays
# ----------------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json
    import numpy as np
    from jax.sharding import PartitionSpec
    from xlstm_jax.models.xlstm_parallel.sharding import MeshConfig, make_mesh
    from xlstm_jax.training.data import to_global_batch

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, 258, (4, 5)).astype(np.int32), "loss_mask": rng.random((4, 5), np.float32)}
    out = to_global_batch(batch, mesh)
    result = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype),
            "spec": v.sharding.spec == PartitionSpec(("data", "fsdp"), None),
            "equal": bool(np.array_equal(np.asarray(v), batch[k])),
            "rows_per_device": sorted({s.data.shape[0] for s in v.addressable_shards})}
        for k, v in out.items()
    }
    try:
        to_global_batch({"input_ids": batch["input_ids"][:3]}, mesh)
    except ValueError as e:
        result["error"] = str(e)
    print(json.dumps(result))
    """
)


def test_to_global_batch_splits_rows_over_data_and_fsdp():
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, dtype in (("input_ids", "int32"), ("loss_mask", "float32")):
        assert result[key] == {
            "shape": [4, 5],
            "dtype": dtype,
            "spec": True,
            "equal": True,
            "rows_per_device": [1],
        }
    assert "3 rows per process" in result["error"] and "4 devices" in result["error"]
