"""Content hashes of files, remembered by their stat, so an unchanged file is not read again.

The shard cache names a corpus by a hash of its files' contents (bstc.runtime.shards); reading
every byte of a large corpus on every run to find that name costs seconds to minutes.
`FileHashes` keeps, in one JSON file in the cache directory, each file's stat — size, mtime,
ctime, inode — and the hash of its bytes, and reads a file again only when that stat changed.
ctime is part of it because the kernel sets it on every write and every `utime`, so a file
edited and given back its old mtime is still read again.

A file written again within the clock tick in which it was hashed could keep the very same
stat (git's "racily clean" entries), so an entry is trusted only for a file whose mtime and
ctime are at least `RACY_NS` older than the moment its hashing began; a younger file is hashed
again on the next run. The record is an optimisation: an unreadable one is ignored and one
that cannot be written is skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

RACY_NS = 2_000_000_000  # coarser than any file system's timestamps (FAT: 2 s)


def file_digest(path: Path) -> str:
    """The hash of a file's bytes, read in chunks."""
    from bstc.runtime.errors import DataError

    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from None


class FileHashes:
    """`digest(path)` of many files, backed by the record `store` (None: nothing remembered)."""

    def __init__(self, store: Path | None):
        self.store = store
        self.entries: dict[str, dict] = {}
        self.changed = False
        if store is not None:
            try:
                entries = json.loads(Path(store).read_text())
                self.entries = entries if isinstance(entries, dict) else {}
            except (OSError, ValueError):
                pass

    def digest(self, path: Path) -> str:
        name = os.path.abspath(path)
        try:
            st = os.stat(path)
        except OSError:
            return file_digest(path)  # raises the one-line error
        stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        e = self.entries.get(name)
        if (isinstance(e, dict) and e.get("stat") == stat and isinstance(e.get("hashed_at"), int)
                and max(st.st_mtime_ns, st.st_ctime_ns) + RACY_NS <= e["hashed_at"]):
            return e["hash"]
        hashed_at = time.time_ns()  # before reading: a write during the read makes the entry racy
        h = file_digest(path)
        self.entries[name] = dict(stat=stat, hashed_at=hashed_at, hash=h)
        self.changed = True
        return h

    def save(self) -> None:
        """Write the record (atomically; entries of files that are gone are dropped)."""
        if self.store is None or not self.changed:
            return
        keep = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        tmp = Path(self.store).with_name(f".{Path(self.store).name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            Path(self.store).parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(keep))
            tmp.replace(self.store)  # concurrent runs: the last writer's record wins, none is torn
            self.changed = False
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
