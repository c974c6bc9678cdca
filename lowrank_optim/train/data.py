"""Training data: token streams packed into fixed-length sequences, with a fixed held-out split.

Three sources, each giving a :class:`Corpus` (train and held-out token streams) or, for C4, a stream:

* ``None`` (the default): the Python standard library's own source files, an offline corpus present
  on every machine. Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``,
  ``dist-packages`` and ``__pycache__`` left out), in sorted order of their relative paths; each file's
  bytes are its tokens (ids 0..255), and documents are separated by the end-of-sequence id 257
  (256 is beginning-of-sequence and 258 padding, unused here), so a config needs ``vocab_size >= 259``.
  A file is held out when the first 8 bytes of the SHA-256 of its relative path (with ``/``), read
  as an integer, are 0 mod 20: about 5% of the files, the same files on every machine with the same
  Python version (CPython 3.11: about 31 MB of source, 1.5 MB held out). Nothing is cached: the
  files are read at start-up, well under a second.
* a local path: a ``.jsonl`` file (one JSON object a line with a ``"text"`` string), any other file
  (read as one text document), or a folder (every ``*.txt``, ``*.md`` and ``*.jsonl`` file in it,
  recursively, sorted). Byte-level tokens as above, or a Hugging Face tokenizer with ``tokenizer=``.
  Documents are held out by the same hash of their name (``path`` or ``path:line``); when that leaves
  either side empty (one file, say), the last 5% of the token stream is held out instead.
* ``"c4"``: ``datasets.load_dataset("allenai/c4", "en", streaming=True)``, the train split shuffled
  with the run's seed (buffer 10,000 documents), held out from the validation split, tokenized by a
  named tokenizer (``t5-base`` by default, as in the GaLore paper). It needs the network.

Sequences are windows of ``seq_len + 1`` tokens at stride ``seq_len`` (inputs and shifted targets),
packed across document boundaries. The training windows are visited in a random order drawn from
``numpy.random.default_rng([seed, epoch])`` once per epoch, so the data position (a count of global
sequences consumed) and the seed determine every batch: nothing else needs saving to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TrainError, require

BOS, EOS, PAD = 256, 257, 258
BYTE_VOCAB = 259  # the smallest vocab_size that holds bytes, bos, eos and pad
HELDOUT_EVERY = 20  # one document in 20 (5%) is held out
DEFAULT_TOKENIZER = "t5-base"
_TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def is_heldout(name: str) -> bool:
    """Whether the document called ``name`` is in the held-out split (a stable hash of the name)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_EVERY == 0


@dataclass
class Corpus:
    """Train and held-out token streams (1-D integer arrays), and what identifies them."""

    name: str
    train: np.ndarray
    heldout: np.ndarray
    vocab_needed: int  # the smallest vocab_size that holds every id
    spec: dict[str, Any] = field(default_factory=dict)  # compared on --resume

    def sequences(self, seq_len: int, seed: int) -> PackedSequences:
        return PackedSequences(self.train, seq_len, seed)

    def heldout_sequences(self, seq_len: int, max_tokens: int) -> torch.Tensor:
        return heldout_windows(self.heldout, seq_len, max_tokens)


# --------------------------------------------------------------------------- tokenization
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-sequence 257."""

    name = "bytes"
    eos_id = EOS
    vocab_needed = BYTE_VOCAB

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8)


class HFTokenizer:
    """A Hugging Face tokenizer by name or local path; documents end with its eos id."""

    def __init__(self, name: str) -> None:
        transformers = require("transformers", f"the tokenizer {name!r}")
        auto = transformers.AutoTokenizer
        try:  # a local folder or the Hugging Face cache first: no network, no retries
            self.tok = auto.from_pretrained(name, local_files_only=True)
        except Exception:
            self.tok = None
        if self.tok is None:
            check_hub(f"the tokenizer {name!r}")
            try:
                self.tok = auto.from_pretrained(name)
            except Exception as err:  # OSError offline, ValueError for odd names, ...
                raise TrainError(
                    f"could not load the tokenizer {name!r} ({_first_line(err)}); it needs the network or a "
                    "local copy (a folder path, or the Hugging Face cache)"
                ) from None
        self.name = name
        eos = self.tok.eos_token_id
        if eos is None:
            raise TrainError(f"the tokenizer {name!r} has no end-of-sequence token to separate documents")
        self.eos_id = int(eos)
        self.vocab_needed = tokenizer_vocab_needed(self.tok)

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)


def check_hub(what: str, timeout: float = 5.0) -> None:
    """Fail at once, in one line, when the Hugging Face Hub cannot be reached (rather than after
    huggingface_hub's minute of logged retries)."""
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise TrainError(f"{what} is not available locally and HF_HUB_OFFLINE is set")
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise TrainError(f"{what} needs the network, and {host}:{port} cannot be reached "
                         f"({err.strerror or err}); offline, use the default corpus or --data PATH") from None


def tokenizer_vocab_needed(tok: Any) -> int:
    """The smallest ``vocab_size`` that holds every id the tokenizer gives plain text, and its eos.

    Added special tokens that text never produces (T5's 100 ``<extra_id_*>`` sentinels) are not
    counted, so ``t5-base`` (32,100 entries) fits the GaLore configs' 32,000, as in that paper.
    """
    extra = getattr(tok, "additional_special_tokens", None) or getattr(tok, "extra_special_tokens", None) or []
    if isinstance(extra, dict):
        extra = list(extra.values())
    extra = {str(t) for t in extra}
    ids = [i for t, i in tok.get_vocab().items() if t not in extra]
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    return max(ids) + 1


def make_tokenizer(name: str | None) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if name in (None, "bytes") else HFTokenizer(name)


# --------------------------------------------------------------------------- corpora
def _pack(docs: list[np.ndarray], eos: int, dtype: np.dtype) -> np.ndarray:
    if not docs:
        return np.zeros(0, dtype=dtype)
    parts = []
    sep = np.array([eos], dtype=dtype)
    for d in docs:
        parts.append(d.astype(dtype, copy=False))
        parts.append(sep)
    return np.concatenate(parts)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode())
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()[:16]


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[tuple[str, Path]]:
    """``(relative path with /, path)`` of every ``*.py`` file of the standard library, sorted."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise TrainError(f"the standard library folder {str(base)!r} does not exist; pass --data PATH")
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                p = Path(dirpath, f)
                out.append((p.relative_to(base).as_posix(), p))
    out.sort(key=lambda item: item[0])
    return out


def stdlib_corpus(root: str | os.PathLike[str] | None = None) -> Corpus:
    """The default corpus: the standard library's ``*.py`` files, byte-level (see the module doc)."""
    files = stdlib_files(root)
    if not files:
        raise TrainError(f"no *.py files under {root or sysconfig.get_paths()['stdlib']!r}; pass --data PATH")
    train, held = [], []
    for rel, path in files:
        try:
            data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        except OSError:
            continue  # unreadable files are left out (the digest below notices a different corpus)
        (held if is_heldout(rel) else train).append(data)
    train_arr, held_arr = _pack(train, EOS, np.uint16), _pack(held, EOS, np.uint16)
    import sys

    spec = {"data": "stdlib", "tokenizer": "bytes", "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "digest": _digest(train_arr, held_arr)}
    name = (f"Python {spec['python']} standard library source, byte-level: {len(train)} files / "
            f"{len(train_arr):,} tokens for training, {len(held)} files / {len(held_arr):,} tokens held out")
    return Corpus(name, train_arr, held_arr, BYTE_VOCAB, spec)


def _read_documents(path: Path) -> list[tuple[str, str | bytes]]:
    """``(name, text)`` documents of a local file or folder (see the module doc)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise TrainError(f"--data {str(path)!r}: the folder holds no *.txt, *.md or *.jsonl file")
        docs = []
        for f in files:
            docs.extend(_read_file(f, f.relative_to(path).as_posix()))
        return docs
    if path.is_file():
        return _read_file(path, path.name)
    raise TrainError(f"--data {str(path)!r}: no such file or folder (give a text/JSONL path, or c4)")


def _read_file(path: Path, name: str) -> list[tuple[str, str | bytes]]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TrainError(f"--data: cannot read {str(path)!r}: {err.strerror or err}") from None
    if path.suffix.lower() != ".jsonl":
        return [(name, raw)] if raw else []
    docs = []
    for i, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise TrainError(f"--data: {str(path)!r} line {i} is not JSON ({err.msg})") from None
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise TrainError(f"--data: {str(path)!r} line {i} has no \"text\" string (JSONL needs one object a line with \"text\")")
        docs.append((f"{name}:{i}", text))
    return docs


def local_corpus(path: str | os.PathLike[str], tokenizer: str | None = None) -> Corpus:
    """A corpus from a local text/JSONL file or a folder of them (see the module doc)."""
    p = Path(path)
    docs = _read_documents(p)
    tok = make_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_needed <= 2**16 else np.int32
    train, held = [], []
    for name, text in docs:
        ids = tok.encode(text)
        (held if is_heldout(name) else train).append(ids)
    split = "held out by document"
    if not train or not held:
        stream = _pack(train + held, tok.eos_id, dtype)
        cut = len(stream) - max(1, len(stream) // HELDOUT_EVERY)
        train_arr, held_arr = stream[:cut], stream[cut:]
        split = "the last 5% of tokens held out"
    else:
        train_arr, held_arr = _pack(train, tok.eos_id, dtype), _pack(held, tok.eos_id, dtype)
    spec = {"data": str(p.resolve()), "tokenizer": tok.name, "digest": _digest(train_arr, held_arr)}
    name = (f"{p} ({tok.name} tokens): {len(docs)} documents, {len(train_arr):,} tokens for training, "
            f"{len(held_arr):,} held out ({split})")
    return Corpus(name, train_arr, held_arr, tok.vocab_needed, spec)


# --------------------------------------------------------------------------- sequences
class PackedSequences:
    """Windows of ``seq_len + 1`` tokens at stride ``seq_len``, visited in a seeded random order.

    ``get(start, count)`` returns the global sequences ``start .. start + count - 1`` of the run as a
    ``[count, seq_len + 1]`` int64 tensor; sequence ``i`` is window ``perm_e[i mod n]`` of epoch
    ``e = i // n``, with ``perm_e`` a permutation from ``numpy.random.default_rng([seed, e])``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.n = (len(tokens) - 1) // seq_len if len(tokens) > seq_len else 0
        if self.n == 0:
            raise TrainError(f"the training data has {len(tokens)} tokens, fewer than one sequence of --seq-len {seq_len} + 1")
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def get(self, start: int, count: int) -> torch.Tensor:
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for j in range(count):
            epoch, i = divmod(start + j, self.n)
            w = int(self._perm(epoch)[i]) * self.seq_len
            out[j] = self.tokens[w: w + self.seq_len + 1]
        return torch.from_numpy(out)


def heldout_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The fixed evaluation set: up to ``max_tokens // seq_len`` windows, evenly spaced over the
    held-out stream (all of them when it is shorter)."""
    n = (len(tokens) - 1) // seq_len if len(tokens) > seq_len else 0
    if n == 0:
        raise TrainError(f"the held-out data has {len(tokens)} tokens, fewer than one sequence of --seq-len {seq_len} + 1")
    want = max(1, max_tokens // seq_len)
    idx = np.unique(np.linspace(0, n - 1, min(n, want)).round().astype(np.int64))
    out = np.stack([tokens[i * seq_len: i * seq_len + seq_len + 1].astype(np.int64) for i in idx])
    return torch.from_numpy(out)


class StreamingSequences:
    """Sequences packed on the fly from a document iterator (C4). ``get`` must be called with
    non-decreasing starts; a start behind the cursor (a resume) re-reads the stream from its beginning
    and skips, which is exact but costs the skipped documents' reading and tokenization."""

    def __init__(self, documents: Callable[[], Iterator[str]], tokenizer: Any, seq_len: int, what: str) -> None:
        self._documents = documents
        self.tok = tokenizer
        self.seq_len = seq_len
        self.what = what
        self._it: Iterator[np.ndarray] | None = None
        self._cursor = 0

    def _windows(self) -> Iterator[np.ndarray]:
        buf = np.zeros(0, dtype=np.int64)
        for text in self._documents():
            ids = self.tok.encode(text)
            buf = np.concatenate([buf, ids.astype(np.int64), np.array([self.tok.eos_id])])
            while len(buf) >= self.seq_len + 1:
                yield buf[: self.seq_len + 1].copy()
                buf = buf[self.seq_len:]

    def _next(self) -> np.ndarray:
        try:
            return next(self._it)
        except StopIteration:
            raise TrainError(f"{self.what} ran out of data") from None
        except TrainError:
            raise
        except Exception as err:  # network failures surface here, at the first read
            raise TrainError(f"could not read {self.what} ({_first_line(err)}); is the network reachable?") from None

    def get(self, start: int, count: int) -> torch.Tensor:
        if self._it is None or start < self._cursor:
            self._it, self._cursor = self._windows(), 0
        while self._cursor < start:
            self._next()
            self._cursor += 1
        rows = [self._next() for _ in range(count)]
        self._cursor += count
        return torch.from_numpy(np.stack(rows))


def c4_sources(tokenizer: str | None, seq_len: int, seed: int, eval_tokens: int) -> tuple[StreamingSequences, torch.Tensor, int, dict[str, Any]]:
    """C4 (English) streamed with ``datasets``: (training sequences, held-out windows from the
    validation split, vocab needed, spec)."""
    try:
        import datasets
    except ImportError:
        raise TrainError('--data c4 needs the datasets package: pip install "lowrank-optim[c4]"') from None
    tok = HFTokenizer(tokenizer or DEFAULT_TOKENIZER)

    def load(split: str) -> Any:
        check_hub("--data c4 (allenai/c4)")
        try:
            return datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
        except Exception as err:
            raise TrainError(f"could not open allenai/c4 ({_first_line(err)}); --data c4 needs the network "
                             "(use the default corpus or --data PATH offline)") from None

    train = load("train").shuffle(seed=seed, buffer_size=10_000)
    valid = load("validation")
    seqs = StreamingSequences(lambda: (d["text"] for d in train), tok, seq_len, "allenai/c4 (train)")
    held = StreamingSequences(lambda: (d["text"] for d in valid), tok, seq_len, "allenai/c4 (validation)")
    n = max(1, eval_tokens // seq_len)
    heldout = held.get(0, n)
    spec = {"data": "c4", "tokenizer": tok.name}
    return seqs, heldout, tok.vocab_needed, spec


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


__all__ = ["BOS", "BYTE_VOCAB", "EOS", "PAD", "ByteTokenizer", "Corpus", "HFTokenizer", "PackedSequences",
           "StreamingSequences", "c4_sources", "heldout_windows", "is_heldout", "local_corpus", "stdlib_corpus",
           "stdlib_files", "tokenizer_vocab_needed"]
