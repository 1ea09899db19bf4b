"""Pre-tokenised shards: a corpus encoded once, then read from memory-mapped files.

The first run on a corpus (or `bstc data prepare`) encodes it and writes, per split, the token
stream as a raw array (`train.bin`, `validation.bin`, `test.bin`) with a `meta.json` (dtype,
lengths, the bytes each split stands for, the tokenizer), into

    CACHE/<key>/        CACHE = $BSTC_DATA_CACHE, else ~/.cache/bstc/data (XDG_CACHE_HOME)

where <key> is a hash of the format version, the tokenizer's fingerprint (a hash of its file, or
`bytes:EOS`), the text field, and every file's name and **contents** (a hash of its bytes) — so
an edited, added or removed file, another tokenizer or another field gives another key, and a
stale shard is never read. Later runs memory-map the arrays; they read a file's bytes again
only when its stat (size, mtime, ctime, inode) changed (bstc.runtime.file_hashes). A shard
directory is written under a temporary name and renamed when complete, so an interrupted write
is never read; a cache that cannot be written is skipped with a warning. `BSTC_DATA_CACHE=off`
disables it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

VERSION = 1
SPLITS = ("train", "validation", "test")
HASHES = "file-hashes.json"  # in the cache directory: content hashes by stat (bstc.runtime.file_hashes)


def cache_dir() -> Path | None:
    where = os.environ.get("BSTC_DATA_CACHE", "")
    if where.lower() in ("0", "off", "no", "false"):
        return None
    if where:
        return Path(where).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bstc" / "data"


def corpus_key(data: str | None, text_field: str, tokenizer, root: Path | None = None) -> str:
    """The hash that names a corpus's shards (see the module docstring). With a cache directory
    `root`, the files' content hashes are remembered there by their stat (bstc.runtime.file_hashes),
    so a later run reads only the files that changed."""
    from bstc.runtime import data as D
    from bstc.runtime.file_hashes import FileHashes

    named = D.stdlib_files() if data in (None, D.DEFAULT_CORPUS) else D.user_files(data)
    hashes = FileHashes(Path(root) / HASHES if root is not None else None)
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([VERSION, tokenizer.fingerprint, text_field]).encode())
    for name, path in named:
        h.update(name.encode("utf-8", "surrogatepass") + b"\0" + hashes.digest(path).encode() + b"\0")
    hashes.save()
    return h.hexdigest()


def read(key: str, root: Path | None = None):
    """The shard `key` as a Corpus of memory-mapped arrays, or None when absent or unreadable."""
    from bstc.runtime.data import Corpus

    root = root or cache_dir()
    if root is None:
        return None
    d = Path(root) / key
    try:
        meta = json.loads((d / "meta.json").read_text())
        if meta.get("version") != VERSION:
            return None
        dt = np.dtype(meta["dtype"])
        streams = {}
        for s in SPLITS:
            n = int(meta["tokens"][s])
            if (d / f"{s}.bin").stat().st_size != n * dt.itemsize:
                return None  # truncated: encode again
            streams[s] = np.memmap(d / f"{s}.bin", dt, mode="r", shape=(n,)) if n else np.zeros(0, dt)
        if meta.get("skipped"):
            print(f"bstc: --data: skipped {len(meta['skipped'])} binary file(s): {', '.join(meta['skipped'][:5])}"
                  + (" …" if len(meta["skipped"]) > 5 else ""), file=sys.stderr, flush=True)
        return Corpus(streams, {s: int(meta["bytes"][s]) for s in SPLITS})
    except (OSError, ValueError, KeyError, TypeError):
        return None


_warned = False


def write(key: str, corpus, info: dict, root: Path | None = None) -> Path | None:
    """Write `corpus` as shard `key` (atomically: a temporary directory renamed when complete)."""
    global _warned
    root = root or cache_dir()
    if root is None:
        return None
    dest = Path(root) / key
    # a name of its own per writer: processes of a multi-host run may share the cache directory
    tmp = Path(root) / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        dt = np.result_type(*[v.dtype for v in corpus.values()])
        for s in SPLITS:
            np.ascontiguousarray(corpus[s], dt).tofile(tmp / f"{s}.bin")
        meta = dict(version=VERSION, dtype=dt.name, tokens={s: int(len(corpus[s])) for s in SPLITS},
                    bytes={s: int(corpus.n_bytes[s]) for s in SPLITS},
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"), **info)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            tmp.rename(dest)
        except OSError:  # written meanwhile by another process: theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
        return dest
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _warned:
            _warned = True
            print(f"bstc: warning: cannot write the data cache {root}: {e.strerror or e}; "
                  "encoding without it (set BSTC_DATA_CACHE to move it)", file=sys.stderr, flush=True)
        return None


def load(data: str | None, text_field: str, tokenizer, progress: Callable[[str, int], None] | None = None,
         use_cache: bool = True):
    """The corpus's token streams: from the cache when its shard exists, else encoded (and then
    cached). Returns (corpus, shard directory or None, whether it was read from the cache)."""
    from bstc.runtime import data as D

    root = cache_dir() if use_cache else None
    key = corpus_key(data, text_field, tokenizer, root) if root is not None else None
    if key is not None:
        hit = read(key, root)
        if hit is not None:
            return hit, Path(root) / key, True
    skipped: list[str] = []
    files = D.corpus_documents(data, text_field, skipped=skipped)
    corpus = D.split_streams(D.encode_files(files, tokenizer, progress=progress))
    where = None
    if key is not None:
        where = write(key, corpus, dict(data=data or D.DEFAULT_CORPUS, text_field=text_field,
                                        tokenizer=tokenizer.describe(), files=len(files), skipped=skipped), root)
    return corpus, where, False


def prepare(data: str | None, text_field: str, tokenizer, progress: bool = True) -> dict:
    """`bstc data prepare`: encode the corpus into the cache ahead of training (with a progress
    bar over its files), or find it there. Returns what was done, for the command's report."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bstc.runtime import data as D
    from bstc.runtime.errors import UsageError

    root = cache_dir()
    if root is None:
        raise UsageError("the data cache is off (BSTC_DATA_CACHE=off): there is nowhere to prepare shards")
    n_files = len(D.stdlib_files() if data in (None, D.DEFAULT_CORPUS) else D.user_files(data))
    t0 = time.perf_counter()
    bar = Progress(TextColumn("[bold blue]encode"), BarColumn(bar_width=30), MofNCompleteColumn(),
                   TextColumn("files · {task.fields[tokens]:,} tokens"), TimeElapsedColumn(),
                   console=Console(stderr=True), disable=not progress, transient=False)
    with bar:
        task = bar.add_task("encode", total=n_files, tokens=0)
        seen = {"tokens": 0}

        def step(name: str, tokens: int) -> None:
            seen["tokens"] += tokens
            bar.update(task, advance=1, tokens=seen["tokens"])

        corpus, where, hit = load(data, text_field, tokenizer, progress=step)
        if hit:
            bar.update(task, completed=n_files, tokens=sum(len(v) for v in corpus.values()))
    if where is None:
        raise UsageError(f"could not write the data cache {root}")
    return dict(path=where, cached=hit, seconds=time.perf_counter() - t0, files=n_files,
                tokens={s: int(len(corpus[s])) for s in SPLITS}, bytes=dict(corpus.n_bytes),
                bytes_per_token={s: corpus.bytes_per_token(s) for s in SPLITS}, corpus=corpus)


def measure_loader(corpus, batch: int = 8, seq_len: int = 512, batches: int = 200, seed: int = 0) -> dict:
    """The training data loader on `corpus` (packing, shuffling, batching through grain, as
    `bstc train` reads it): milliseconds per batch of batch × seq_len tokens, and tokens per second."""
    from bstc.runtime import data as D

    src = D.PackedText(corpus["train"], seq_len, corpus.bytes_per_token("train"))
    it = D.train_iterator(src, batch, seed)
    for _ in range(5):  # warm up: threads started, first pages mapped
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = (time.perf_counter() - t0) / batches
    return dict(ms_per_batch=1e3 * dt, tokens_per_s=batch * seq_len / dt, batch=batch, seq_len=seq_len)
