"""Imports: `import "blocks.bst"` brings a library's parameters and blocks into a model file;
the zoo's shared blocks live in libraries (models/blocks.bst, models/s4_blocks.bst)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bstc
from bstc import ir, zoo
from bstc.errors import BstcError
from bstc.frontend import check_library, load_ast, parse_ast

ROOT = Path(__file__).resolve().parent.parent
# The last commit whose zoo files wrote their shared blocks out in full.
BEFORE_LIBRARIES = "e8210dc"

MODEL = """
{imports}
model m {{
  vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
  mlp_hidden = 2 * d_model
  ssm_state = 8
  layers {{ embed; local; bst; local; head tied }}
}}
"""


def _old_zoo_file(name: str) -> str | None:
    try:
        out = subprocess.run(["git", "show", f"{BEFORE_LIBRARIES}:models/{name}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@pytest.mark.parametrize("path", zoo.list_models(), ids=lambda p: p.name)
def test_the_zoo_ir_is_the_one_before_the_libraries(path, tiny):
    """Moving the shared blocks into libraries changed no zoo model: each file's IR (at paper
    scale and at the tiny preset) equals the one its pre-library text gives."""
    old = _old_zoo_file(path.name)
    if old is None:
        pytest.skip("no git history here")
    over = tiny(path)
    assert bstc.parse(str(path)) == bstc.parse(old)
    assert ir.dump(bstc.parse(str(path), overrides=over)) == ir.dump(bstc.parse(old, overrides=over))


def test_zoo_files_share_their_blocks():
    """The BST files no longer write out `local`; the S4D ones not `bst` either."""
    for p in zoo.list_models():
        text = p.read_text()
        if p.stem.startswith("bst_") or p.stem == "gss_hybrid":
            assert "block local" not in text and "import" in text, p.name
        if p.stem in ("bst_sh_s4", "bst_mh_s4", "bst_mf_s4", "bst_sh_own_s4"):
            assert "block bst" not in text and "\n  bst:" not in text, p.name


def test_a_library_is_not_a_model():
    assert zoo.library_names() == ["blocks", "s4_blocks"]
    assert not set(zoo.library_names()) & set(zoo.names())
    from bstc.cli import app

    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0 and "bst_sh_s4.bst" in res.output and "blocks.bst" not in res.output
    with pytest.raises(BstcError, match="'blocks' is a library, not a model"):
        bstc.parse("blocks")
    # bstc validate checks a library's blocks, and says it is one
    res = CliRunner().invoke(app, ["validate", "s4_blocks", str(zoo.models_dir() / "blocks.bst")])
    assert res.exit_code == 0, res.output
    assert "ok — library s4_blocks, 2 blocks: local, bst" in res.output
    assert "ok — library blocks, 1 block: local" in res.output


def test_validating_a_library_checks_its_blocks(tmp_path):
    from bstc.cli import app

    lib = tmp_path / "lib.bst"
    lib.write_text('library lib {\n  block local { attn = block_atention(window: window); mlp = mlp(hiden: 8) }\n}\n')
    res = CliRunner().invoke(app, ["validate", str(lib)])
    assert res.exit_code == 1
    assert f"{lib}:2:24: error: unknown layer kind 'block_atention'" in res.output
    assert f"{lib}:2:66: error: layer kind 'mlp' has no parameter 'hiden'" in res.output
    assert "needs parameter 'hidden'" not in res.output  # the misspelling is the one problem
    with pytest.raises(BstcError, match="is a model, not a library"):
        check_library("bst_sh_s4")


def test_relative_and_zoo_imports_and_library_parameters(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mine.bst").write_text(
        'import "blocks"          # the zoo library, by name\n'
        'library mine {\n  state = 8\n'
        '  block bst(context = sh) { ssm = s4d(state: state); '
        'attn = block_attention(window: window, context: ssm -> context) }\n}\n')
    m = tmp_path / "m.bst"
    m.write_text(MODEL.format(imports='import "lib/mine.bst"').replace("ssm_state = 8", "wide = state * 2"))
    model = bstc.parse(str(m))
    assert [i.name for i in model.layers] == ["local.0", "bst.0", "local.1"]
    assert model.params["state"] == 8 and model.params["wide"] == 16  # a model parameter may use the library's
    assert dict(model.layers[1].sublayers[0].args)["state"] == 8
    # a library's parameter is the model's: --set reaches it
    assert dict(bstc.parse(str(m), overrides={"state": "4"}).layers[1].sublayers[0].args)["state"] == 4
    # the file's own tree names its imports; load_ast reads them
    assert parse_ast(str(m))[0].blocks == ()
    assert [b.name for b in load_ast(str(m))[0].blocks] == ["local", "bst"]
    # the resolved model prints without imports and reads back equal
    assert bstc.parse(ir.to_bst(model)) == model


def test_yaml_imports_and_yaml_libraries(tmp_path):
    (tmp_path / "lib.yaml").write_text(
        "imports: [blocks]\nlibrary: lib\nparams: {ssm_state: 8}\nblocks:\n  bst:\n    params: {context: sh}\n"
        "    layers:\n      ssm: {kind: s4d, state: ssm_state}\n"
        "      attn: {kind: block_attention, window: window, context: ssm -> context}\n")
    (tmp_path / "lib.bst").write_text(
        'import "blocks"\nlibrary lib {\n  ssm_state = 8\n  block bst(context = sh) {\n'
        '    ssm = s4d(state: ssm_state)\n    attn = block_attention(window: window, context: ssm -> context)\n  }\n}\n')
    assert parse_ast(str(tmp_path / "lib.yaml"))[0] == parse_ast(str(tmp_path / "lib.bst"))[0]
    m = tmp_path / "m.yaml"
    m.write_text("imports: [lib.yaml]\nmodel: m\nparams: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64,"
                 " mlp_hidden: 2 * d_model}\nlayers: [embed, local, bst, local, {head: tied}]\n")
    b = tmp_path / "m.bst"
    b.write_text(MODEL.format(imports='import "lib.bst"').replace("  ssm_state = 8\n", ""))
    assert bstc.parse(str(m)) == bstc.parse(str(b))
    assert check_library(str(tmp_path / "lib.yaml")).name == "lib"


def test_a_run_of_a_yaml_model_with_imports_outlives_its_libraries(tmp_path):
    """A YAML model cannot be bundled in text: the run keeps the checked model printed as one
    `.bst` file, so evaluating and resuming the run need neither the YAML file nor its library."""
    from bstc.runtime.config import RunConfig
    from bstc.runtime.evaluator import evaluate
    from bstc.runtime.model import spec_from_file
    from bstc.runtime.trainer import train

    src = tmp_path / "src"
    src.mkdir()
    (src / "lib.yaml").write_text(
        "library: lib\nparams: {ssm_state: 8}\nblocks:\n  bst:\n    layers:\n      ssm: {kind: s4d, state: ssm_state}\n"
        "      attn: {kind: block_attention, window: window, context: ssm -> sh}\n")
    m = src / "m.yaml"
    m.write_text("imports: [lib.yaml]\nmodel: m\nparams: {vocab: 256, d_model: 32, heads: 2, window: 16, seq_len: 64}\n"
                 "layers: [embed, bst, {head: tied}]\n")
    run = tmp_path / "run"
    over = {"d_model": 16}
    spec = spec_from_file(m, over)
    train(RunConfig(model=str(m), set=over, steps=2, batch=2, eval_every=0, ckpt_every=2), run, spec,
          progress=False, plot=False, tensorboard=False)
    copy = run / "model.bst"
    assert copy.is_file() and not (run / "model.yaml").exists() and "import" not in copy.read_text()
    assert bstc.parse(str(copy), overrides=over) == spec.model_ir
    shutil.rmtree(src)  # the libraries move away: the run still rebuilds the same model
    ev = evaluate(run, lengths=[64], max_tokens=256)
    assert ev["step"] == 2
    train(RunConfig(model=str(copy), set=over, steps=3, batch=2, eval_every=0, ckpt_every=1), run,
          spec_from_file(copy, over), resume=True, progress=False, plot=False, tensorboard=False)


def test_a_library_imported_twice_counts_once(tmp_path):
    """A diamond (two libraries importing a third) is no clash."""
    (tmp_path / "base.bst").write_text("library base {\n  block local { attn = block_attention(window: window) }\n}\n")
    (tmp_path / "a.bst").write_text('import "base.bst"\nlibrary a {\n  block x { attn = block_attention(window: window) }\n}\n')
    (tmp_path / "b.bst").write_text('import "base.bst"\nlibrary b {\n  block y { attn = block_attention(window: window) }\n}\n')
    m = tmp_path / "m.bst"
    m.write_text('import "a.bst"\nimport "b.bst"\nmodel m {\n  vocab = 256; d_model = 64; heads = 4; window = 16; '
                 'seq_len = 64\n  layers { embed; local; x; y; head tied }\n}\n')
    assert [i.block for i in bstc.parse(str(m)).layers] == ["local", "x", "y"]
    assert [b.name for b in load_ast(str(m))[0].blocks] == ["local", "x", "y"]


def test_a_clash_shows_both_files_with_carets(tmp_path):
    lib = tmp_path / "lib.bst"
    lib.write_text("library lib {\n  block local { attn = block_attention(window: window) }\n}\n")
    m = tmp_path / "m.bst"
    m.write_text('import "lib.bst"\nmodel m {\n  vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64\n'
                 '  block local { attn = sliding_attention(window: window) }\n  layers { embed; local; head tied }\n}\n')
    with pytest.raises(BstcError) as info:
        bstc.parse(str(m))
    (d,) = info.value.diagnostics
    assert (d.span.file, d.span.line, d.span.col) == (str(m), 4, 9)
    assert d.hint.startswith(f"first defined at {tmp_path / 'lib.bst'}:2:9;")
    # a mistake inside an imported block is shown in the library's text
    lib.write_text("library lib {\n  block local { attn = block_attention(window: windw) }\n}\n")
    m.write_text('import "lib.bst"\nmodel m {\n  vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64\n'
                 '  layers { embed; local; head tied }\n}\n')
    with pytest.raises(BstcError) as info:
        bstc.parse(str(m))
    text = info.value.render()
    assert f"{tmp_path / 'lib.bst'}:2:" in text
    assert "2 |   block local { attn = block_attention(window: windw) }" in text


def test_an_installed_package_finds_the_zoo_libraries(tmp_path, monkeypatch):
    """`import "NAME"` finds a zoo library wherever the package keeps its models (an installed
    wheel: bstc/models), and the wheel ships them (package data `*.bst`)."""
    pkg = tmp_path / "site" / "models"
    pkg.mkdir(parents=True)
    for p in zoo.list_libraries():
        shutil.copy(p, pkg / p.name)
    monkeypatch.setattr(zoo, "models_dir", lambda: pkg)
    m = tmp_path / "elsewhere" / "m.bst"
    m.parent.mkdir()
    m.write_text(MODEL.format(imports='import "s4_blocks"'))
    assert [i.block for i in bstc.parse(str(m)).layers] == ["local", "bst", "local"]
    assert zoo.library_names() == ["blocks", "s4_blocks"] and zoo.names() == []
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.bst" in data["bstc.models"]


def test_a_preset_reaches_an_imported_parameter(tmp_path):
    """The tiny preset (and any preset) sets a parameter a model imports from a library."""
    (tmp_path / "lib.bst").write_text("library lib {\n  ssm_state = 64\n"
                                      "  block bst(context = sh) { ssm = s4d(state: ssm_state); "
                                      "attn = block_attention(window: window, context: ssm -> context) }\n}\n")
    m = tmp_path / "m.bst"
    m.write_text('import "lib.bst"\nmodel m {\n  vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64\n'
                 "  layers { embed; bst; head tied }\n}\n")
    assert "ssm_state" in zoo.declared_params(m)
    over = zoo.preset_overrides(m, {"ssm_state": 8, "groups": 1})
    assert over == {"ssm_state": 8}
    assert dict(bstc.parse(str(m), overrides=over).layers[0].sublayers[0].args)["state"] == 8


@pytest.mark.parametrize("name", ["bst_mf_s4", "gss_hybrid"])
def test_a_bundle_is_the_model_in_one_file(name, tmp_path):
    """`bundle`: the model with its libraries written in, for a run directory: it compiles alone
    (no imports, anywhere) to the same IR, and is None where there is nothing to bundle."""
    from bstc.frontend import bundle

    text = bundle(name)
    assert "import" not in text and "block local" in text
    f = tmp_path / "model.bst"
    f.write_text(text)
    assert parse_ast(str(f))[0].imports == ()
    assert bstc.parse(str(f)) == bstc.parse(name)
    assert bundle("transformer") is None and bundle("bst_sh_s4.yaml") is None


def test_a_bundle_keeps_a_one_line_model_and_library_parameters(tmp_path):
    from bstc.frontend import bundle

    (tmp_path / "lib.bst").write_text("library lib { hidden = 96; block local { attn = block_attention(window: window);"
                                      " mlp = mlp(hidden: hidden) } }  # one line\n")
    m = tmp_path / "m.bst"
    m.write_text('import "lib.bst"; model m { vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64;'
                 " layers { embed; local; head tied } }\n")
    text = bundle(str(m))
    assert bstc.parse(text) == bstc.parse(str(m))
    assert bstc.parse(text, overrides={"hidden": 32}) == bstc.parse(str(m), overrides={"hidden": 32})


def test_an_error_only_in_a_library_gets_a_note_where_the_model_uses_it(tmp_path):
    """A model whose parameters an imported block cannot use (here `mlp_hidden` is misspelt):
    the errors are in the library's text, and a note in the model file shows each use."""
    m = tmp_path / "m.bst"
    m.write_text((zoo.models_dir() / "bst_sh_s4.bst").read_text().replace("mlp_hidden = 4", "mlp_hiddn = 4"))
    with pytest.raises(BstcError) as info:
        bstc.parse(str(m))
    errs = [d for d in info.value.diagnostics if d.severity == "error"]
    notes = [d for d in info.value.diagnostics if d.severity == "note"]
    assert {Path(d.span.file).name for d in errs} == {"blocks.bst", "s4_blocks.bst"}
    assert all("did you mean 'mlp_hiddn'?" in d.hint for d in errs)
    assert [(n.message, n.span.file) for n in notes] == [("block 'local' is used here", str(m)),
                                                          ("block 'bst' is used here", str(m))]
    text = info.value.render()
    assert "note: block 'local' is used here" in text and text.endswith("found 2 errors")


def test_an_override_error_gets_no_note(tmp_path):
    """A bad --set is shown in <--set>; the imports have nothing to do with it."""
    with pytest.raises(BstcError) as info:
        bstc.parse("bst_sh_s4", overrides={"d_model": "34"})
    assert [(d.span.file, d.severity) for d in info.value.diagnostics] == [("<--set>", "error")]


def test_a_run_directory_keeps_an_importing_model_whole(tmp_path):
    """The run's copy of a model that imports a library by a relative path is the bundle: the
    run rebuilds the same model after the library has moved away."""
    from bstc.runtime.model import spec_from_file
    from bstc.runtime.config import RunConfig
    from bstc.runtime.rundir import RunFiles

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mine.bst").write_text(
        'import "blocks"\nlibrary mine {\n  state = 8\n'
        '  block bst(context = sh) { ssm = s4d(state: state); '
        'attn = block_attention(window: window, context: ssm -> context) }\n}\n')
    m = tmp_path / "m.bst"
    m.write_text(MODEL.format(imports='import "lib/mine.bst"'))
    spec = spec_from_file(m, {"state": "4"})
    run = RunFiles(tmp_path / "run")
    run.write(RunConfig(), spec)
    shutil.rmtree(tmp_path / "lib")
    _, info = run.read()
    again = spec_from_file(run.root / info["model_file"], info["overrides"])
    assert again.fingerprint == spec.fingerprint and again.model_ir == spec.model_ir
