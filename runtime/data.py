"""Data: byte-level tokens, packed into fixed-length sequences, served by grain.

Sources
  * the embedded default corpus: the `.py` sources of the running interpreter's standard
    library (a real code corpus that needs no download), split by file into train/validation/test;
  * user text: `--data` files, directories or globs;
  * synthetic long-range tasks (associative recall, copy, induction) generated on the fly.

Every example is a dict of `inputs` (L,) int32, `targets` (L,) int32 and `mask` (L,) float32;
the loss is averaged over mask == 1 (all positions for text, the answers for a task).
Training iterators are grain `DatasetIterator`s whose `get_state()` goes into the checkpoint.
"""
from __future__ import annotations

import functools
import glob as _glob
import hashlib
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
    return out


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from None


@functools.lru_cache(maxsize=4)
def load_corpus(data: str | None, vocab: int = 256) -> dict[str, np.ndarray]:
    """Token streams (uint16) per split. Files are split by name when there are enough of them
    for every split to get some; otherwise the joined stream is cut 90/5/5 by position."""
    named = stdlib_files() if data in (None, DEFAULT_CORPUS) else user_files(data)
    eos = np.array([eos_token(vocab)], np.uint16)
    docs = {s: [] for s in SPLITS}
    blobs, skipped = [], []
    user = data not in (None, DEFAULT_CORPUS)
    # The same rule wherever a file comes from: a file with a NUL byte in its first 8 KiB is
    # binary. Named directly it is refused; found in a directory or by a glob it is skipped.
    direct = {Path(s.strip()).expanduser() for s in data.split(",")} if user else set()
    for name, path in named:
        b = _read(path)
        if user and b"\x00" in b[:8192]:
            if path in direct:
                raise DataError(f"--data file '{path}' is binary, not text")
            skipped.append(name)
            continue
        blobs.append((name, b))
    if skipped:
        print(f"bstc: --data: skipped {len(skipped)} binary file(s): {', '.join(skipped[:5])}"
              + (" …" if len(skipped) > 5 else ""), file=sys.stderr, flush=True)
    if not any(b for _, b in blobs):
        raise DataError(f"--data '{data}' contains no text (all files empty or binary)")
    by_file = {split_of(n) for n, _ in blobs}
    if len(blobs) >= 10 and by_file == set(SPLITS):
        for name, b in blobs:
            docs[split_of(name)] += [np.frombuffer(b, np.uint8).astype(np.uint16), eos]
        return {s: np.concatenate(docs[s]) for s in SPLITS}
    stream = np.concatenate([x for _, b in blobs for x in (np.frombuffer(b, np.uint8).astype(np.uint16), eos)])
    n = len(stream)
    a, b = int(n * 0.9), int(n * 0.95)
    return {"train": stream[:a], "validation": stream[a:b], "test": stream[b:]}


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

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
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
                seed: int, task_args: dict | None = None):
    """The random-access source of examples for one split."""
    if task:
        try:
            t = Task(task, seq_len, seed + SPLIT_SEED[split], **(task_args or {}))
        except TypeError as e:
            raise DataError(f"bad task_args for '{task}': {e}") from None
        if vocab < 128:
            raise DataError(f"synthetic tasks use byte tokens < 128; the model's vocab is {vocab}")
        return t
    if vocab < 256:  # text is read as bytes: an id ≥ vocab would be an error in the model
        raise DataError(f"text is read as bytes (ids 0–255), but the model's vocab is {vocab}: "
                        "use vocab ≥ 256 (`--set vocab=256`), or a synthetic --task")
    return PackedText(load_corpus(data, vocab)[split], seq_len)


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
