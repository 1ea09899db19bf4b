"""Pre-tokenised shards: written on the first read of a corpus, read back memory-mapped, and
never stale (changed files, another tokenizer or another text field give another shard)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bstc.runtime import shards
from bstc.runtime.tokenizer import Tokenizer, load_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BSTC_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def corpus(d: Path) -> Path:
    d.mkdir()
    for f in range(3):
        (d / f"p{f}.jsonl").write_text("".join(json.dumps({"text": f"file {f} line {i} abc abc", "alt": f"alt {i}"}) + "\n"
                                               for i in range(30)))
    return d


def same(a, b) -> bool:
    return all(np.array_equal(a[s], b[s]) for s in shards.SPLITS) and a.n_bytes == b.n_bytes


def test_the_first_read_writes_shards_and_later_reads_map_them(cache, tmp_path):
    data = str(corpus(tmp_path / "d"))
    tok = Tokenizer(256)
    first, where, hit = shards.load(data, "text", tok)
    assert not hit and where.parent == cache and (where / "train.bin").is_file()
    meta = json.loads((where / "meta.json").read_text())
    assert meta["tokens"]["train"] == len(first["train"]) and meta["tokenizer"] == "bytes"
    again, where2, hit2 = shards.load(data, "text", tok)
    assert hit2 and where2 == where and isinstance(again["train"], np.memmap)
    assert same(first, again)
    # and the cache is what is read: a shard edited behind its back is served as it is
    arr = np.memmap(where / "train.bin", first["train"].dtype, mode="r+")
    arr[0] = 7
    arr.flush()
    assert shards.load(data, "text", tok)[0]["train"][0] == 7


def test_changed_files_another_tokenizer_or_field_invalidate(cache, tmp_path):
    d = corpus(tmp_path / "d")
    data = str(d)
    tok_a = train_bpe(data, 270, tmp_path / "a.json")
    tok_b = train_bpe(data, 290, tmp_path / "b.json")
    base, where, _ = shards.load(data, "text", tok_a)
    assert shards.load(data, "text", tok_a)[2]  # a hit
    # the same size, the same mtime, one byte changed: another shard, with the new text
    f = d / "p1.jsonl"
    st = f.stat()
    text = f.read_text()
    f.write_text(text.replace("line 3 abc", "line 3 xyz"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed, where2, hit = shards.load(data, "text", tok_a)
    assert not hit and where2 != where and not same(changed, base)
    # an added file
    (d / "p9.jsonl").write_text(json.dumps({"text": "new", "alt": "x"}) + "\n")
    assert not shards.load(data, "text", tok_a)[2]
    # another tokenizer, another field
    other, where3, hit = shards.load(data, "text", tok_b)
    assert not hit and where3 not in (where, where2)
    alt, _, hit = shards.load(data, "alt", tok_a)
    assert not hit and not same(alt, shards.load(data, "text", tok_a)[0])
    # the bytes tokenizer differs by its separator (vocab 256: NUL; above: 256)
    assert shards.corpus_key(data, "text", Tokenizer(256)) != shards.corpus_key(data, "text", Tokenizer(512))
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 5  # base, changed, added, tokenizer b, field alt


def test_a_later_run_reads_only_the_files_whose_stat_changed(cache, tmp_path, monkeypatch):
    from bstc.runtime import file_hashes

    d = corpus(tmp_path / "d")
    data, tok = str(d), Tokenizer(256)
    read = []  # the files whose bytes were read to hash them
    real = file_hashes.file_digest
    monkeypatch.setattr(file_hashes, "file_digest", lambda p: read.append(Path(p).name) or real(p))
    monkeypatch.setattr(file_hashes, "RACY_NS", 0)  # as if the files were written long before
    first, where, _ = shards.load(data, "text", tok)
    assert sorted(read) == ["p0.jsonl", "p1.jsonl", "p2.jsonl"] and (cache / shards.HASHES).is_file()
    read.clear()
    again, where2, hit = shards.load(data, "text", tok)
    assert hit and where2 == where and read == []  # unchanged: no file read
    assert not shards.load(data, "text", Tokenizer(512))[2] and read == []  # another tokenizer: another shard
    # a new mtime with the same bytes: read again, and the same shard
    f = d / "p1.jsonl"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert shards.load(data, "text", tok)[1:] == (where, True) and read == ["p1.jsonl"]
    # other bytes of the same size, the mtime given back: the ctime changed, so read again
    read.clear()
    time.sleep(0.05)  # past the file system's timestamp tick
    st, text = f.stat(), f.read_text()
    f.write_text(text.replace("line 3 abc", "line 3 xyz"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_ctime_ns != st.st_ctime_ns
    changed, where3, hit = shards.load(data, "text", tok)
    assert not hit and where3 != where and read == ["p1.jsonl"] and not same(changed, first)
    # a file written within the racy window of its hashing is read again on the next run too
    monkeypatch.setattr(file_hashes, "RACY_NS", 10**12)
    read.clear()
    assert shards.load(data, "text", tok)[1:] == (where3, True)
    assert sorted(read) == ["p0.jsonl", "p1.jsonl", "p2.jsonl"]


def test_an_unreadable_hash_record_is_rebuilt(cache, tmp_path):
    data = str(corpus(tmp_path / "d"))
    first, where, _ = shards.load(data, "text", Tokenizer(256))
    (cache / shards.HASHES).write_text("{not json")
    again, where2, hit = shards.load(data, "text", Tokenizer(256))
    assert hit and where2 == where and json.loads((cache / shards.HASHES).read_text())


def test_a_truncated_shard_is_encoded_again(cache, tmp_path):
    data = str(corpus(tmp_path / "d"))
    first, where, _ = shards.load(data, "text", Tokenizer(256))
    (where / "train.bin").write_bytes(b"\x00" * 10)
    again, _, hit = shards.load(data, "text", Tokenizer(256))
    assert not hit and same(first, again)


def test_an_unwritable_cache_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("BSTC_DATA_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(shards, "_warned", False)
    c, where, hit = shards.load(str(corpus(tmp_path / "d")), "text", Tokenizer(256))
    assert where is None and not hit and len(c["train"]) > 0
    assert "cannot write the data cache" in capsys.readouterr().err
    monkeypatch.setenv("BSTC_DATA_CACHE", "off")
    assert shards.cache_dir() is None


def test_data_prepare_command(tmp_path):
    data = corpus(tmp_path / "d")
    env = dict(os.environ, PYTHONPATH=str(ROOT), BSTC_DATA_CACHE=str(tmp_path / "cache"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "bstc.cli", "data", "prepare", "--data", str(data), *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    r = run("--measure", "--batch", "2", "--seq-len", "64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {tmp_path / 'cache'}") and "loader: " in r.stdout
    r = run()
    assert r.returncode == 0 and r.stdout.startswith("found "), r.stderr
    r = run("--tokenizer", str(tmp_path / "none.json"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"bstc: error: --tokenizer '{tmp_path / 'none.json'}' does not exist"], r.stderr
