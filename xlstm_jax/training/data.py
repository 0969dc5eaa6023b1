"""The training data pipeline: documents -> token ids -> packed rows with segment ids -> batches.

Sources (each a random-access list of documents, every document a 1-D array of token ids):

* :class:`TextFileSource`: text files, one document per file, tokenised with :class:`ByteTokenizer` (raw
  UTF-8 bytes for a byte-level model) or a ``tokenizers.Tokenizer`` (:class:`HFTokenizer`,
  :func:`load_tokenizer`).
* :class:`TokenArraySource`: a 1-D array of token ids on disk (``.npy`` or a raw binary file, memory-mapped),
  split into documents after every end-of-document id, or cut into fixed-length chunks of one long stream.

:func:`make_batch_iterator` builds a `Grain <https://github.com/google/grain>`_ pipeline over a source:

1. **Split** (:class:`Split`): a document belongs to the validation split when a hash of its key (the file's
   path relative to the corpus root, or the document's index in a token array) falls below
   ``validation_fraction``; the training split is the rest. The assignment does not depend on the seed, the
   shard or the other documents, so validation documents are never trained on.
2. **Shard**: process ``shard_index`` of ``shard_count`` (by default ``jax.process_index()`` of
   ``jax.process_count()``) keeps every ``shard_count``-th document of its split and reads only those.
3. **Shuffle and repeat**: the shard's documents in a seed-determined order that changes every epoch
   (``shuffle=False`` keeps the corpus order); ``num_epochs=None`` repeats forever.
4. **Read and tokenise** in ``num_threads`` host threads, in order (Grain's ``ReadOptions``).
5. **Pack**: documents are concatenated in that order and cut into rows of ``seq_len + 1`` tokens
   (Grain's ``ConcatThenSplitIterDataset``). A document that does not fit in the rest of a row is split:
   its first part ends the row and its continuation begins the next row, where it is a new segment (it
   starts from zero states, like any segment that begins a row). Only the end of a finite stream
   (``num_epochs`` set) leaves padding.
6. **Shuffle rows** (with ``shuffle``): rows are shuffled within windows of ``row_shuffle_window`` rows, so
   that the pieces of a long document do not fill a whole batch.
7. **Batch**: ``global_batch_size // shard_count`` rows per process, turned into the training batch (below);
   a last, partial batch of a finite stream is filled with padding rows.
8. **Prefetch**: ``prefetch`` batches are prepared ahead in a background thread.

The training batch (every array (B, S) with B = ``global_batch_size // shard_count``, S = ``seq_len``), from
a packed row ``r`` of S + 1 tokens with segment ids ``g`` (1, 2, ... per document within the row, 0 at
padding):

* ``input_ids`` int32 = ``r[:-1]``; ``targets`` int32 = ``r[1:]`` (the next token);
* ``segment_ids`` int32 = ``g[:-1]``;
* ``loss_mask`` float32: 1 where the input is not padding and the target belongs to the input's document
  (``g[t] != 0 and g[t + 1] == g[t]``), else 0. A document's first token is never a target (nothing of its
  document precedes it), so the byte tokenizer opens every document with ``BOS``.

The iterator is deterministic (the same arguments give the same batches, bit for bit) and resumable:
``state = it.get_state()`` is a JSON-able dict, and a fresh iterator built with the same arguments
continues exactly where ``it`` stood after ``it.set_state(state)``. Each process saves its own state.

:func:`to_global_batch` turns the process-local batch into global ``jax.Array`` s whose batch axis is split
over the mesh axes ``("data", "fsdp")``.

Grain is imported inside the functions that build pipelines, so that importing this module needs only
NumPy and JAX (the tokenizers, the corpus lister and :func:`to_global_batch` work without Grain).

Example:
    >>> source = TextFileSource(stdlib_python_files(), ByteTokenizer())
    >>> it = make_batch_iterator(source, seq_len=512, global_batch_size=8, seed=0, validation_fraction=0.05)
    >>> batch = next(it)
    >>> batch["input_ids"].shape, batch["loss_mask"].dtype
    ((8, 512), dtype('float32'))
    >>> state = it.get_state()  # json.dumps(state) works; set_state(state) on a new iterator resumes
"""

from __future__ import annotations

import enum
import glob
import hashlib
import json
import math
import os
import sysconfig
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
from jax.sharding import Mesh

from xlstm_jax.models.xlstm_parallel.sharding import BATCH_AXES, batch_sharding

__all__ = [
    "BatchIterator",
    "ByteTokenizer",
    "DocumentSource",
    "HFTokenizer",
    "Split",
    "TextFileSource",
    "TokenArraySource",
    "is_validation_document",
    "load_tokenizer",
    "make_batch_iterator",
    "resolve_paths",
    "stdlib_python_files",
    "to_global_batch",
    "unigram_entropy",
]

# Version of the iterator state's layout; a state of another version is refused.
_STATE_FORMAT = 1

# Folders never listed as part of the standard-library corpus (third-party packages and caches), and the
# test folders left out unless asked for.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_FOLDERS = frozenset({"test", "tests", "idle_test"})


def _is_int(x: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, else TypeError / ValueError naming ``name``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------


def _check_ids(ids: Any, vocab_size: int, name: str) -> np.ndarray:
    """``ids`` as a 1-D int64 array of ids in [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise ValueError(f"{name} holds token id {bad}, outside [0, vocab_size={vocab_size})")
    return arr


class ByteTokenizer:
    """The byte-level tokenizer: byte ``b`` of the UTF-8 text is token ``b``; two special ids follow.

    Ids 0..255 are the bytes, ``bos_id = 256`` opens a document and ``eos_id = 257`` ends it, so
    ``vocab_size = 258``. A training document is ``[BOS] + bytes + [EOS]``: the model learns the first byte
    of a document from ``BOS`` and learns where documents end. To generate, encode the prompt with
    ``add_bos=True`` and stop at ``eos_id``.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé", add_bos=True).tolist()
        [256, 104, 195, 169]
        >>> tok.decode([256, 104, 195, 169, 257])
        'hé'
    """

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Token ids of ``text`` (a str, encoded as UTF-8, or raw bytes).

        Args:
            text: the text.
            add_bos: prepend ``bos_id``.
            add_eos: append ``eos_id``.

        Returns:
            (n,) int32 token ids, n = number of bytes (+1 per added special id).
        """
        if isinstance(text, str):
            text = text.encode("utf-8")
        elif not isinstance(text, bytes | bytearray | memoryview):
            raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
        body = np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32)
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        if not head and not tail:
            return body
        return np.concatenate([np.asarray(head, np.int32), body, np.asarray(tail, np.int32)])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids`` (the special ids dropped; invalid UTF-8 becomes U+FFFD).

        Args:
            ids: (n,) token ids in [0, 258).

        Returns:
            The decoded text.
        """
        arr = _check_ids(ids, self.vocab_size, "ids")
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the interface of :class:`ByteTokenizer`.

    Text is encoded without the tokenizer's own post-processing (``add_special_tokens=False``); ``bos_id``
    and ``eos_id``, when given, are added by ``encode``'s flags, so that a document's framing is explicit.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        bos_id: the id that opens a document, or None for none.
        eos_id: the id that ends a document, or None for none.
    """

    def __init__(self, tokenizer: Any, *, bos_id: int | None = None, eos_id: int | None = None) -> None:
        if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size")):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if value is not None:
                _check_int(name, value, minimum=0)
                if value >= self.vocab_size:
                    raise ValueError(f"{name}={value} must be < the tokenizer's vocab_size={self.vocab_size}")
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_id = None if eos_id is None else int(eos_id)

    def encode(self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Token ids of ``text`` (bytes are decoded as UTF-8, invalid sequences replaced).

        Args:
            text: the text.
            add_bos: prepend ``bos_id`` (ValueError if it is None).
            add_eos: append ``eos_id`` (ValueError if it is None).

        Returns:
            (n,) int32 token ids.
        """
        if isinstance(text, bytes | bytearray | memoryview):
            text = bytes(text).decode("utf-8", errors="replace")
        elif not isinstance(text, str):
            raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True needs bos_id; this HFTokenizer has bos_id=None")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True needs eos_id; this HFTokenizer has eos_id=None")
            ids.append(self.eos_id)
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids``, special tokens skipped.

        Args:
            ids: (n,) token ids in [0, vocab_size).

        Returns:
            The decoded text.
        """
        arr = _check_ids(ids, self.vocab_size, "ids")
        return self.tokenizer.decode(arr.tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def load_tokenizer(path: str | os.PathLike, *, bos_id: int | None = None, eos_id: int | None = None) -> HFTokenizer:
    """Reads a ``tokenizer.json`` into an :class:`HFTokenizer`.

    Args:
        path: the ``tokenizer.json`` file (or a directory holding one).
        bos_id: the id that opens a document (e.g. the model config's ``bos_token_id``), or None.
        eos_id: the id that ends a document (e.g. the model config's ``eos_token_id``), or None.

    Returns:
        The tokenizer.
    """
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"path={str(path)!r}: no tokenizer file at {p}")
    try:
        tokenizer = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
        raise ValueError(f"path={str(path)!r}: {p} is not a readable tokenizer: {e}") from None
    return HFTokenizer(tokenizer, bos_id=bos_id, eos_id=eos_id)


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


@runtime_checkable
class DocumentSource(Protocol):
    """A random-access list of documents.

    ``source[i]`` is document ``i`` as a (n_i,) int32 array of token ids (n_i >= 0);
    ``source.document_key(i)`` a string naming it that does not depend on the machine (it decides the
    validation split); ``source.vocab_size`` the bound on the ids, or None when unknown.
    """

    vocab_size: int | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...

    def document_key(self, index: int) -> str: ...


def resolve_paths(
    paths: str | os.PathLike | Iterable[str | os.PathLike], *, suffixes: Sequence[str] = ()
) -> list[Path]:
    """The files named by ``paths``: files, directories (searched recursively) and glob patterns.

    Args:
        paths: one entry or a list of them. A directory contributes every file below it; a pattern with
            ``*``, ``?`` or ``[`` contributes its matches (``**`` matches any depth).
        suffixes: when not empty, keep only files whose name ends with one of these (e.g. ``(".py",)``).

    Returns:
        The files, deduplicated and sorted by path.

    Raises:
        ValueError: an entry that is neither a file, a directory nor a pattern that matches, or no file at
            all after filtering.
    """
    entries = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not entries:
        raise ValueError("paths is empty; expected files, directories or glob patterns")
    files: set[Path] = set()
    for entry in entries:
        if not isinstance(entry, str | os.PathLike):
            raise TypeError(f"paths entries must be str or os.PathLike, got {type(entry).__name__}")
        text = os.fspath(entry)
        p = Path(text)
        if p.is_file():
            files.add(p)
        elif p.is_dir():
            files.update(q for q in p.rglob("*") if q.is_file())
        elif glob.has_magic(text):
            matches = [Path(q) for q in glob.glob(text, recursive=True)]
            files.update(q for q in matches if q.is_file())
            files.update(f for q in matches if q.is_dir() for f in q.rglob("*") if f.is_file())
        else:
            raise ValueError(f"paths entry {text!r} is not a file, a directory or a glob pattern that matches")
    if suffixes:
        files = {f for f in files if f.name.endswith(tuple(suffixes))}
    if not files:
        raise ValueError(f"paths={entries!r} (suffixes={tuple(suffixes)!r}) matched no files")
    return sorted(files)


class TextFileSource:
    """Text files as documents, one per file, tokenised on the fly.

    Each file is read as bytes; :class:`ByteTokenizer` takes them as they are, an :class:`HFTokenizer`
    decodes them as UTF-8 first. A document is ``[bos_id] + tokens + [eos_id]``, each special id where the
    tokenizer has one (the byte tokenizer has both).

    Args:
        paths: files, directories or glob patterns (see :func:`resolve_paths`).
        tokenizer: a :class:`ByteTokenizer` (the default), an :class:`HFTokenizer`, a ``tokenizers.Tokenizer``
            (no special ids), or the path of a ``tokenizer.json`` (see :func:`load_tokenizer`).
        suffixes: keep only files with these name endings (see :func:`resolve_paths`).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        tokenizer: Any = None,
        *,
        suffixes: Sequence[str] = (),
    ) -> None:
        self.paths = resolve_paths(paths, suffixes=suffixes)
        if tokenizer is None:
            tokenizer = ByteTokenizer()
        elif isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_tokenizer(tokenizer)
        elif not isinstance(tokenizer, ByteTokenizer | HFTokenizer):
            tokenizer = HFTokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.vocab_size: int | None = tokenizer.vocab_size
        # Keys are paths relative to the deepest folder holding every file, so they do not depend on where
        # the corpus lies on this machine.
        self._root = Path(os.path.commonpath([str(p.parent.absolute()) for p in self.paths]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        data = self.paths[index].read_bytes()
        tok = self.tokenizer
        return tok.encode(data, add_bos=tok.bos_id is not None, add_eos=tok.eos_id is not None)

    def document_key(self, index: int) -> str:
        return self.paths[index].absolute().relative_to(self._root).as_posix()

    def __repr__(self) -> str:
        return f"TextFileSource({len(self)} files under {str(self._root)!r}, {self.tokenizer!r})"


class TokenArraySource:
    """A 1-D array of token ids on disk, memory-mapped, as documents.

    With ``eos_id``, a document ends after every ``eos_id`` (which it keeps); tokens after the last one form
    a last document. Without it, the array is one long stream cut into documents of ``chunk_len`` tokens
    (the last one shorter); with ``chunk_len = seq_len + 1`` every packed row is one contiguous piece of the
    stream.

    Args:
        path: a ``.npy`` file, or a raw binary file of ``dtype`` values.
        eos_id: the end-of-document id, or None for one long stream.
        chunk_len: document length of a stream; required exactly when ``eos_id`` is None.
        vocab_size: ids must be below it (checked as documents are read), or None for no bound.
        dtype: the element type of a raw binary file (ignored for ``.npy``, which records its own).
    """

    # Tokens scanned per step when locating the end-of-document ids (bounds the scan's memory).
    _SCAN = 1 << 24

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        eos_id: int | None = None,
        chunk_len: int | None = None,
        vocab_size: int | None = None,
        dtype: Any = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"path={str(path)!r} is not a file")
        if self.path.suffix == ".npy":
            tokens = np.load(self.path, mmap_mode="r")
        elif dtype is None:
            raise ValueError(f"path={str(path)!r} is not a .npy file; give dtype= to read it as raw binary")
        else:
            tokens = np.memmap(self.path, dtype=np.dtype(dtype), mode="r")
        if tokens.ndim != 1:
            raise ValueError(f"the token array in {self.path} must be 1-D, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"the token array in {self.path} must hold integers, got dtype {tokens.dtype}")
        if tokens.size == 0:
            raise ValueError(f"the token array in {self.path} is empty")
        self.tokens = tokens
        self.vocab_size = None if vocab_size is None else _check_int("vocab_size", vocab_size, minimum=1)
        self.eos_id = None if eos_id is None else _check_int("eos_id", eos_id, minimum=0)
        if self.vocab_size is not None and self.eos_id is not None and self.eos_id >= self.vocab_size:
            raise ValueError(f"eos_id={eos_id} must be < vocab_size={vocab_size}")
        n = tokens.size
        if self.eos_id is None:
            if chunk_len is None:
                raise ValueError("chunk_len is required when eos_id is None (the array is one long stream)")
            self.chunk_len = _check_int("chunk_len", chunk_len, minimum=1)
            self._ends = np.append(np.arange(self.chunk_len, n, self.chunk_len, dtype=np.int64), n)
        else:
            if chunk_len is not None:
                raise ValueError(f"chunk_len={chunk_len} applies only without eos_id; documents end at eos_id")
            self.chunk_len = None
            ends = [
                start + 1 + np.flatnonzero(np.asarray(tokens[start : start + self._SCAN]) == self.eos_id)
                for start in range(0, n, self._SCAN)
            ]
            self._ends = np.concatenate([*ends, np.empty(0, np.int64)]).astype(np.int64)
            if self._ends.size == 0 or self._ends[-1] != n:
                self._ends = np.append(self._ends, n)
        self._starts = np.concatenate([[0], self._ends[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._ends.size)

    def __getitem__(self, index: int) -> np.ndarray:
        doc = np.asarray(self.tokens[self._starts[index] : self._ends[index]])
        if doc.size and doc.min() < 0:
            raise ValueError(f"document {index} of {self.path} holds a negative token id {doc.min()}")
        if doc.size and self.vocab_size is not None and doc.max() >= self.vocab_size:
            raise ValueError(
                f"document {index} of {self.path} holds token id {doc.max()} >= vocab_size={self.vocab_size}"
            )
        return doc.astype(np.int32)

    def document_key(self, index: int) -> str:
        return str(index)

    def __repr__(self) -> str:
        return f"TokenArraySource({str(self.path)!r}, {len(self)} documents, {self.tokens.size} tokens)"


# ----------------------------------------------------------------------------------------------------------
# Splits, packing, batches
# ----------------------------------------------------------------------------------------------------------


class Split(enum.Enum):
    """Which documents of a source a pipeline reads (see :func:`is_validation_document`)."""

    TRAIN = "train"
    VALIDATION = "validation"


def is_validation_document(key: str, validation_fraction: float) -> bool:
    """Whether the document named ``key`` belongs to the validation split.

    The first 8 bytes of the BLAKE2b hash of ``key`` (UTF-8), read as a fraction of 2**64, are compared
    with ``validation_fraction``: the same key lands in the same split on every machine and in every run,
    whatever the other documents are.

    Args:
        key: the document's key (``DocumentSource.document_key``).
        validation_fraction: the expected share of validation documents, in [0, 1).

    Returns:
        True for a validation document.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < validation_fraction * 2.0**64


def _batch_from_rows(tokens: np.ndarray, segments: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """The training batch of packed rows (padding rows appended up to ``batch_size``).

    Args:
        tokens: (b, S + 1) token ids, b <= batch_size.
        segments: (b, S + 1) segment ids (1, 2, ... per document within a row, 0 = padding).
        batch_size: B, the number of rows of the batch.

    Returns:
        ``input_ids``, ``targets``, ``segment_ids`` (int32) and ``loss_mask`` (float32), each (B, S).
    """
    missing = batch_size - tokens.shape[0]
    if missing:
        tokens = np.concatenate([tokens, np.zeros((missing, tokens.shape[1]), tokens.dtype)])
        segments = np.concatenate([segments, np.zeros((missing, segments.shape[1]), segments.dtype)])
    seg_in, seg_out = segments[:, :-1], segments[:, 1:]
    return {
        "input_ids": np.ascontiguousarray(tokens[:, :-1], dtype=np.int32),
        "targets": np.ascontiguousarray(tokens[:, 1:], dtype=np.int32),
        "segment_ids": np.ascontiguousarray(seg_in, dtype=np.int32),
        "loss_mask": ((seg_in != 0) & (seg_out == seg_in)).astype(np.float32),
    }


def _json_state(state: Any) -> Any:
    """``state`` as plain JSON values (tuples become lists, NumPy scalars Python numbers)."""
    return json.loads(json.dumps(state, default=lambda x: x.item() if isinstance(x, np.generic) else str(x)))


def _grain_state(state: Any) -> Any:
    """A JSON-loaded state back in Grain's form: the packer's slices are (start, stop) tuples."""
    if isinstance(state, dict):
        out = {k: _grain_state(v) for k, v in state.items()}
        if isinstance(out.get("remainder_slices"), dict):
            out["remainder_slices"] = {k: tuple(v) for k, v in out["remainder_slices"].items()}
        return out
    return state


def _close_all(iterators: list) -> None:
    """Closes and drops the iterators in the list."""
    while iterators:
        iterators.pop().close()


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Training batches of one process, deterministic and resumable (built by :func:`make_batch_iterator`).

    ``next(it)`` returns the batch dict described in the module docstring; ``get_state()`` a JSON-able dict
    of where the iterator stands (the arguments that shape the stream included); ``set_state(state)``
    moves it there. ``close()`` stops the prefetch thread; the iterator is also a context manager.

    Attributes:
        seq_len: S.
        batch_size: B, the rows per batch of this process (``global_batch_size // shard_count``).
        num_documents: documents of this process's shard of its split.
        config: the arguments that determine the stream (part of every state).
    """

    def __init__(self, dataset: Any, *, seq_len: int, batch_size: int, num_documents: int, config: dict) -> None:
        # The Grain iterator sits in a list that the finalizer empties: closing (explicitly, when this object
        # is collected, or at interpreter exit) drops the last reference while its modules are still loaded.
        self._box = [iter(dataset)]
        self._finalizer = weakref.finalize(self, _close_all, self._box)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_documents = num_documents
        self.config = config

    @property
    def _it(self) -> Any:
        if not self._box:
            raise ValueError("this BatchIterator is closed")
        return self._box[0]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """Where the iterator stands, as JSON-able values.

        Returns:
            ``{"format": 1, "config": {...}, "grain": {...}}``.
        """
        return _json_state({"format": _STATE_FORMAT, "config": self.config, "grain": self._it.get_state()})

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Moves the iterator to ``state`` (from ``get_state`` of an iterator built with the same arguments).

        Raises:
            ValueError: the state is not one of this layout or comes from a pipeline with other arguments.
        """
        if not isinstance(state, Mapping) or set(state) != {"format", "config", "grain"}:
            raise ValueError(f"state must be a dict from BatchIterator.get_state(), got {state!r:.200}")
        if state["format"] != _STATE_FORMAT:
            raise ValueError(f"state has format {state['format']!r}; this version reads format {_STATE_FORMAT}")
        ours = _json_state(self.config)
        if state["config"] != ours:
            diff = sorted(k for k in set(ours) | set(state["config"]) if ours.get(k) != state["config"].get(k))
            raise ValueError(
                "state comes from a pipeline with other arguments: "
                + ", ".join(f"{k}={state['config'].get(k)!r} (this one: {ours.get(k)!r})" for k in diff)
            )
        self._it.set_state(_grain_state(json.loads(json.dumps(state["grain"]))))

    def close(self) -> None:
        """Stops the background prefetching; the iterator is unusable afterwards."""
        self._finalizer()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_batch_iterator(
    source: DocumentSource,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    split: Split | str = Split.TRAIN,
    validation_fraction: float = 0.0,
    vocab_size: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    row_shuffle_window: int = 64,
    num_threads: int = 2,
    prefetch: int = 2,
) -> BatchIterator:
    """The Grain pipeline over ``source``: packed training batches of this process (see the module docstring).

    Args:
        source: the documents (:class:`TextFileSource`, :class:`TokenArraySource` or any
            :class:`DocumentSource`).
        seq_len: S, the tokens per row fed to the model (rows hold S + 1 tokens).
        global_batch_size: rows per step over all processes; each process yields
            ``global_batch_size // shard_count`` of them.
        seed: the shuffle seed, in [0, 2**32); epoch e shuffles with ``seed + e``.
        shuffle: shuffle the documents each epoch, and the packed rows within windows (False: corpus order,
            e.g. for evaluation).
        num_epochs: passes over the documents, or None to repeat forever. A finite stream ends with padding,
            and shards may end at different steps: an evaluation over several processes takes a fixed number of
            batches from an endless iterator instead.
        split: ``Split.TRAIN`` or ``Split.VALIDATION`` (or their values ``"train"``, ``"validation"``).
        validation_fraction: the expected share of documents held out for validation, in [0, 1).
        vocab_size: token ids must be below it (e.g. the model's); None takes ``source.vocab_size``.
        shard_index: this process's shard; None takes ``jax.process_index()``.
        shard_count: the number of shards; None takes ``jax.process_count()``.
        row_shuffle_window: with ``shuffle``, the packed rows are shuffled within consecutive windows of this
            many rows, so that the rows of one long document spread over several batches (0 or 1: rows in
            packing order).
        num_threads: host threads reading and tokenising documents (0 reads in the calling thread).
        prefetch: batches prepared ahead in a background thread (0 prepares each on demand).

    Returns:
        The iterator; each batch is a dict of (B, S) arrays, B = ``global_batch_size // shard_count``.

    Raises:
        TypeError / ValueError: naming the argument that is out of range, or when the split or shard holds
            no document. A token id at or above the vocabulary size raises ValueError when its document is
            read.
    """
    import grain

    if not isinstance(source, DocumentSource):
        raise TypeError(
            f"source must be a DocumentSource (TextFileSource, TokenArraySource), got {type(source).__name__}"
        )
    seq_len = _check_int("seq_len", seq_len, minimum=1)
    global_batch_size = _check_int("global_batch_size", global_batch_size, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    if seed >= 2**32:
        raise ValueError(f"seed must be < 2**32, got {seed}")
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be a bool, got {shuffle!r}")
    if num_epochs is not None:
        num_epochs = _check_int("num_epochs", num_epochs, minimum=1)
    try:
        split = Split(split)
    except ValueError:
        raise ValueError(f"split must be one of {[s.value for s in Split]}, got {split!r}") from None
    if not isinstance(validation_fraction, int | float) or isinstance(validation_fraction, bool):
        raise TypeError(f"validation_fraction must be a float, got {validation_fraction!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if split is Split.VALIDATION and validation_fraction == 0.0:
        raise ValueError("split='validation' needs validation_fraction > 0")
    if vocab_size is not None:
        vocab_size = _check_int("vocab_size", vocab_size, minimum=1)
    elif source.vocab_size is not None:
        vocab_size = _check_int("source.vocab_size", source.vocab_size, minimum=1)
    shard_count = jax.process_count() if shard_count is None else _check_int("shard_count", shard_count, minimum=1)
    shard_index = jax.process_index() if shard_index is None else _check_int("shard_index", shard_index, minimum=0)
    if shard_index >= shard_count:
        raise ValueError(f"shard_index={shard_index} must be < shard_count={shard_count}")
    if global_batch_size % shard_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by shard_count={shard_count}")
    batch_size = global_batch_size // shard_count
    num_threads = _check_int("num_threads", num_threads, minimum=0)
    prefetch = _check_int("prefetch", prefetch, minimum=0)
    row_shuffle_window = _check_int("row_shuffle_window", row_shuffle_window, minimum=0)

    wanted = split is Split.VALIDATION
    indices = [
        i for i in range(len(source)) if is_validation_document(source.document_key(i), validation_fraction) is wanted
    ]
    if not indices:
        raise ValueError(
            f"split={split.value!r} of the {len(source)} documents of {source!r} is empty at "
            f"validation_fraction={validation_fraction}"
        )
    if shard_count > len(indices):
        raise ValueError(
            f"shard_count={shard_count} exceeds the {len(indices)} documents of split={split.value!r}; "
            "every shard needs at least one"
        )
    num_documents = len(range(shard_index, len(indices), shard_count))

    def read(index: int) -> dict[str, np.ndarray]:
        doc = source[int(index)]
        if vocab_size is not None and doc.size and int(doc.max()) >= vocab_size:
            raise ValueError(
                f"document {source.document_key(int(index))!r} holds token id {int(doc.max())} >= "
                f"vocab_size={vocab_size}"
            )
        return {"tokens": doc}

    docs = grain.MapDataset.source(indices)[shard_index::shard_count]
    if shuffle:
        docs = docs.shuffle(seed=seed)
    docs = docs.repeat(num_epochs).map(read)
    rows = docs.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))
    rows = grain.experimental.ConcatThenSplitIterDataset(
        rows.filter(lambda d: d["tokens"].size > 0), length_struct={"tokens": seq_len + 1}
    )
    if shuffle and row_shuffle_window > 1:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=row_shuffle_window, seed=seed)
    batches = rows.batch(batch_size, drop_remainder=False).map(
        lambda b: _batch_from_rows(b["tokens"], b["tokens_segment_ids"], batch_size)
    )
    if prefetch:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
    config = {
        "source": type(source).__name__,
        "num_source_documents": len(source),
        "seq_len": seq_len,
        "global_batch_size": global_batch_size,
        "seed": seed,
        "shuffle": shuffle,
        "row_shuffle_window": row_shuffle_window if shuffle else 0,
        "num_epochs": num_epochs,
        "split": split.value,
        "validation_fraction": float(validation_fraction),
        "shard_index": shard_index,
        "shard_count": shard_count,
    }
    return BatchIterator(batches, seq_len=seq_len, batch_size=batch_size, num_documents=num_documents, config=config)


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """The process-local batch as global arrays whose batch axis is split over ``("data", "fsdp")``.

    Every process passes its own rows (from its own shard); the global batch stacks them in process order.
    The placement is :func:`~xlstm_jax.models.xlstm_parallel.sharding.batch_sharding`.

    Args:
        batch: (B_local, S) arrays (e.g. a batch of :class:`BatchIterator`).
        mesh: the ``("data", "fsdp", "tensor")`` mesh.

    Returns:
        The same keys, each a ``jax.Array`` of shape (B_local * jax.process_count(), S) with sharding
        ``batch_sharding(mesh)``.

    Raises:
        ValueError: an array is not 2-D, or the global batch is not a multiple of ``data * fsdp``.
    """
    sharding = batch_sharding(mesh)
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    out = {}
    for key, value in batch.items():
        arr = np.asarray(value)
        if arr.ndim != 2:
            raise ValueError(f"batch[{key!r}] must be (B, S), got shape {arr.shape}")
        global_rows = arr.shape[0] * jax.process_count()
        if global_rows % ways:
            raise ValueError(
                f"batch[{key!r}] has {arr.shape[0]} rows per process ({global_rows} in all), which do not "
                f"split over the {ways} devices of mesh axes {BATCH_AXES}"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, arr)
    return out


# ----------------------------------------------------------------------------------------------------------
# The standard-library corpus
# ----------------------------------------------------------------------------------------------------------


def stdlib_python_files(root: str | os.PathLike | None = None, *, include_tests: bool = False) -> list[Path]:
    """The Python source files of the standard library, sorted: a corpus present on every machine.

    Args:
        root: the folder to list; None takes ``sysconfig.get_paths()["stdlib"]``.
        include_tests: also list the files under folders named ``test``, ``tests`` or ``idle_test``.

    Returns:
        The ``*.py`` files below ``root``, outside ``site-packages``, ``dist-packages`` and ``__pycache__``,
        sorted by their path relative to ``root``.
    """
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not base.is_dir():
        raise ValueError(f"root={str(base)!r} is not a directory")
    skip = _NOT_STDLIB if include_tests else _NOT_STDLIB | _TEST_FOLDERS
    files = []
    for folder, subfolders, names in os.walk(base):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    if not files:
        raise ValueError(f"root={str(base)!r} holds no .py files")
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def unigram_entropy(paths: str | os.PathLike | Iterable[str | os.PathLike], *, unit: str = "nats") -> float:
    """Entropy of the byte frequencies of the files: the loss per byte of a model that knows only them.

    A language model trained on the files should reach a loss per byte well below it.

    Args:
        paths: files, directories or glob patterns (see :func:`resolve_paths`).
        unit: ``"nats"`` (natural log, the unit of a cross-entropy loss) or ``"bits"``.

    Returns:
        ``-sum_b p(b) log p(b)`` over the byte values b, p the bytes' relative frequencies in all files.
    """
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}")
    counts = np.zeros(256, np.int64)
    for path in resolve_paths(paths):
        counts += np.bincount(np.frombuffer(path.read_bytes(), np.uint8), minlength=256)
    total = counts.sum()
    if total == 0:
        raise ValueError(f"paths={paths!r} hold no bytes")
    p = counts[counts > 0] / total
    h = float(-(p * np.log(p)).sum())
    return h / math.log(2) if unit == "bits" else h
