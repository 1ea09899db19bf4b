"""Tokenizers: `bstc tokenizer train`, --tokenizer (Hugging Face JSON, SentencePiece), the vocab
rule, bits per byte through a tokenizer, sampling that decodes through it."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bstc.errors import BstcError
from bstc.runtime import data as D
from bstc.runtime.tokenizer import tokenizer_vocab
from bstc.runtime.errors import DataError, UsageError
from bstc.runtime.tokenizer import Tokenizer, load_tokenizer, run_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("the state space model reads the whole sequence while block attention reads the block "
         "and the context of the previous block so information crosses block boundaries ").split()


def corpus(d: Path, files: int = 3, docs: int = 20) -> Path:
    """A folder of small JSON Lines files (embedded text, no download)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in range(files):
        with open(d / f"part-{f:03d}.jsonl", "w") as fh:
            for i in range(docs):
                words = rng.choice(WORDS, size=int(rng.integers(20, 60)))
                fh.write(json.dumps({"text": " ".join(words) + f" — doc {f}.{i} ✓\n", "id": i}) + "\n")
    return d


def cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120",
               BSTC_JAX_CACHE=os.path.join(tempfile.gettempdir(), "bstc-test-jax-cache"))
    return subprocess.run([sys.executable, "-m", "bstc.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_bpe(str(corpus(d / "data")), 300, d / "tok.json").path, d / "data"


def test_trained_bpe_tokenizer_round_trips_and_compresses(tok_file):
    path, data = tok_file
    tok = load_tokenizer(path)
    assert tok.kind == "huggingface" and tok.n_ids == 300 and tok.eos_id == 0  # <|endoftext|> first
    text = "the state space model reads the block — ✓ ünseen wörds 123"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 300
    assert len(ids) < len(text.encode()) * 0.8  # merges learnt from the corpus
    c = D.load_corpus(str(data), 300, "text", tok)
    # every document is followed by EOS; the bytes it stands for count the separator as one
    docs = [d for _, ds in D.corpus_documents(str(data)) for d in ds]
    assert sum(len(v) for v in c.values()) == sum(len(tok.encode(d.decode())) + 1 for d in docs)
    assert sum(c.n_bytes.values()) == sum(len(d) + 1 for d in docs)
    assert 1.5 < c.bytes_per_token("train") < 8
    assert int((np.concatenate(list(c.values())) == 0).sum()) == len(docs)


def test_tokenizer_is_trained_on_the_training_split_only(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("a" * 900 + "b" * 100)
    docs = D.training_documents(str(f))
    assert docs == [b"a" * 900]  # one document: its first 90%, as the position cut gives train
    d = corpus(tmp_path / "many", files=100, docs=1)
    names = {D.split_of(f"part-{i:03d}.jsonl") for i in range(100)}
    assert names == set(D.SPLITS)
    got = D.training_documents(str(d))
    assert len(got) == sum(D.split_of(f"part-{i:03d}.jsonl") == "train" for i in range(100))


def test_tokenizer_train_misuse_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="--vocab 100 is too small"):
        train_bpe(str(corpus(tmp_path / "d")), 100, tmp_path / "t.json")
    r = cli("tokenizer", "train", "--data", str(tmp_path / "nothing"), "--vocab", "300", "-o", str(tmp_path / "t.json"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"bstc: error: --data '{tmp_path / 'nothing'}' does not exist"], r.stderr


def test_the_tokenizer_sets_the_vocab_and_a_smaller_explicit_vocab_is_located(tok_file):
    tok = load_tokenizer(tok_file[0])
    assert tokenizer_vocab({"d_model": 32}, {}, tok) == {"d_model": 32, "vocab": 300}
    assert tokenizer_vocab({"vocab": "512"}, {"vocab": "512"}, tok) == {"vocab": "512"}  # larger: kept
    with pytest.raises(BstcError) as e:
        tokenizer_vocab({"vocab": "256"}, {"vocab": "256"}, tok)
    text = str(e.value)
    assert text.splitlines()[0] == "<--set>:1:7: error: --set vocab=256 is smaller than the tokenizer's 300 ids " \
                                   f"({tok.describe()})"
    assert "vocab=256" in text and "^^^" in text and "give at least 300" in text


def test_smaller_vocab_on_the_command_line(tok_file, tmp_path):
    r = cli("train", str(ROOT / "models" / "bst_sh_s4.bst"), "--data", str(tok_file[1]), "--tokenizer",
            str(tok_file[0]), "--set", "vocab=256", "--steps", "1", "-o", str(tmp_path / "r"), "-q")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("<--set>:1:7: error: --set vocab=256 is smaller than the tokenizer's 300 ids"), r.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_model_vocab_below_the_tokenizer_is_refused(tok_file):
    tok = load_tokenizer(tok_file[0])
    with pytest.raises(DataError, match="needs vocab >= 300, but the model's vocab is 256"):
        D.make_source(data=str(tok_file[1]), task=None, split="train", seq_len=16, vocab=256, seed=0, tokenizer=tok)


def test_unreadable_tokenizer_files(tmp_path):
    with pytest.raises(UsageError, match="--tokenizer '.*none.json' does not exist"):
        load_tokenizer(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(UsageError, match="cannot read tokenizer '.*bad.json'"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "bad.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(UsageError, match="cannot read tokenizer '.*bad.model'|needs the optional dependency"):
        load_tokenizer(tmp_path / "bad.model")


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "sp.txt"
    text.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))) * 3)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    tok = load_tokenizer(tmp_path / "sp.model")
    assert tok.kind == "sentencepiece" and tok.n_ids == 60 and tok.eos_id == 2  # </s>
    s = "the block reads the context"
    assert tok.decode(tok.encode(s)) == s
    ids = D.load_corpus(str(text), 60, "text", tok)
    assert max(int(v.max()) for v in ids.values()) < 60


def test_training_and_evaluating_through_a_tokenizer(tok_file, tmp_path):
    """The standin model over the tokenizer's ids: the run keeps the tokenizer, reports bits per
    byte through it, and samples text."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_runtime_train import QUIET, StandIn, cfg

    from bstc.runtime import train
    from bstc.runtime.evaluator import evaluate
    from bstc.runtime.metrics import read_metrics
    from bstc.runtime.model import ModelSpec
    from bstc.runtime.sampling import generate_text

    tok = load_tokenizer(tok_file[0])
    spec = ModelSpec(name="standin", build=lambda key: StandIn(vocab=304, d=16, key=key), fingerprint="tok-standin",
                     vocab=304, seq_len=32)
    run = tmp_path / "run"
    c = cfg(steps=3, batch=2, ckpt_every=3, eval_every=3, data=str(tok_file[1]), tokenizer=str(tok_file[0]))
    train(c, run, spec, **QUIET)
    assert (run / "tokenizer.json").read_bytes() == Path(tok_file[0]).read_bytes()
    assert run_tokenizer(run) == tok
    bpt = D.load_corpus(str(tok_file[1]), 304, "text", tok).bytes_per_token("validation")
    rec = [r for r in read_metrics(run) if r["split"] == "validation"][-1]
    assert rec["bpb"] == pytest.approx(rec["loss"] / math.log(2) / bpt, rel=1e-9) and bpt > 1.5
    res = evaluate(run, spec=spec, lengths=[32], max_tokens=256)
    r = res["lengths"]["32"]
    assert r["bpb"] == pytest.approx(r["loss"] / math.log(2) / bpt, rel=1e-9)
    assert r["bytes_per_token"] == pytest.approx(bpt, rel=1e-6)
    assert "huggingface" in res["tokenizer"]
    from bstc.runtime.evaluator import load_model

    model, *_ = load_model(run, spec)
    out = generate_text(model, tok, "the state", 12, seq_len=32, vocab=304, temperature=1.0, cache=False)
    assert isinstance(out, str)
    ids = tok.encode(out)
    assert all(i < tok.n_ids for i in ids)


def test_bytes_stay_the_default():
    t = Tokenizer(256)
    assert t.eos_id == 0 and t.n_ids == 256 and Tokenizer(512).eos_id == 256
    c = D.load_corpus(str(ROOT / "README.md"))
    assert all(c.bytes_per_token(s) == 1.0 for s in D.SPLITS)


SMALL = ["--set", "d_model=32", "--set", "heads=2", "--set", "seq_len=64", "--set", "window=16",
         "--set", "ssm_state=8"]


@pytest.mark.slow
def test_from_a_jsonl_folder_to_safetensors_with_the_commands_of_the_docs(tmp_path):
    """docs/runtime.md's walk-through: tokenizer, training, bits per byte, text samples, weights."""
    import jax.numpy as jnp

    import bstc
    from bstc.runtime.evaluator import load_model

    data = corpus(tmp_path / "corpus", files=4, docs=30)
    r = cli("tokenizer", "train", "--data", str(data), "--vocab", "320", "-o", str(tmp_path / "tok.json"))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    r = cli("train", "bst_sh_s4", *SMALL, "--data", str(data), "--tokenizer", str(tmp_path / "tok.json"),
            "--steps", "4", "--batch", "2", "--ckpt-every", "4", "--eval-every", "2", "-o", str(run), "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "run.json").read_text())["vocab"] == 320
    r = cli("eval", str(run), "--lengths", "64", "--max-tokens", "256")
    assert r.returncode == 0, r.stderr
    ev = json.loads((run / "eval" / "eval-validation.json").read_text())["lengths"]["64"]
    assert ev["bytes_per_token"] > 1.5 and ev["bpb"] == pytest.approx(ev["loss"] / math.log(2) / ev["bytes_per_token"],
                                                                     rel=1e-5)
    r = cli("sample", str(run), "--prompt", "the state", "--tokens", "8", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("the state"), r.stderr
    r = cli("export", str(run), "-o", str(tmp_path / "model.safetensors"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model.tokenizer.json").read_bytes() == (tmp_path / "tok.json").read_bytes()
    loaded = bstc.load(str(tmp_path / "model.bst"), weights=str(tmp_path / "model.safetensors"))
    trained, *_ = load_model(run)
    x = jnp.arange(64)[None] % 320
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(trained(x)))
