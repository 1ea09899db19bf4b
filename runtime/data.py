"""Data: byte-level tokens, packed into fixed-length sequences, served by grain.

Sources
  * the embedded default corpus: the `.py` sources of the running interpreter's standard
    library (a real code corpus that needs no download), split by file into train/validation/test;
  * user text: `--data` files, directories or globs: plain text, or records (one document per
    record) in JSON Lines (`.jsonl`), Parquet (`.parquet`) or ArrayRecord (`.arrayrecord`) files;
  * synthetic long-range tasks (associative recall, copy, induction) generated on the fly.

Every example is a dict of `inputs` (L,) int32, `targets` (L,) int32 and `mask` (L,) float32;
the loss is averaged over mask == 1 (all positions for text, the answers for a task).
Training iterators are grain `DatasetIterator`s whose `get_state()` goes into the checkpoint.
(Longer than most modules: every source ends in the same packing and split rules, kept in one
place so that text, records and tasks cannot drift apart.)
"""
from __future__ import annotations

import functools
import glob as _glob
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grain
import numpy as np

from bstc.runtime.errors import DataError

SPLITS = ("train", "validation", "test")
DEFAULT_CORPUS = "stdlib"


def eos_token(vocab: int) -> int:
    """Documents are joined by EOS: token 256 when the model declares room for it, else NUL."""
    return 256 if vocab > 256 else 0


# ---- text corpora ----------------------------------------------------------------------------


def split_of(name: str) -> str:
    """Deterministic split by a file's relative path: 96% train, 2% validation, 2% test."""
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100
    return "test" if h < 2 else "validation" if h < 4 else "train"


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative name, path) of every .py file of this interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                p = Path(dirpath) / f
                out.append((p.relative_to(root).as_posix(), p))
    return out


# Record files: one document per record, its text in a field (--text-field, default `text`).
# The format goes by the file's suffix; every other file is plain text (one document).
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
           ".arrayrecord": "arrayrecord", ".array_record": "arrayrecord"}
# The optional dependency each record format needs: (module, pip extra, what to install).
READERS = {"parquet": ("pyarrow", "parquet", "pyarrow"), "arrayrecord": ("array_record", None, "array-record")}


def file_format(path: Path) -> str:
    """'text' | 'jsonl' | 'parquet' | 'arrayrecord', by suffix."""
    return FORMATS.get(Path(path).suffix.lower(), "text")


def need_reader(fmt: str) -> None:
    """A one-line error naming the extra when a record format's reader is not installed."""
    if fmt not in READERS:
        return
    module, extra, package = READERS[fmt]
    if importlib.util.find_spec(module) is None:
        how = f"pip install 'bstc[{extra}]'" if extra else f"pip install {package}"
        raise DataError(f"reading {fmt.replace('arrayrecord', 'ArrayRecord').replace('parquet', 'Parquet')} "
                        f"files needs the optional dependency {package}: {how}")


def user_files(spec: str) -> list[tuple[str, Path]]:
    """Resolve `--data`: comma-separated files, directories (recursive) and globs."""
    out: list[tuple[str, Path]] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        p = Path(part).expanduser()
        if p.is_file():
            out.append((p.name, p))
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*")
                           if q.is_file() and not any(s.startswith(".") for s in q.relative_to(p).parts))
            if not found:
                raise DataError(f"--data directory '{part}' contains no files")
            out += [(q.relative_to(p).as_posix(), q) for q in found]
        elif any(c in part for c in "*?["):
            found = sorted(Path(q) for q in _glob.glob(os.path.expanduser(part), recursive=True))
            found = [q for q in found if q.is_file()]
            if not found:
                raise DataError(f"--data '{part}' matches no files")
            out += [(q.as_posix(), q) for q in found]
        elif p.exists():
            raise DataError(f"--data '{part}' is not a regular file or directory")
        else:
            raise DataError(f"--data '{part}' does not exist")
    if not out:
        raise DataError(f"--data '{spec}' names no files")
    for fmt in sorted({file_format(q) for _, q in out}):
        need_reader(fmt)
    return out


def _field_error(where: str, field: str, have) -> DataError:
    names = ", ".join(sorted(map(str, have))[:8]) or "none"
    return DataError(f"{where} has no field '{field}' (fields: {names}); choose one with --text-field")


def _jsonl_documents(path: Path, field: str) -> list[bytes]:
    docs = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{n}: not a JSON object: {getattr(e, 'msg', e)}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: not a JSON object: a {type(rec).__name__}")
            if field not in rec:
                raise _field_error(f"{path}:{n}", field, rec)
            text = rec[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: field '{field}' is a {type(text).__name__}, not text")
            docs.append(text.encode("utf-8", "surrogatepass"))
    return docs


def _parquet_documents(path: Path, field: str) -> list[bytes]:
    """The texts of a Parquet file, read through grain's Parquet source (which reads with
    pyarrow, the `parquet` extra). pyarrow reads the schema first, so a missing or non-text
    column is one line before any row is read. Grain's source reads every column of a row
    group, not just `field`: a corpus is read once, then its token shards are used."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from grain.experimental import ParquetIterDataset

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        if field not in schema.names:
            raise _field_error(f"Parquet file '{path}'", field, schema.names)
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"Parquet file '{path}': column '{field}' holds {kind}, not text")
        texts = [row[field] for row in ParquetIterDataset(str(path))] if pf.num_row_groups else []
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds; one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read Parquet file '{path}': {msg}") from None
    return [t.encode("utf-8") for t in texts if t is not None]


def _arrayrecord_documents(path: Path, field: str) -> list[bytes]:
    """Records that are JSON objects give their `field`; any other record is the document's text."""
    from grain.sources import ArrayRecordDataSource

    try:
        src = ArrayRecordDataSource([str(path)])
        records = [src[i] for i in range(len(src))]
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read ArrayRecord file '{path}': {msg}") from None
    docs = []
    for n, r in enumerate(records):
        r = bytes(r)
        if r.lstrip()[:1] == b"{":
            try:
                rec = json.loads(r)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
            if isinstance(rec, dict):
                if field not in rec:
                    raise _field_error(f"ArrayRecord file '{path}', record {n}", field, rec)
                if isinstance(rec[field], str):
                    docs.append(rec[field].encode("utf-8"))
                    continue
                raise DataError(f"ArrayRecord file '{path}', record {n}: field '{field}' is a "
                                f"{type(rec[field]).__name__}, not text")
        docs.append(r)
    return docs


def read_documents(path: Path, text_field: str = "text") -> list[bytes]:
    """The documents of a record file (UTF-8 bytes each), or a text file's bytes as one document."""
    fmt = file_format(path)
    need_reader(fmt)
    if fmt == "jsonl":
        try:
            return _jsonl_documents(path, text_field)
        except OSError as e:
            raise DataError(f"cannot read '{path}': {e.strerror or e}") from None
    if fmt == "parquet":
        return _parquet_documents(path, text_field)
    if fmt == "arrayrecord":
        return _arrayrecord_documents(path, text_field)
    return [_read(path)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from None


def corpus_documents(data: str | None, text_field: str = "text",
                     skipped: list[str] | None = None) -> list[tuple[str, list[bytes]]]:
    """(file name, its documents) for the embedded corpus or `--data`, binary text files skipped
    (or refused when named directly); the names of those skipped are appended to `skipped`."""
    named = stdlib_files() if data in (None, DEFAULT_CORPUS) else user_files(data)
    user = data not in (None, DEFAULT_CORPUS)
    files = []
    skipped = skipped if skipped is not None else []
    # The same rule wherever a text file comes from: a file with a NUL byte in its first 8 KiB is
    # binary. Named directly it is refused; found in a directory or by a glob it is skipped.
    # Record files (JSON Lines, Parquet, ArrayRecord) are read by their format instead.
    direct = {Path(s.strip()).expanduser() for s in data.split(",")} if user else set()
    for name, path in named:
        if file_format(path) != "text":
            files.append((name, read_documents(path, text_field)))
            continue
        b = _read(path)
        if user and b"\x00" in b[:8192]:
            if path in direct:
                raise DataError(f"--data file '{path}' is binary, not text")
            skipped.append(name)
            continue
        files.append((name, [b]))
    if skipped:
        print(f"bstc: --data: skipped {len(skipped)} binary file(s): {', '.join(skipped[:5])}"
              + (" …" if len(skipped) > 5 else ""), file=sys.stderr, flush=True)
    if not any(d for _, docs in files for d in docs):
        raise DataError(f"--data '{data}' contains no text (all files empty or binary)")
    return files


def split_files(files: list[tuple[str, Any]]) -> dict[str, list] | None:
    """Files by split when there are enough of them for every split to get some (by a hash of
    the name, `split_of`); None when the joined stream is to be cut 90/5/5 by position."""
    if len(files) >= 10 and {split_of(n) for n, _ in files} == set(SPLITS):
        out: dict[str, list] = {s: [] for s in SPLITS}
        for name, x in files:
            out[split_of(name)].append(x)
        return out
    return None


def cut_stream(stream: np.ndarray) -> dict[str, np.ndarray]:
    n = len(stream)
    a, b = int(n * 0.9), int(n * 0.95)
    return {"train": stream[:a], "validation": stream[a:b], "test": stream[b:]}


class Corpus(dict):
    """Token streams per split, and the UTF-8 bytes each split's tokens stand for (the document
    separator counts as one byte, as in the byte-level streams), for bits per byte."""

    def __init__(self, streams: dict[str, np.ndarray], n_bytes: dict[str, int]):
        super().__init__(streams)
        self.n_bytes = n_bytes

    def bytes_per_token(self, split: str) -> float:
        return self.n_bytes[split] / max(len(self[split]), 1)


def encode_files(files: list[tuple[str, list[bytes]]], tokenizer, progress=None) -> list[tuple[str, np.ndarray, int]]:
    """(name, token stream with EOS after each document, bytes it stands for) per file;
    `progress(name, tokens)` is called after each file."""
    out = []
    for name, docs in files:
        ids = tokenizer.encode_docs(docs)
        dt = np.uint16 if tokenizer.n_ids <= 2**16 else np.uint32
        eos = np.array([tokenizer.eos_id], dt)
        parts = [x for t in ids for x in (t.astype(dt, copy=False), eos)]
        out.append((name, np.concatenate(parts) if parts else np.zeros(0, dt), sum(len(d) + 1 for d in docs)))
        if progress is not None:
            progress(name, len(out[-1][1]))
    return out


def split_streams(encoded: list[tuple[str, np.ndarray, int]]) -> Corpus:
    """The split rules on encoded files: by file name when there are enough files, else the
    joined stream cut 90/5/5 by position (its bytes shared out in proportion to the tokens)."""
    by_split = split_files([(n, (t, b)) for n, t, b in encoded])
    if by_split is not None:
        return Corpus({s: np.concatenate([t for t, _ in by_split[s]]) for s in SPLITS},
                      {s: sum(b for _, b in by_split[s]) for s in SPLITS})
    streams = cut_stream(np.concatenate([t for _, t, _ in encoded]))
    total_tokens = max(sum(len(v) for v in streams.values()), 1)
    total_bytes = sum(b for _, _, b in encoded)
    return Corpus(streams, {s: round(total_bytes * len(streams[s]) / total_tokens) for s in SPLITS})


@functools.lru_cache(maxsize=4)
def load_corpus(data: str | None, vocab: int = 256, text_field: str = "text", tokenizer=None) -> Corpus:
    """Token streams per split. Files are split by name when there are enough of them for every
    split to get some; otherwise the joined stream is cut 90/5/5 by position. Each document (a
    text file, or a record of a record file) is followed by EOS. `tokenizer`: a
    `bstc.runtime.tokenizer.Tokenizer` (default: bytes). The streams come from the shard cache
    (`bstc.runtime.shards`) when the same files were encoded with the same tokenizer before."""
    from bstc.runtime import shards
    from bstc.runtime.tokenizer import Tokenizer

    return shards.load(data, text_field, tokenizer or Tokenizer(vocab))[0]


def training_documents(data: str | None, text_field: str = "text") -> list[bytes]:
    """The documents of the training split, as `load_corpus` splits them (for training a
    tokenizer on the training data alone)."""
    files = corpus_documents(data, text_field)
    by_split = split_files(files)
    if by_split is not None:
        return [d for docs in by_split["train"] for d in docs]
    docs = [d for _, ds in files for d in ds]
    limit, seen, out = 0.9 * sum(len(d) + 1 for d in docs), 0, []
    for d in docs:
        if seen + len(d) + 1 > limit:
            if not out:  # one document: its first 90%
                out.append(d[:int(limit)])
            break
        out.append(d)
        seen += len(d) + 1
    return out


def describe_corpus(data: str | None = None) -> dict[str, Any]:
    """Files and bytes per split, for the docs and `bstc train`'s header."""
    named = stdlib_files() if data in (None, DEFAULT_CORPUS) else user_files(data)
    out = {s: {"files": 0, "bytes": 0} for s in SPLITS}
    for name, path in named:
        s = split_of(name)
        out[s]["files"] += 1
        out[s]["bytes"] += path.stat().st_size
    return out


class PackedText:
    """Random access to fixed-length windows of a token stream: window i covers tokens
    [i*L, i*L + L] (L + 1 tokens: inputs and next-token targets), so each target is used once."""

    def __init__(self, tokens: np.ndarray, seq_len: int, bytes_per_token: float = 1.0):
        self.tokens, self.seq_len = tokens, seq_len
        self.bytes_per_token = bytes_per_token  # for bits per byte: 1 for byte-level tokens
        self.n = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        w = self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1].astype(np.int32)
        return {"inputs": w[:-1], "targets": w[1:], "mask": np.ones(self.seq_len, np.float32)}


# ---- synthetic long-range tasks ----------------------------------------------------------------

KEYS0, VALS0, FILL0 = ord("A"), ord("a"), ord("0")


@dataclass(frozen=True)
class Task:
    """A generated task: example i of a split is a pure function of (seed, i).

    recall     pairs `K v K v ...` at the start, noise, then `K ? K ? ...` queries (every key
               once, shuffled) in the final block; the answers are scored. Chance: 1/values.
    copy       a random string at the start, noise, then `=` and the string again; scored.
    induction  noise with `# X` inserted in the first block; the sequence ends with `#`, and
               the X after it is scored. Chance: 1/26.
    The scored part lies in the last `window` positions while the information sits at the
    start, so a model whose attention sees only its own block cannot do better than chance.
    """

    name: str
    seq_len: int
    seed: int
    pairs: int = 4            # recall: key-value pairs
    values: int = 16          # recall: distinct value tokens (chance = 1/values)
    length: int = 8           # copy: string length
    filler: int = 10          # distinct noise tokens

    def __post_init__(self):
        need = {"recall": 4 * self.pairs + 2, "copy": 2 * self.length + 3, "induction": 6}[self.name]
        if self.seq_len < need:
            raise DataError(f"task '{self.name}' needs seq_len >= {need}, got {self.seq_len}")
        if self.name == "recall" and not (1 <= self.pairs <= 26 and 2 <= self.values <= 26):
            raise DataError("task 'recall' needs 1 <= pairs <= 26 and 2 <= values <= 26")

    @property
    def chance(self) -> float:
        return {"recall": 1 / self.values, "copy": 1 / 26, "induction": 1 / 26}[self.name]

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(i)])
        n = self.seq_len + 1
        seq = FILL0 + rng.integers(0, self.filler, n)
        mask = np.zeros(n, np.float32)  # over seq positions; shifted to targets below
        if self.name == "recall":
            keys = KEYS0 + rng.permutation(26)[: self.pairs]
            vals = VALS0 + rng.integers(0, self.values, self.pairs)
            seq[0: 2 * self.pairs: 2], seq[1: 2 * self.pairs: 2] = keys, vals
            order = rng.permutation(self.pairs)
            q0 = n - 2 * self.pairs
            seq[q0::2], seq[q0 + 1::2] = keys[order], vals[order]
            mask[q0 + 1::2] = 1
        elif self.name == "copy":
            s = VALS0 + rng.integers(0, 26, self.length)
            seq[: self.length] = s
            seq[n - self.length - 1] = ord("=")
            seq[n - self.length:] = s
            mask[n - self.length:] = 1
        else:  # induction
            x = KEYS0 + rng.integers(0, 26)
            p = int(rng.integers(0, max(1, min(self.seq_len // 4, n - 4))))
            seq[p], seq[p + 1] = ord("#"), x
            seq[n - 2], seq[n - 1] = ord("#"), x
            mask[n - 1] = 1
        seq = seq.astype(np.int32)
        return {"inputs": seq[:-1], "targets": seq[1:], "mask": mask[1:]}


class LengthMix:
    """Training examples of several sequence lengths: batch b (examples b·batch … b·batch + batch − 1)
    comes whole from `sources[b mod k]`, so every batch has one shape and the lengths alternate
    step by step. Example i of a source is a pure function of i (synthetic tasks only), so the
    iterator's position alone still resumes a run exactly."""

    def __init__(self, sources: list, batch: int):
        if not all(isinstance(s, Task) for s in sources):
            raise DataError("a length mix needs a synthetic task (--task): text is packed at one length")
        self.sources, self.batch = list(sources), batch

    def __len__(self) -> int:
        return min(len(s) for s in self.sources)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.sources[(int(i) // self.batch) % len(self.sources)][i]


SPLIT_SEED = {"train": 0, "validation": 1_000_003, "test": 2_000_006}


def make_source(*, data: str | None, task: str | None, split: str, seq_len: int, vocab: int,
                seed: int, task_args: dict | None = None, text_field: str = "text", tokenizer=None):
    """The random-access source of examples for one split. `tokenizer`: a
    `bstc.runtime.tokenizer.Tokenizer` for text (default: bytes)."""
    if task:
        try:
            t = Task(task, seq_len, seed + SPLIT_SEED[split], **(task_args or {}))
        except TypeError as e:
            raise DataError(f"bad task_args for '{task}': {e}") from None
        if vocab < 128:
            raise DataError(f"synthetic tasks use byte tokens < 128; the model's vocab is {vocab}")
        return t
    if tokenizer is not None and tokenizer.kind != "bytes":
        if vocab < tokenizer.n_ids:
            raise DataError(f"the tokenizer {tokenizer.describe()} needs vocab >= {tokenizer.n_ids}, "
                            f"but the model's vocab is {vocab}")
    elif vocab < 256:  # text is read as bytes: an id ≥ vocab would be an error in the model
        raise DataError(f"text is read as bytes (ids 0–255), but the model's vocab is {vocab}: "
                        "use vocab ≥ 256 (`--set vocab=256`), or a synthetic --task")
    corpus = load_corpus(data, vocab, text_field, tokenizer)
    return PackedText(corpus[split], seq_len, corpus.bytes_per_token(split))


READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)


def train_iterator(source, batch: int, seed: int, shard: tuple[int, int] = (0, 1)) -> grain.DatasetIterator:
    """Shuffled (a new order every epoch), repeated, batched; checkpointable with get_state().

    shard=(i, n): a multi-process run; this process reads examples i, i+n, i+2n, … of the
    stream and yields batch // n of them per step (the processes together read each batch once)."""
    if len(source) < batch:
        raise DataError(f"training data too small: {len(source)} sequences of "
                        f"{getattr(source, 'seq_len', '?')} tokens, fewer than one batch of {batch}")
    ds = grain.MapDataset.source(source)
    if not isinstance(source, (Task, LengthMix)):  # tasks are already i.i.d. in their index
        ds = ds.shuffle(seed=seed).repeat(None)
    index, count = shard
    if count > 1:
        ds = ds[index::count]
    ds = ds.batch(batch // count, drop_remainder=True)
    return iter(ds.to_iter_dataset(READ))


def eval_batches(source, batch: int, n: int) -> Iterator[dict[str, np.ndarray]]:
    """The first n batches of a split, in order: the same sequences every time."""
    m = min(len(source), batch * n)
    for start in range(0, m, batch):
        items = [source[i] for i in range(start, min(start + batch, m))]
        yield {k: np.stack([it[k] for it in items]) for k in items[0]}
