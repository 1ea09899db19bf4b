"""Tokenizers: bytes (the default), a Hugging Face `tokenizers` JSON file, or a SentencePiece model.

Every tokenizer here turns documents (UTF-8 bytes) into id streams and ids back into text, and
names the id that separates documents (EOS):

* **bytes** — ids 0–255 are the bytes; EOS is 256 when the model's vocab has room, else NUL.
* **Hugging Face** (`tokenizer.json`, read with the `tokenizers` library) — EOS is the first of
  `<|endoftext|>`, `</s>`, `<eos>`, `<|end_of_text|>`, `[SEP]` in its vocabulary; a tokenizer
  with none of them gets one more id (its vocabulary size) for it.
* **SentencePiece** (`*.model`, needs the optional `sentencepiece` package) — its `eos_id`, or
  one more id when it has none.

`Tokenizer.n_ids` (the tokenizer's ids, EOS included) is the smallest model vocab that can read
its output. `bstc tokenizer train` trains a byte-level BPE tokenizer on a corpus (`train_bpe`).
Nothing is ever downloaded: a tokenizer is a file on disk.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from bstc.runtime.errors import DataError, UsageError

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class Tokenizer:
    """The interface the runtime uses; see the module docstring for the three kinds."""

    kind = "bytes"
    path: Path | None = None

    def __init__(self, vocab: int = 256):
        self.eos_id = 256 if vocab > 256 else 0
        self.n_ids = 256

    @property
    def fingerprint(self) -> str:
        """Equal for tokenizers that give equal ids (a hash of the file, or 'bytes:EOS')."""
        return f"bytes:{self.eos_id}"

    def encode_docs(self, docs: list[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(d, np.uint8) for d in docs]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def describe(self) -> str:
        return "bytes"

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)


class _FileTokenizer(Tokenizer):
    def __init__(self, path: Path):
        self.path = Path(path)
        self._hash = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        return f"{self.kind}:{self._hash}:{self.eos_id}"

    def describe(self) -> str:
        return f"{self.path.name} ({self.kind}, {self.n_ids:,} ids, EOS {self.eos_id})"


class HFTokenizer(_FileTokenizer):
    kind = "huggingface"

    def __init__(self, path: Path):
        super().__init__(path)
        from tokenizers import Tokenizer as _T

        try:
            self.tok = _T.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own kinds
            raise UsageError(f"cannot read tokenizer '{path}': {_first_line(e)}") from None
        size = self.tok.get_vocab_size(with_added_tokens=True)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        eos = next((vocab[n] for n in EOS_NAMES if n in vocab), None)
        self.eos_id = size if eos is None else eos
        self.n_ids = max(size, self.eos_id + 1)

    def encode_docs(self, docs: list[bytes]) -> list[np.ndarray]:
        enc = self.tok.encode_batch([d.decode("utf-8", errors="replace") for d in docs], add_special_tokens=False)
        dt = np.uint16 if self.n_ids <= 2**16 else np.uint32
        return [np.asarray(e.ids, dt) for e in enc]

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.eos_id], skip_special_tokens=True)


class SPTokenizer(_FileTokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path):
        super().__init__(path)
        if importlib.util.find_spec("sentencepiece") is None:
            raise UsageError("reading SentencePiece models needs the optional dependency sentencepiece: "
                             "pip install 'bstc[sentencepiece]'")
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"cannot read tokenizer '{path}': not a tokenizers JSON file, and as a "
                             f"SentencePiece model: {_first_line(e)}") from None
        size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else size
        self.n_ids = max(size, self.eos_id + 1)

    def encode_docs(self, docs: list[bytes]) -> list[np.ndarray]:
        dt = np.uint16 if self.n_ids <= 2**16 else np.uint32
        out = self.sp.encode([d.decode("utf-8", errors="replace") for d in docs])
        return [np.asarray(x, dt) for x in out]

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        size = self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in ids if int(i) != self.eos_id and int(i) < size])


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float, size: int) -> Tokenizer:
    p = Path(path)
    head = p.read_bytes()[:64].lstrip()
    return HFTokenizer(p) if head[:1] == b"{" else SPTokenizer(p)


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer file: Hugging Face `tokenizers` JSON (the file is a JSON object), else a
    SentencePiece model. Errors are one line (UsageError)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--tokenizer '{path}' " + ("is not a file" if p.exists() else "does not exist"))
    st = p.stat()
    return _load(str(p.resolve()), st.st_mtime, st.st_size)


def run_tokenizer(run_dir: Path, vocab: int = 256) -> Tokenizer:
    """The tokenizer a run was trained with: its saved copy, or bytes."""
    from bstc.runtime.rundir import RunFiles

    saved = RunFiles(run_dir).saved_tokenizer()
    return load_tokenizer(saved) if saved is not None else Tokenizer(vocab)


def save_to_run(tok: Tokenizer, run_dir: Path) -> Path | None:
    """Copy a tokenizer file into the run directory (tokenizer.json / tokenizer.model)."""
    if tok.path is None:
        return None
    from bstc.runtime.rundir import RunFiles

    dest = RunFiles(run_dir).tokenizer(tok.kind)
    if not dest.exists() or dest.resolve() != tok.path.resolve():
        dest.write_bytes(tok.path.read_bytes())
    return dest


# ---- training a BPE tokenizer on a corpus ---------------------------------------------------------


def train_bpe(data: str | None, vocab: int, out: Path, text_field: str = "text", progress: bool = False) -> HFTokenizer:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenisation and byte alphabet, so every text
    encodes) with `<|endoftext|>` as id 0, trained on the **training split** of `data` (the same
    split `bstc train` uses), saved as a `tokenizers` JSON file."""
    from tokenizers import Tokenizer as _T, decoders, models, pre_tokenizers, trainers

    from bstc.runtime import data as D

    min_vocab = 256 + 1
    if vocab < min_vocab:
        raise UsageError(f"--vocab {vocab} is too small: a byte-level BPE needs at least {min_vocab} "
                         "(256 bytes and the end-of-document token)")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"-o {out} is a directory: give a file name such as tok.json")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: the directory {out.parent} does not exist")
    docs = D.training_documents(data, text_field)
    tok = _T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.decode("utf-8", errors="replace") for d in docs), trainer=trainer,
                            length=len(docs))
    tmp = out.with_name(out.name + ".partial")
    tok.save(str(tmp))
    tmp.replace(out)
    return load_tokenizer(out)


def tokenizer_vocab(overrides: dict, explicit: dict, tok) -> dict:
    """The tokenizer sets the model's vocab as a `--set vocab=` would. An explicit vocab (a --set,
    or `set:` in the run config) at least as large is kept; a smaller one is a located error."""
    from bstc.errors import BstcError, Diagnostic, Span

    if "vocab" not in explicit:
        return {**overrides, "vocab": tok.n_ids}
    v = str(explicit["vocab"]).strip()
    if v.isdigit() and int(v) < tok.n_ids:
        line = f"vocab={v}"
        raise BstcError([Diagnostic(
            Span("<--set>", 1, 7, 1, 7 + len(v)),
            f"--set vocab={v} is smaller than the tokenizer's {tok.n_ids:,} ids ({tok.describe()})",
            f"drop --set vocab (the tokenizer sets it), or give at least {tok.n_ids}")], {"<--set>": line})
    return overrides
