"""Runtime data: the embedded corpus and its splits, packing, user text, synthetic tasks, and
grain iterator checkpointing."""
from __future__ import annotations

import numpy as np
import pytest

from bstc.runtime import data as D
from bstc.runtime.errors import DataError


def test_stdlib_corpus_splits_by_file_deterministically():
    files = D.stdlib_files()
    assert len(files) > 200  # a real code corpus
    names = [n for n, _ in files]
    assert len(set(names)) == len(names)
    splits = [D.split_of(n) for n in names]
    assert splits == [D.split_of(n) for n in names]  # deterministic
    counts = {s: splits.count(s) for s in D.SPLITS}
    assert all(counts[s] > 0 for s in D.SPLITS)
    assert counts["train"] > 10 * counts["validation"]
    corpus = D.load_corpus(None)
    assert len(corpus["train"]) > 1_000_000 and len(corpus["validation"]) > 10_000
    # the validation stream is the validation files, not a slice of the train stream
    val_file = next(p for n, p in files if D.split_of(n) == "validation" and p.stat().st_size > 2000)
    head = np.frombuffer(val_file.read_bytes()[:2000], np.uint8)
    v = corpus["validation"]
    starts = np.flatnonzero(v[:-2000] == head[0])
    assert any((v[s:s + 2000] == head).all() for s in starts)


def test_packed_windows_are_next_token_pairs():
    toks = np.arange(1000, dtype=np.uint16) % 251
    src = D.PackedText(toks, 64)
    assert len(src) == (1000 - 1) // 64
    a, b = src[0], src[1]
    np.testing.assert_array_equal(a["targets"][:-1], a["inputs"][1:])
    assert b["inputs"][0] == a["targets"][-1]  # windows tile the stream: each target used once
    assert a["inputs"].dtype == np.int32 and a["mask"].sum() == 64
    with pytest.raises(IndexError):
        src[len(src)]


def test_iterator_state_restores_the_same_next_batch():
    src = D.PackedText(np.arange(20000, dtype=np.uint16) % 256, 32)
    it = D.train_iterator(src, batch=4, seed=3)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(3)]
    fresh = D.train_iterator(src, batch=4, seed=3)
    fresh.set_state(state)
    got = [fresh_b["inputs"] for fresh_b in (next(fresh) for _ in range(3))]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)
    # and the state matters: a fresh iterator without it yields something else
    assert not np.array_equal(next(D.train_iterator(src, batch=4, seed=3))["inputs"], expected[0])
    # shuffling depends on the seed
    assert not np.array_equal(next(D.train_iterator(src, batch=4, seed=4))["inputs"],
                              next(D.train_iterator(src, batch=4, seed=3))["inputs"])


def test_user_data_files_dirs_globs(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file\n" * 50)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    one = D.load_corpus(str(tmp_path / "a.txt"))
    assert sum(len(v) for v in one.values()) == 600 + 1  # + the EOS separator
    assert bytes(one["train"][:11].astype(np.uint8)) == b"hello world"
    both = D.load_corpus(str(tmp_path))
    assert sum(len(v) for v in both.values()) == 600 + 600 + 2  # the binary file is skipped
    assert len(D.user_files(str(tmp_path / "**" / "*.txt"))) == 2


@pytest.mark.parametrize("spec, msg", [
    ("/no/such/file.txt", "does not exist"),
    ("/tmp/*.no-such-suffix-xyz", "matches no files"),
])
def test_bad_data_is_a_clear_error(spec, msg):
    with pytest.raises(DataError, match=msg):
        D.user_files(spec)


def test_empty_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        D.load_corpus(str(tmp_path / "empty.txt"))


def _bstc_in_process(monkeypatch, *args):
    """`bstc ARGS` through typer's CliRunner (no interpreter start and imports); an exception the
    CLI let through, which the `bstc` process would print as a traceback, fails here."""
    from typer.testing import CliRunner

    from bstc.cli import app

    monkeypatch.setenv("BSTC_JAX_CACHE", "off")  # the CLI would point this process's JAX at a cache
    r = CliRunner().invoke(app, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    r.returncode = r.exit_code
    return r


def test_bad_data_on_the_command_line_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _bstc_in_process(monkeypatch, "train", "--data", "/no/such/dir/*.txt")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == ["bstc: error: --data '/no/such/dir/*.txt' matches no files"], r.stderr


@pytest.mark.parametrize("name", ["recall", "copy", "induction"])
def test_tasks_put_the_answer_far_from_its_evidence(name):
    L, W = 256, 64
    t = D.Task(name, L, seed=0)
    ex, ex2 = t[5], t[5]
    np.testing.assert_array_equal(ex["inputs"], ex2["inputs"])  # a pure function of the index
    assert not np.array_equal(t[6]["inputs"], ex["inputs"])
    scored = np.flatnonzero(ex["mask"])
    assert len(scored) > 0 and scored.min() >= L - W  # answers lie in the last block
    seq = np.concatenate([ex["inputs"], ex["targets"][-1:]])
    for pos in scored:
        answer = ex["targets"][pos]
        # the evidence for each answer is in the first block, and nowhere else before the last
        first = np.flatnonzero(seq[:L - W] == answer) if name != "induction" else np.flatnonzero(seq[:L - W] == ord("#"))
        assert len(first) and first.min() < W
    np.testing.assert_array_equal(ex["targets"][:-1], ex["inputs"][1:])


def test_recall_answers_follow_their_keys():
    t = D.Task("recall", 128, seed=1, pairs=4, values=8)
    ex = t[0]
    seq = np.concatenate([ex["inputs"], ex["targets"][-1:]])
    pairs = dict(zip(seq[0:8:2], seq[1:8:2]))
    for pos in np.flatnonzero(ex["mask"]):
        assert pairs[ex["inputs"][pos]] == ex["targets"][pos]
    assert t.chance == 1 / 8


# ---- dataset files: JSON Lines, Parquet, ArrayRecord ------------------------------------------------

DOCS = [f"document {i}: " + "ab" * i + "\n" for i in range(12)] + ["ünïcode ✓"]


def _jsonl(path, docs, field="text"):
    import json

    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" + ("\n" if i == 3 else "")
                            for i, d in enumerate(docs)))
    return path


def _expected_stream(docs, eos=0):
    out = []
    for d in docs:
        out += list(d.encode()) + [eos]
    return out


def test_jsonl_records_are_documents(tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", DOCS)
    c = D.load_corpus(str(f))
    joined = np.concatenate([c[s] for s in D.SPLITS]).tolist()
    assert joined == _expected_stream(DOCS)  # one file: the joined stream, cut 90/5/5 by position
    assert len(c["train"]) == int(len(joined) * 0.9)
    # another field
    g = _jsonl(tmp_path / "d.jsonl", DOCS, field="body")
    assert D.load_corpus(str(g), 256, "body")["train"].tolist() == joined[:int(len(joined) * 0.9)]
    with pytest.raises(DataError, match=r"d.jsonl:1 has no field 'text' \(fields: body, id\); choose one with --text-field"):
        D.load_corpus(str(g))


def test_record_files_split_by_file_like_text(tmp_path):
    names = [f"part-{i:03d}.jsonl" for i in range(100)]  # every split gets a file (95 / 4 / 1)
    assert {D.split_of(n) for n in names} == set(D.SPLITS)
    for i, n in enumerate(names):
        _jsonl(tmp_path / n, [f"file {i} doc {j}\n" for j in range(3)])
    c = D.load_corpus(str(tmp_path))
    for s in D.SPLITS:
        want = [t for n in names if D.split_of(n) == s
                for t in _expected_stream([f"file {names.index(n)} doc {j}\n" for j in range(3)])]
        assert c[s].tolist() == want


def test_parquet_and_arrayrecord_read_like_jsonl(tmp_path):
    pytest.importorskip("pyarrow")  # the optional `parquet` extra (installed by the `test` extra)
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    want = D.load_corpus(str(_jsonl(tmp_path / "c.jsonl", DOCS)))
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), tmp_path / "c.parquet",
                   row_group_size=2)  # grain's Parquet source goes from row group to row group
    got = D.load_corpus(str(tmp_path / "c.parquet"))
    w = ArrayRecordWriter(str(tmp_path / "c.arrayrecord"), "group_size:1")
    for i, d in enumerate(DOCS):  # JSON records and raw-text records may mix
        w.write(__import__("json").dumps({"text": d}).encode() if i % 2 else d.encode())
    w.close()
    got2 = D.load_corpus(str(tmp_path / "c.arrayrecord"))
    for s in D.SPLITS:
        np.testing.assert_array_equal(got[s], want[s])
        np.testing.assert_array_equal(got2[s], want[s])
    with pytest.raises(DataError, match=r"Parquet file '.*c.parquet' has no column|has no field 'body' \(fields: id, text\)"):
        D.load_corpus(str(tmp_path / "c.parquet"), 256, "body")
    with pytest.raises(DataError, match=r"column 'id' holds int64, not text"):
        D.load_corpus(str(tmp_path / "c.parquet"), 256, "id")


@pytest.mark.parametrize("name, content, msg", [
    pytest.param("bad.parquet", b"PAR1 this is not parquet", r"cannot read Parquet file '.*bad.parquet': ",
                 marks=pytest.mark.skipif(D.importlib.util.find_spec("pyarrow") is None, reason="no pyarrow")),
    ("bad.arrayrecord", b"garbage" * 10, r"cannot read ArrayRecord file '.*bad.arrayrecord': "),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: not a JSON object"),
    ("list.jsonl", b'["text"]\n', r"list.jsonl:1: not a JSON object: a list"),
    ("num.jsonl", b'{"text": 3}\n', r"num.jsonl:1: field 'text' is a int, not text"),
])
def test_unreadable_record_files_are_one_line_errors(tmp_path, name, content, msg):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=msg) as e:
        D.load_corpus(str(tmp_path / name))
    assert "\n" not in str(e.value)


def test_a_missing_reader_names_the_extra(monkeypatch):
    real = D.importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda n, *a: None if n == "pyarrow" else real(n, *a))
    with pytest.raises(DataError, match=r"^reading Parquet files needs the optional dependency pyarrow: "
                                        r"pip install 'bstc\[parquet\]'$"):
        D.need_reader("parquet")


def test_bad_record_file_on_the_command_line_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    r = _bstc_in_process(monkeypatch, "train", "--data", str(tmp_path / "c.jsonl"), "--set", "d_model=32",
                         "--steps", "1", "-o", str(tmp_path / "run"), "-q")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"bstc: error: {tmp_path / 'c.jsonl'}:1 has no field 'text' (fields: body); choose one with --text-field"], r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
