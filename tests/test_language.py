"""The language: the zoo validates, the two front ends agree, overrides / repeats / per-occurrence
overrides / sharing / `context = none` mean what docs/language.md says, the resolved `.bst`
printer round-trips, every complete example in the docs compiles, and no mutation of a zoo file
ever gets anything from bstc but a model or a located BstcError.

Nothing here lowers a model to JAX: parsing and `explain` are pure Python, so paper-scale zoo
models are fine."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bstc
from bstc import ir, zoo
from bstc.errors import BstcError

ROOT = Path(__file__).resolve().parent.parent
ZOO = zoo.list_models()
TWINS = [(p.with_suffix(".bst"), p) for p in ZOO if p.suffix == ".yaml" and p.with_suffix(".bst").is_file()]
SH = zoo.models_dir() / "bst_sh_s4.bst"


def _ids(paths):
    return [p.name for p in paths]


def _model(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _inst(m: ir.Model, name: str) -> ir.BlockInstance:
    return next(i for i in m.layers if i.name == name)


def _sub(inst: ir.BlockInstance, name: str) -> ir.Sublayer:
    return next(s for s in inst.sublayers if s.name == name)


# ---- the zoo ---------------------------------------------------------------------------------


def test_zoo_has_both_syntaxes():
    assert any(p.suffix == ".bst" for p in ZOO)
    assert TWINS, "at least one .yaml twin of a .bst model"


@pytest.mark.parametrize("path", ZOO, ids=_ids(ZOO))
def test_zoo_model_validates(path, tiny):
    m = bstc.parse(path)
    assert isinstance(m, ir.Model) and m.layers
    assert all(v > 0 for v in (m.dims.vocab, m.dims.d_model, m.dims.heads, m.dims.window, m.dims.seq_len))
    # the same file at test size
    small = bstc.parse(path, overrides=tiny(path))
    assert small.dims.d_model == 32
    assert {i.block for i in small.layers} == {i.block for i in m.layers}


@pytest.mark.parametrize("bst_path,yaml_path", TWINS, ids=_ids(p for p, _ in TWINS))
def test_yaml_twin_gives_equal_ir_and_explain(bst_path, yaml_path, tiny):
    from bstc.frontend import parse_ast

    assert parse_ast(str(bst_path))[0] == parse_ast(str(yaml_path))[0]  # equal syntax trees
    a, b = bstc.parse(bst_path), bstc.parse(yaml_path)
    assert a == b
    assert ir.dump(a) == ir.dump(b)
    ea, eb = bstc.explain(bst_path), bstc.explain(yaml_path)
    assert ea.rows == eb.rows
    assert (ea.params, ea.flops_per_token) == (eb.params, eb.flops_per_token)
    assert ea.to_dict() == eb.to_dict()
    over = tiny(bst_path)
    assert bstc.parse(bst_path, overrides=over) == bstc.parse(yaml_path, overrides=over)
    # ...and the comparison can fail
    assert bstc.parse(bst_path, overrides={"d_model": 256}) != b


def test_layout_does_not_matter():
    one_line = "model m { vocab = 64; d_model = 32; heads = 2; window = 8; seq_len = 32; " \
               "block b { attn = block_attention(window: window); mlp = mlp(hidden: 64) }; " \
               "layers { embed; b; b; head tied } }"
    spread = _model("""
        # a comment
        model m {
          vocab = 64      # trailing comments
          d_model = 32
          heads = 2
          window = 8
          seq_len = 32
          block b {
            attn = block_attention(
              window: window,
            )
            mlp = mlp(hidden: 2 * d_model)
          }
          layers {
            embed tokens
            repeat 2 { b }
            head tied
          }
        }
        """)
    assert bstc.parse(one_line) == bstc.parse(spread)


# ---- overrides -------------------------------------------------------------------------------


def test_override_changes_what_it_should():
    base = bstc.parse(SH)
    m = bstc.parse(SH, overrides={"d_model": 256})
    assert m.dims.d_model == 256 and m.params["d_model"] == 256
    assert m.params["mlp_hidden"] == 4 * 256  # mlp_hidden = 4 * d_model follows
    assert {_sub(i, "mlp").kwargs["hidden"] for i in m.layers} == {1024}
    for k in ("vocab", "heads", "window", "seq_len", "ssm_state"):
        assert m.params[k] == base.params[k]
    assert [i.name for i in m.layers] == [i.name for i in base.layers]
    assert all(s.out_shape == ("B", 4096, 256) for i in m.layers for s in i.sublayers)
    assert bstc.explain(SH, overrides={"d_model": 256}).params < bstc.explain(SH).params
    # a string is an expression, evaluated like the file's own
    assert bstc.parse(SH, overrides={"d_model": "4*64"}) == m
    assert bstc.parse(SH, overrides={"d_model": "(vocab - 192) * 4"}) == m
    # a derived parameter can be overridden on its own
    m2 = bstc.parse(SH, overrides={"mlp_hidden": 512})
    assert {_sub(i, "mlp").kwargs["hidden"] for i in m2.layers} == {512}
    assert m2.dims.d_model == base.dims.d_model


def test_override_settings_and_aliases():
    m = bstc.parse(SH, overrides={"dtype": "bf16", "ssm_state": 16})
    assert m.params["dtype"] == "bfloat16" and m.dims.dtype == "bfloat16"
    assert m.dims.param_dtype == "float32"
    assert {_sub(i, "ssm").kwargs["state"] for i in m.layers if i.block == "bst"} == {16}
    p = bstc.parse(SH, overrides={"norm": "layer", "placement": "post"})
    assert {(s.norm, s.placement) for i in p.layers for s in i.sublayers if s.residual} == {("layer", "post")}
    # a post-norm normalises the residual stream after the add: a context source has none
    assert {(s.norm, s.placement) for i in p.layers for s in i.sublayers if not s.residual} == {("none", "post")}


# ---- repeats, per-occurrence overrides, sharing, context = none --------------------------------

NESTED = _model("""
    model nested {
      vocab = 64; d_model = 32; heads = 2; window = 8; seq_len = 32
      outer = 2
      block a { mlp = mlp(hidden: 64) }
      block b { attn = block_attention(window: window) }
      layers {
        embed
        repeat outer { a; repeat outer + 1 { b } }
        b
        head untied
      }
    }
    """)


def test_repeat_nesting_and_occurrence_numbering():
    m = bstc.parse(NESTED)
    assert [i.name for i in m.layers] == ["a.0", "b.0", "b.1", "b.2", "a.1", "b.3", "b.4", "b.5", "b.6"]
    m3 = bstc.parse(NESTED, overrides={"outer": 3})
    assert len(m3.layers) == 3 * (1 + 4) + 1


BST3 = _model("""
    model occ {
      vocab = 64; d_model = 32; heads = 2; window = 8; seq_len = 32
      block bst(context = sh) {
        ssm  = s4d(state: 16)
        attn = block_attention(window: window, context: ssm -> context)
        mlp  = mlp(hidden: 64)
      }
      layers {
        embed
        repeat 3 { bst }
        bst.1 { ssm.state = 128; mlp.act = relu }
        head tied
      }
    }
    """)


def test_per_occurrence_override_changes_only_that_occurrence():
    m = bstc.parse(BST3)
    assert [_sub(i, "ssm").kwargs["state"] for i in m.layers] == [16, 128, 16]
    assert [_sub(i, "mlp").kwargs["act"] for i in m.layers] == ["gelu", "relu", "gelu"]
    assert m.layers[0].sublayers == m.layers[2].sublayers != m.layers[1].sublayers
    plain = bstc.parse(BST3.replace("bst.1 { ssm.state = 128; mlp.act = relu }", ""))
    assert plain.layers[0] == m.layers[0] and plain.layers[2] == m.layers[2]
    assert plain.layers[1] != m.layers[1]


def test_per_occurrence_override_on_a_zoo_model():
    text = SH.read_text().replace("    norm rms", "    bst.1 { ssm.state = 128 }\n    norm rms")
    m = bstc.parse(text)
    states = {i.name: _sub(i, "ssm").kwargs["state"] for i in m.layers if i.block == "bst"}
    assert states == {"bst.0": 64, "bst.1": 128, "bst.2": 64}
    others = [i for i in m.layers if i.name != "bst.1"]
    assert others == [i for i in bstc.parse(SH).layers if i.name != "bst.1"]


SHARED = _model("""
    model shared {
      vocab = 64; d_model = 32; heads = 2; window = 8; seq_len = 32
      block local { attn = block_attention(window: window); mlp = mlp(hidden: 64) }
      layers { embed; local share g; local share g; local share g; local; head untied }
    }
    """)


def test_weight_sharing_counts_parameters_once():
    m = bstc.parse(SHARED)
    assert [i.share for i in m.layers] == ["g", "g", "g", None]
    shared = bstc.explain(SHARED)
    unshared = bstc.explain(SHARED.replace(" share g", ""))
    one_block = sum(r.params for r in unshared.rows if r.name.startswith("local.0."))
    assert one_block > 0
    assert unshared.params - shared.params == 2 * one_block
    rows = {r.name: r for r in shared.rows}
    assert rows["local.1.attn"].params == rows["local.2.mlp"].params == 0
    assert rows["local.1.attn"].note.startswith("shared (g)")
    assert rows["local.0.attn"].params == rows["local.3.attn"].params > 0
    assert shared.flops_per_token == unshared.flops_per_token  # sharing saves weights, not compute


def test_context_none_drops_the_ssm():
    text = BST3.replace("bst.1 { ssm.state = 128; mlp.act = relu }", "bst(context = none)")
    m = bstc.parse(text)
    with_ctx, without = m.layers[0], m.layers[3]
    assert [s.name for s in with_ctx.sublayers] == ["ssm", "attn", "mlp"]
    assert _sub(with_ctx, "attn").context == ir.Edge("ssm", "sh", 1)
    assert not _sub(with_ctx, "ssm").residual  # a context source does not join the residual stream
    assert [s.name for s in without.sublayers] == ["attn", "mlp"]
    assert _sub(without, "attn").context is None
    # the same as a block written without the SSM
    local = bstc.parse(text.replace("bst(context = none)", "local").replace(
        "  layers {", "  block local { attn = block_attention(window: window); mlp = mlp(hidden: 64) }\n  layers {"))
    assert without.sublayers == local.layers[3].sublayers
    rows = {r.name for r in bstc.explain(text).rows}
    assert "bst.0.ssm" in rows and "bst.3.ssm" not in rows


# ---- the resolved .bst printer ----------------------------------------------------------------

MESHED = _model("""
    model meshed {
      vocab = 64; d_model = 32; heads = 2; window = 8; seq_len = 32
      dtype = bfloat16
      block local { attn = block_attention(window: window, norm: layer); mlp = mlp(hidden: 64, placement: post) }
      layers { embed; local; local share s; local share s; norm layer; head tied }
      mesh { data = 2, tensor = 2 }
      rules { batch -> data; heads -> tensor; mlp -> (tensor) }
    }
    """)


# Occurrences that differ from the rest of their block (a per-occurrence override,
# `bst(context = none)`) are written back as overrides and edge-variant parameters.
_ROUND_TRIP = [*ZOO, NESTED, SHARED, MESHED,
               pytest.param(BST3, id="occurrence-override"),
               pytest.param(BST3.replace("bst.1 { ssm.state = 128; mlp.act = relu }", "bst(context = none)"),
                            id="context-none")]


@pytest.mark.parametrize("source", _ROUND_TRIP, ids=[*_ids(ZOO), "nested", "shared", "meshed", None, None][:len(_ROUND_TRIP)])
def test_to_bst_round_trips(source, tiny):
    over = tiny(source) if isinstance(source, Path) else {}
    for m in (bstc.parse(source), bstc.parse(source, overrides=over)):
        text = ir.to_bst(m)
        back = bstc.parse(text)
        assert back == m
        assert ir.to_bst(back).split("\n", 1)[1] == text.split("\n", 1)[1]  # line 1 names the source


# ---- docs/language.md -------------------------------------------------------------------------

DOC = ROOT / "docs" / "language.md"
_FENCE = re.compile(r"^```([\w-]+)[^\n]*\n(.*?)^```", re.S | re.M)


def _doc_blocks(lang: str) -> list[str]:
    return [body for tag, body in _FENCE.findall(DOC.read_text()) if tag == lang]


def test_docs_have_examples():
    assert len(_doc_blocks("bst")) >= 5
    assert _doc_blocks("yaml")


@pytest.mark.parametrize("lang", ["bst", "yaml"])
def test_every_complete_example_in_the_docs_compiles(lang):
    for i, text in enumerate(_doc_blocks(lang)):
        try:
            bstc.parse(text)
        except BstcError as e:  # pragma: no cover - the message says which block
            pytest.fail(f"```{lang} block #{i} in docs/language.md does not compile:\n{e.render()}\n---\n{text}")


def test_docs_error_examples_are_what_bstc_prints(tmp_path, monkeypatch):
    """Each ```text block in the docs that starts with `$ bstc validate FILE` shows the exact
    output for the ```bst block right before it (saved as FILE)."""
    from typer.testing import CliRunner

    from bstc.cli import app

    text = DOC.read_text()
    blocks = list(_FENCE.finditer(text))
    checked = 0
    for prev, cur in zip(blocks, blocks[1:]):
        m = re.match(r"\$ bstc validate (\S+)\n", cur.group(2))
        if cur.group(1) != "text" or not m or prev.group(1) != "bst-bad":
            continue
        (tmp_path / m.group(1)).write_text(prev.group(2))
        monkeypatch.chdir(tmp_path)
        res = CliRunner().invoke(app, ["validate", m.group(1)])
        assert res.exit_code == 1
        assert res.output.rstrip("\n") == cur.group(2)[m.end():].rstrip("\n")
        checked += 1
    assert checked == len(_doc_blocks("bst-bad")) >= 3


# ---- fuzz: a mutated zoo file gives a model or a located BstcError, never anything else ----------

_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|->|\*\*|//|\S")
_POOL = ["model", "block", "layers", "repeat", "embed", "norm", "head", "share", "mesh", "rules", "tokens",
         "{", "}", "(", ")", ";", ",", ":", "=", "->", ".", "*", "**", "/", "//", "%", "-", "+", "#",
         "0", "1", "3", "-7", "2.5", "1e400", "10**40", "99999999999999999999", '"s"', '"', "'",
         "s4d", "s4dd", "mlp", "block_attention", "long_conv", "window", "d_model", "heads", "seq_len",
         "sh", "mh", "mf", "none", "bst", "local", "context", "filters", "state", "true", "false",
         "bst.0", "bst.7", "local.1", "\n", "\t", "@", "\\", "é", "\x00"]
_NUMBERS = ["0", "1", "2", "3", "-1", "7", "1.5", "0.0", "1e9", "1e400", "4096", "100000000", "12345678901234567890"]
_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(list("{}()[];:,.=-+*/%<>#\"'@!&|\\\n\t 0123456789"))


def _mutation(yaml: bool):
    pool = _POOL + (["!!python/object/apply:os.system [ls]", "&a", "*a", "<<: *a", "? ", "- ", ": ", "---\n",
                     "...", "!!binary", "%YAML 1.1\n", "  ", "[", "]", "|", ">", "~", "null"] if yaml else [])
    return st.one_of(
        st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 8)),
        st.tuples(st.just("insert"), st.floats(0, 1), _CHARS),
        st.tuples(st.just("replace"), st.floats(0, 1), _CHARS),
        st.tuples(st.just("token_delete"), st.floats(0, 1), st.just(None)),
        st.tuples(st.just("token_insert"), st.floats(0, 1), st.sampled_from(pool)),
        st.tuples(st.just("token_replace"), st.floats(0, 1), st.sampled_from(pool)),
        st.tuples(st.just("token_duplicate"), st.floats(0, 1), st.just(None)),
        st.tuples(st.just("swap_lines"), st.floats(0, 1), st.floats(0, 1)),
        st.tuples(st.just("duplicate_line"), st.floats(0, 1), st.just(None)),
        st.tuples(st.just("indent"), st.floats(0, 1), st.sampled_from([-2, -1, 1, 2])),
        st.tuples(st.just("number"), st.floats(0, 1), st.sampled_from(_NUMBERS)),
    )


def _apply(text: str, op) -> str:
    kind, where, arg = op
    if not text:
        return text
    i = min(int(where * len(text)), len(text) - 1)
    if kind == "delete":
        return text[:i] + text[i + arg:]
    if kind == "insert":
        return text[:i] + arg + text[i:]
    if kind == "replace":
        return text[:i] + arg + text[i + 1:]
    if kind.startswith("token") or kind == "number":
        toks = list(_TOKEN.finditer(text))
        if kind == "number":
            toks = [t for t in toks if t.group()[0].isdigit()]
        if not toks:
            return text
        t = toks[min(int(where * len(toks)), len(toks) - 1)]
        a, b = t.span()
        if kind == "token_delete":
            return text[:a] + text[b:]
        if kind == "token_insert":
            return text[:a] + arg + " " + text[a:]
        if kind == "token_duplicate":
            return text[:b] + " " + t.group() + text[b:]
        return text[:a] + arg + text[b:]  # token_replace, number
    lines = text.split("\n")
    j = min(int(where * len(lines)), len(lines) - 1)
    if kind == "swap_lines":
        k = min(int(arg * len(lines)), len(lines) - 1)
        lines[j], lines[k] = lines[k], lines[j]
    elif kind == "duplicate_line":
        lines.insert(j, lines[j])
    elif kind == "indent":
        lines[j] = " " * arg + lines[j] if arg > 0 else lines[j][-arg:]
    return "\n".join(lines)


def _check_outcome(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    try:
        m = bstc.parse(str(path))
    except BstcError as e:
        assert e.diagnostics, "a BstcError without diagnostics"
        n_lines = max(1, len(text.splitlines()))
        inside = [d for d in e.diagnostics
                  if d.span is not None and d.span.file == str(path) and 1 <= d.span.line <= n_lines and d.span.col >= 1]
        assert inside, f"no diagnostic points into the file: {e.diagnostics}"
        e.render(color=True)  # rendering never fails either
        return
    assert isinstance(m, ir.Model)


_BST_ZOO = [p for p in ZOO if p.suffix == ".bst"]
_YAML_ZOO = [p for p in ZOO if p.suffix in (".yaml", ".yml")]
_FUZZ = settings(max_examples=max(8, 120 // max(1, len(_BST_ZOO))), deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("path", _BST_ZOO, ids=_ids(_BST_ZOO))
@_FUZZ
@given(ops=st.lists(_mutation(yaml=False), min_size=1, max_size=3))
def test_mutated_bst_gives_model_or_located_error(path, ops, fuzz_dir):
    text = path.read_text()
    for op in ops:
        text = _apply(text, op)
    _check_outcome(fuzz_dir / path.name, text)


@pytest.mark.parametrize("path", _YAML_ZOO, ids=_ids(_YAML_ZOO))
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=st.lists(_mutation(yaml=True), min_size=1, max_size=3))
def test_mutated_yaml_gives_model_or_located_error(path, ops, fuzz_dir):
    text = path.read_text()
    for op in ops:
        text = _apply(text, op)
    _check_outcome(fuzz_dir / path.name, text)


def test_fuzz_mutations_do_mutate():
    text = SH.read_text()
    assert _apply(text, ("token_replace", 0.5, "@")) != text
    assert _apply(text, ("number", 0.0, "7")) != text
    assert _apply(text, ("swap_lines", 0.0, 0.99)) != text
