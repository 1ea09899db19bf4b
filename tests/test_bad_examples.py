"""The bad-example table: every mistake a user can make in a model file, with the exact
diagnostics bstc must print for it (location, message, hint).

One table drives the tests. Each row is (id, text, expected) where `expected` lists every
diagnostic, in the order bstc reports them, as (where, message, hint):

* where: "LINE:COL" in the model file itself, or "<--set>:LINE:COL" for a `--set` override
  (line i is the i-th override, shown as `name=value`);
* hint: the exact `= help:` text, or None where bstc gives none.

A diagnostic may be a note (`file:line:col: note: ...`): where every error is in an imported
file, a note in the model file says where the imported block is used.

Rows whose id starts with `yaml-` are YAML model files; `overrides` rows pass `--set` values;
`files` rows write more files beside the model (libraries it imports): a place in one of them is
"FILE:LINE:COL", and the test directory is left out of places and hints.
The table is also the reference for docs/language.md's error-message section.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field

import pytest

import bstc
from bstc.errors import BstcError
from conftest import THREE_MISTAKES


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    expected: list
    overrides: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    @property
    def suffix(self) -> str:
        return ".yaml" if self.id.startswith("yaml-") else ".bst"


def case(id, text, *expected, overrides=None, files=None):
    return Case(id, textwrap.dedent(text).lstrip("\n"), list(expected), dict(overrides or {}),
                {k: textwrap.dedent(v).lstrip("\n") for k, v in (files or {}).items()})


# Why an edge cannot name another block's sublayer, and what to write instead.
EDGE_ACROSS_BLOCKS = (
    "a block's sublayers are local to it (blocks are repeated, scanned and shared as units, so "
    "`block.sublayer` names no one layer); define the SSM in this block and name it alone (`ssm -> sh`), "
    "with `residual: true` if it should also join the residual stream")

# A small valid model that most rows change in one place (kept here for reference; every row
# spells its whole file out so that line and column numbers can be read off the text):
GOOD = """
model m {
  vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
  block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
  block bst(context = sh) {
    ssm = s4d(state: 16)
    attn = block_attention(window: window, context: ssm -> context)
  }
  layers { embed; local; bst; head tied }
}
"""

GOOD_YAML = """
model: m
params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
blocks:
  local:
    layers:
      attn: {kind: block_attention, window: window}
      mlp: {kind: mlp, hidden: 128}
layers: [embed, local, {head: tied}]
"""

CASES = [
    # ---- syntax ------------------------------------------------------------------------------
    case("syntax-missing-brace-in-block", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128)
          layers { embed; local; head tied }
        }
        """,
         ("4:3", "'layers' is not allowed here", "is a '}' missing above it?")),
    case("syntax-missing-brace-at-end", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        """,
         ("4:37", "unexpected end of file", "is a '}' missing? the '{' on line 1 is not closed")),
    case("syntax-unexpected-eof-in-expression", """
        model m {
          vocab = 256; d_model = 64 *
        """,
         ("2:30", "unexpected end of file", "is a '}' missing? the '{' on line 1 is not closed")),
    case("syntax-stray-paren", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128)) }
          layers { embed; local; head tied }
        }
        """,
         ("3:79", "unexpected ')'", "expected a name, ';', '}'")),
    case("syntax-stray-number", """
        model m {
          vocab = 256 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("2:15", "unexpected number 256",
          "expected a name, 'block', 'layers', 'mesh', 'rules', '%', '*', '**', …")),
    case("syntax-stray-brace-after-model", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        }
        """,
         ("6:1", "unexpected '}'", "nothing may follow the model's closing '}'")),
    case("syntax-missing-colon", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:74", "unexpected number 128", "expected ':'")),
    case("syntax-bad-character", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128 @ 2) }
          layers { embed; local; head tied }
        }
        """,
         ("3:79", "unexpected character '@'", None)),
    case("syntax-single-quoted-string", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128, act: 'gelu') }
          layers { embed; local; head tied }
        }
        """,
         ("3:85", "unexpected character \"'\"", 'strings are written in double quotes: "..."')),
    case("syntax-reserved-word-as-parameter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          layers = 12
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:3", "'layers' is a reserved word", "choose another name")),
    case("syntax-reserved-word-as-block-name", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block head { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; head; head tied }
        }
        """,
         ("4:23", "unexpected ';'", "write `head tied` or `head untied` ('head' is a reserved word, not a block name)")),
    case("reserved-block-name", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          block repeat { mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("4:9", "'repeat' is a reserved word and cannot name a block",
          "choose another name: `repeat` starts or continues a statement in layers")),
    case("syntax-missing-block-name", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:9", "unexpected '{'", "expected a name after 'block'")),
    case("syntax-two-broken-lines", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied; }}
        }
        """,
         ("2:64", "unexpected '='", "expected a name, a number, a string, '(', '-'"),
         ("5:1", "unexpected '}'", "nothing may follow the model's closing '}'")),
    case("syntax-duplicate-layers-section", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
          layers { embed; local; head tied }
        }
        """,
         ("5:3", "duplicate 'layers' section", "merge them into one")),

    # ---- names: layer kinds, arguments, blocks ------------------------------------------------
    case("unknown-layer-kind", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4dd(state: 16)
            attn = block_attention(window: window, context: ssm -> sh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("4:12", "unknown layer kind 's4dd'", "did you mean 's4d'?")),
    case("unknown-argument", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(windw: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:40", "layer kind 'block_attention' has no parameter 'windw'", "did you mean 'window'?")),
    case("unknown-block", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; locl; head tied }
        }
        """,
         ("4:19", "unknown block 'locl'", "did you mean 'local'?")),
    case("unknown-block-parameter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst(context = sh) {
            ssm = s4d(state: 16)
            attn = block_attention(window: window, context: ssm -> context)
          }
          layers { embed; bst(contxt = mf); head tied }
        }
        """,
         ("7:23", "block 'bst' has no parameter 'contxt'", "did you mean 'context'?")),
    case("missing-block-parameter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst(context) {
            ssm = s4d(state: 16)
            attn = block_attention(window: window, context: ssm -> context)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("7:19", "block 'bst' needs parameter 'context'", "write `bst(context = ...)`")),

    # ---- argument types, ranges, choices -------------------------------------------------------
    case("wrong-type-float-for-int", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window / 3); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:40", "'window' of block_attention must be an integer, got 5.333333333333333", None)),
    case("wrong-type-bool-for-int", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: true) }
          layers { embed; local; head tied }
        }
        """,
         ("3:67", "'hidden' of mlp must be an integer, got true", None)),
    case("wrong-type-symbol-for-int", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: windw); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:40", "'window' of block_attention must be an integer, got 'windw'",
          "'windw' is not a parameter; did you mean 'window'?")),
    case("wrong-choice", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128, act: gleu) }
          layers { embed; local; head tied }
        }
        """,
         ("3:80", "'act' of mlp must be one of gelu, swiglu, relu, got 'gleu'", "did you mean 'gelu'?")),
    case("out-of-range", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128, dropout: 1.5) }
          layers { embed; local; head tied }
        }
        """,
         ("3:80", "'dropout' of mlp must be ≤ 0.99, got 1.5", None)),
    case("missing-required-argument", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(act: relu) }
          layers { embed; local; head tied }
        }
        """,
         ("3:57", "mlp 'mlp' needs parameter 'hidden'",
          "e.g. `mlp = mlp(hidden: ...)` — hidden width, e.g. 4 * d_model")),
    case("odd-ssm-state", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 15)
            attn = block_attention(window: window, context: ssm -> sh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("4:16", "s4d state must be even (N/2 complex modes), got 15", "try state: 16")),
    case("wrong-universal-norm", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window, norm: batch); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:56", "'norm' must be one of rms, layer, none, got 'batch'", None)),
    case("wrong-universal-placement", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128, placement: pos) }
          layers { embed; local; head tied }
        }
        """,
         ("3:80", "'placement' must be one of pre, post, got 'pos'", None)),
    case("negative-model-size", """
        model m {
          vocab = 256; d_model = -64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("2:16", "'d_model' must be a positive integer, got -64", None)),
    case("missing-required-parameter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("1:7", "model 'm' does not define 'seq_len'", "add `seq_len = ...` at the top of the model")),
    case("wrong-dtype", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          dtype = float16
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:3", "'dtype' must be one of float32, bfloat16, got 'float16'", "did you mean 'bfloat16'?")),
    case("repeat-count-zero", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; repeat 0 { local }; head tied }
        }
        """,
         ("4:26", "repeat count must be a positive integer, got 0", None)),
    case("unknown-final-norm", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; norm rsm; head tied }
        }
        """,
         ("4:31", "unknown norm 'rsm'", "did you mean 'rms'?")),
    case("unknown-head", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tide }
        }
        """,
         ("4:31", "unknown head 'tide'", "did you mean 'tied'?")),

    # ---- expressions ----------------------------------------------------------------------------
    case("expr-unknown-parameter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 4 * d_modl) }
          layers { embed; local; head tied }
        }
        """,
         ("3:79", "unknown parameter 'd_modl'", "did you mean 'd_model'?")),
    case("expr-division-by-zero", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          head_dim = d_model // (heads - 4)
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:14", "division by zero", None)),
    case("expr-forward-reference", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          mlp_hidden = 4 * expand
          expand = 2
          block local { attn = block_attention(window: window); mlp = mlp(hidden: mlp_hidden) }
          layers { embed; local; head tied }
        }
        """,
         ("3:20", "parameter 'expand' is used before it is defined", "move `expand = ...` above line 3")),
    case("expr-self-reference", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          width = width + 1
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:11", "parameter 'width' refers to itself", None)),
    case("expr-string-in-arithmetic", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: "wide" * 2) }
          layers { embed; local; head tied }
        }
        """,
         ("3:75", 'expected a number in arithmetic, got "wide"', None)),
    case("expr-too-large", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          huge = 10 ** 40
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:10", "number too large", "numbers are limited to 10^18")),

    # ---- model-wide divisibility ---------------------------------------------------------------
    case("seq-len-not-divisible-by-window", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 100
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("2:54", "seq_len (100) is not divisible by window (16)", "try seq_len = 96 or 112")),
    case("d-model-not-divisible-by-heads", """
        model m {
          vocab = 256; d_model = 60; heads = 8; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("2:16", "d_model (60) is not divisible by heads (8)", "try d_model = 56 or 64")),

    case("size-errors-do-not-hide-the-layers-own-mistakes", """
        model m {
          vocab = 256; d_model = 60; heads = 8; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 7)
            attn = block_attention(window: 24, context: ssm -> mf)
          }
          layers { embed; bst; head tied }
        }
        """,
         # The odd state and the one-filter mf source are wrong whatever the sizes; the window
         # that does not divide seq_len depends on them, so it waits until the sizes are fixed.
         ("2:16", "d_model (60) is not divisible by heads (8)", "try d_model = 56 or 64"),
         ("4:16", "s4d state must be even (N/2 complex modes), got 7", "try state: 8"),
         ("5:49", "context variant 'mf' needs a source with several filters, but it has 1",
          "give the source e.g. `filters: 16` (S context vectors per block)")),

    case("window-does-not-divide-seq-len", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: 24); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:40", "seq_len (64) is not divisible by window (24)",
          "the sequence is split into blocks of `window` tokens")),
    case("attention-heads-do-not-divide-d-model", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window, heads: 3); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:56", "d_model (64) is not divisible by heads (3)", "choose heads that divide d_model")),

    # ---- context edges ----------------------------------------------------------------------------
    case("context-source-undefined", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16)
            attn = block_attention(window: window, context: ssm2 -> sh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("5:53", "context source 'ssm2' is not defined in block 'bst'",
          "did you mean 'ssm'?; defined here: ssm (line 4)")),
    case("context-source-after-use", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            attn = block_attention(window: window, context: ssm -> sh)
            ssm  = s4d(state: 16)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("4:53", "context source 'ssm' is defined after 'attn' in block 'bst'",
          "move `ssm = ...` above `attn = ...`: a context source must precede its use")),
    case("context-on-op-without-context", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16)
            mlp  = mlp(hidden: 128, context: ssm -> sh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("5:38", "layer kind 'mlp' does not take a context edge", "context edges feed block_attention")),
    case("context-unknown-variant", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16)
            attn = block_attention(window: window, context: ssm -> mhh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("5:60", "unknown context variant 'mhh'", "did you mean 'mh'?")),
    case("context-unknown-variant-via-block-parameter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst(context = sh) {
            ssm  = s4d(state: 16)
            attn = block_attention(window: window, context: ssm -> context)
          }
          layers { embed; bst; bst(context = single); head tied }
        }
        """,
         ("7:38", "unknown context variant 'single'", "variants: mf, mh, none, sh")),
    case("context-source-not-ssm", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            mlp  = mlp(hidden: 128)
            attn = block_attention(window: window, context: mlp -> sh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("5:53", "'mlp' (mlp) cannot be a context source",
          "context sources are SSM sublayers such as s4d or long_conv")),
    case("context-own-source", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            attn = block_attention(window: window, context: attn -> sh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("4:53", "sublayer 'attn' cannot be its own context source", None)),
    case("context-edge-as-other-argument", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16)
            attn = block_attention(window: ssm -> sh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("5:36", "a context edge can only be given as 'context', not 'window'", None)),

    # ---- several context edges (`context: [a -> mf, b -> sh]`) -------------------------------------
    case("context-list-source-twice", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16, filters: 4)
            attn = block_attention(window: window, context: [ssm -> mf, ssm -> sh])
          }
          layers { embed; bst; head tied }
        }
        """,
         ("5:65", "context source 'ssm' is named twice in the context of 'attn'",
          "each source gives one context set; name it once (for more context vectors give it more filters "
          "with `-> mf`)")),
    case("context-list-each-edge-fits-its-source", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16)
            conv = long_conv()
            attn = block_attention(window: window, context: [ssm -> mf, conv -> mh])
          }
          layers { embed; bst; head tied }
        }
        """,
         ("6:54", "context variant 'mf' needs a source with several filters, but it has 1",
          "give the source e.g. `filters: 16` (S context vectors per block)"),
         ("6:65", "context variant 'mh' needs one source filter per head (4), but the source has 1",
          "give the source `filters: 4` (= heads)")),
    case("context-list-every-edge-checked", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16)
            mlp  = mlp(hidden: 128)
            attn = block_attention(window: window, context: [ssm2 -> sh, mlp -> sh, ssm -> mff])
          }
          layers { embed; bst; head tied }
        }
        """,
         ("6:54", "context source 'ssm2' is not defined in block 'bst'",
          "did you mean 'ssm'?; defined here: ssm (line 4), mlp (line 5)"),
         ("6:66", "'mlp' (mlp) cannot be a context source",
          "context sources are SSM sublayers such as s4d or long_conv"),
         ("6:84", "unknown context variant 'mff'", "did you mean 'mf'?")),
    case("context-list-own-window-with-mf", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16)
            conv = long_conv(filters: 4)
            attn = block_attention(window: window, context_block: own, context: [ssm -> sh, conv -> mf])
          }
          layers { embed; bst; head tied }
        }
        """,
         ("6:44", "`context_block: own` applies to every context edge of the layer, and edge 2 is 'mf' "
          "(own applies to the 'sh' and 'mh' variants only)",
          "feed the mf source to a block_attention of its own, use `-> sh` or `-> mh` for an own-window "
          "context, or drop `context_block`")),
    case("context-given-twice", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16)
            conv = long_conv()
            attn = block_attention(window: window, context: ssm -> sh, context: conv -> sh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("6:64", "argument 'context' is given twice",
          "give several context sources as one list: `context: [ssm -> mf, conv -> sh]`")),
    case("context-source-in-another-block", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block a { ssm = s4d(state: 16, residual: true) }
          block bst {
            conv = long_conv()
            attn = block_attention(window: window, context: [conv -> sh, a.ssm -> sh])
          }
          layers { embed; a; bst; head tied }
        }
        """,
         ("6:67", "a context source must be a sublayer of this block, not 'block.sublayer'", EDGE_ACROSS_BLOCKS)),

    # ---- shapes ------------------------------------------------------------------------------------
    case("multi-filter-ssm-joins-residual", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16, filters: 4)
            attn = block_attention(window: window)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("4:5", "sublayer 'ssm' outputs (B, 64, 4, 64), which cannot join the residual stream ((B, 64, 64))",
          "feed it to block_attention with a context edge, or give it `filters: 1`")),

    case("mh-context-with-wrong-filters", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = s4d(state: 16, filters: 2)
            attn = block_attention(window: window, context: ssm -> mh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("5:53", "context variant 'mh' needs one source filter per head (4), but the source has 2",
          "give the source `filters: 4` (= heads)")),
    case("sh-context-with-several-filters", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst {
            ssm  = long_conv(filters: 8)
            attn = block_attention(window: window, context: ssm -> sh)
          }
          layers { embed; bst; head tied }
        }
        """,
         ("5:53", "context variant 'sh' needs a source with 1 filter, but it has 8",
          "use `-> mf` for several filters, or give the source `filters: 1`")),
    case("mf-context-with-one-filter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block bst(context = sh) {
            ssm  = s4d(state: 16)
            attn = block_attention(window: window, context: ssm -> context)
          }
          layers { embed; bst(context = mf); head tied }
        }
        """,
         ("5:53", "context variant 'mf' needs a source with several filters, but it has 1",
          "give the source e.g. `filters: 16` (S context vectors per block)")),

    # ---- duplicates ----------------------------------------------------------------------------------
    case("duplicate-block", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          block local { mlp = mlp(hidden: 256) }
          layers { embed; local; head tied }
        }
        """,
         ("4:9", "block 'local' is defined twice", "first defined at line 3")),
    case("duplicate-sublayer", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local {
            attn = block_attention(window: window)
            attn = mlp(hidden: 128)
          }
          layers { embed; local; head tied }
        }
        """,
         ("5:5", "sublayer 'attn' is defined twice in block 'local'", "first defined at line 4")),
    case("duplicate-parameter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          d_model = 128
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:3", "parameter 'd_model' is defined twice", "first defined at line 2")),
    case("duplicate-argument", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128, hidden: 256) }
          layers { embed; local; head tied }
        }
        """,
         ("3:80", "argument 'hidden' is given twice", None)),
    case("duplicate-block-parameter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local(w = 16, w = 32) { attn = block_attention(window: w); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
        }
        """,
         ("3:23", "block parameter 'w' is declared twice", None)),

    # ---- the stack: overrides, builtins, sharing -------------------------------------------------
    case("override-missing-occurrence", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers {
            embed
            repeat 3 { local }
            local.3 { mlp.hidden = 256 }
            head tied
          }
        }
        """,
         ("7:5", "block 'local' has no occurrence 3", "occurrences are local.0 … local.2")),
    case("override-unknown-sublayer", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers {
            embed
            repeat 3 { local }
            local.1 { mpl.hidden = 256 }
            head tied
          }
        }
        """,
         ("7:15", "block 'local' has no sublayer 'mpl'", "did you mean 'mlp'?")),
    case("override-unknown-argument", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers {
            embed
            repeat 3 { local }
            local.1 { mlp.hiden = 256 }
            head tied
          }
        }
        """,
         ("7:15", "layer kind 'mlp' has no parameter 'hiden'", "did you mean 'hidden'?")),
    case("override-unknown-block", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; locale.0 { mlp.hidden = 256 }; head tied }
        }
        """,
         ("4:26", "unknown block 'locale'", "did you mean 'local'?")),
    case("missing-embed", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { local; head tied }
        }
        """,
         ("4:3", "layers must start with `embed`", None)),
    case("missing-head", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; norm rms }
        }
        """,
         ("4:3", "layers must end with `head tied` or `head untied`", None)),
    case("embed-not-first", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { local; embed; head tied }
        }
        """,
         ("4:19", "`embed` must be the first entry of layers", None)),
    case("builtin-inside-repeat", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; repeat 2 { local; norm rms }; head tied }
        }
        """,
         ("4:37", "'norm' cannot be inside 'repeat'", None)),
    case("share-group-mixes-blocks", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          block wide { attn = block_attention(window: window); mlp = mlp(hidden: 256) }
          layers { embed; local share g; wide share g; head tied }
        }
        """,
         ("5:34", "share group 'g' mixes different layers",
          "wide.0 differs from local.0; shared weights need identical blocks and arguments")),

    # ---- --set overrides -----------------------------------------------------------------------------
    case("set-unknown-parameter", GOOD,
         ("<--set>:1:1", "--set d_modle: the model has no parameter 'd_modle'", "did you mean 'd_model'?"),
         overrides={"d_modle": 128}),
    case("set-bad-expression", GOOD,
         ("<--set>:1:10", "cannot parse expression '4*'",
          "expressions use numbers, parameter names, + - * / // % ** and parentheses"),
         overrides={"d_model": "4*"}),
    case("set-wrong-type", GOOD,
         ("<--set>:1:1", "'heads' must be a positive integer, got 'many'", None),
         overrides={"heads": "many"}),
    case("set-forward-reference", GOOD,
         ("<--set>:1:9", "parameter 'heads' is used before it is defined",
          "an override is evaluated where 'd_model' is defined (line 2), above `heads = ...`"),
         overrides={"d_model": "heads * 16"}),
    case("set-self-reference", GOOD,
         ("<--set>:1:9", "parameter 'd_model' refers to itself",
          "an override replaces 'd_model'; it cannot use the value it replaces"),
         overrides={"d_model": "d_model * 2"}),
    case("set-breaks-divisibility", GOOD,
         ("2:54", "seq_len (64) is not divisible by window (24)", "try seq_len = 48 or 72"),
         overrides={"window": 24}),

    # ---- YAML ----------------------------------------------------------------------------------------
    case("yaml-unknown-top-level-key", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blokcs:
          local:
            layers:
              attn: {kind: block_attention, window: window}
              mlp: {kind: mlp, hidden: 128}
        layers: [embed, local, {head: tied}]
        """,
         ("3:1", "unknown key 'blokcs' in the model file", "did you mean 'blocks'?")),
    case("yaml-unknown-block-key", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          local:
            layer:
              attn: {kind: block_attention, window: window}
              mlp: {kind: mlp, hidden: 128}
        layers: [embed, local, {head: tied}]
        """,
         ("4:3", "block 'local' has no 'layers'", None),
         ("5:5", "unknown key 'layer' in block 'local'", "did you mean 'layers'?")),
    case("yaml-unknown-layer-entry-key", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          local:
            layers:
              attn: {kind: block_attention, window: window}
              mlp: {kind: mlp, hidden: 128}
        layers: [embed, {use: local, shared: g}, {head: tied}]
        """,
         ("8:30", "unknown key 'shared' in a layer entry", "did you mean 'share'?")),
    case("yaml-unknown-argument", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          local:
            layers:
              attn: {kind: block_attention, window: window}
              mlp: {kind: mlp, hiden: 128}
        layers: [embed, local, {head: tied}]
        """,
         ("7:24", "layer kind 'mlp' has no parameter 'hiden'", "did you mean 'hidden'?")),
    case("yaml-unknown-layer-kind", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          local:
            layers:
              attn: {kind: block_atention, window: window}
              mlp: {kind: mlp, hidden: 128}
        layers: [embed, local, {head: tied}]
        """,
         ("6:20", "unknown layer kind 'block_atention'", "did you mean 'block_attention'?")),
    case("yaml-duplicate-key", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64, window: 32}
        blocks:
          local:
            layers:
              attn: {kind: block_attention, window: window}
              mlp: {kind: mlp, hidden: 128}
        layers: [embed, local, {head: tied}]
        """,
         ("2:70", "duplicate key 'window' in 'params'", "YAML would silently keep only the last one")),
    case("yaml-unsafe-tag", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          local:
            layers:
              attn: {kind: block_attention, window: !!python/object/apply:os.system [echo hi]}
              mlp: {kind: mlp, hidden: 128}
        layers: [embed, local, {head: tied}]
        """,
         ("6:45", "YAML tag '!!python/object/apply:os.system' is not allowed",
          "model files are plain data: use only strings, numbers, booleans, lists and maps")),
    case("yaml-alias", """
        model: m
        params: &p {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64, again: *p}
        blocks:
          local:
            layers:
              attn: {kind: block_attention, window: window}
              mlp: {kind: mlp, hidden: 128}
        layers: [embed, local, {head: tied}]
        """,
         ("2:80", "YAML aliases are not allowed", "write the value out: model files are plain data")),
    case("yaml-syntax-error", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64
        blocks:
          local:
            layers:
              attn: {kind: block_attention, window: window}
              mlp: {kind: mlp, hidden: 128}
        layers: [embed, local, {head: tied}]
        """,
         ("3:7", "YAML syntax error: expected ',' or '}', but got ':'", None)),
    case("yaml-bad-expression", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          local:
            layers:
              attn: {kind: block_attention, window: window}
              mlp: {kind: mlp, hidden: "4 * * d_model"}
        layers: [embed, local, {head: tied}]
        """,
         ("7:37", "cannot parse expression '4 * * d_model'",
          "expressions use numbers, parameter names, + - * / // % ** and parentheses")),
    case("yaml-bad-override-target", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          local:
            layers:
              attn: {kind: block_attention, window: window}
              mlp: {kind: mlp, hidden: 128}
        layers: [embed, local, {override: local3, set: {mlp.hidden: 256}}, {head: tied}]
        """,
         ("8:35", "'override' names an occurrence like 'bst.3'", None)),
    case("yaml-context-source-undefined", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          bst:
            layers:
              ssm: {kind: s4d, state: 16}
              attn: {kind: block_attention, window: window, context: sm -> sh}
        layers: [embed, bst, {head: tied}]
        """,
         ("7:62", "context source 'sm' is not defined in block 'bst'",
          "did you mean 'ssm'?; defined here: ssm (line 6)")),
    case("yaml-context-list-source-in-another-block", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          bst:
            layers:
              ssm: {kind: s4d, state: 16, filters: 4}
              conv: {kind: long_conv}
              attn: {kind: block_attention, window: window, context: [ssm -> mf, a.conv -> sh]}
        layers: [embed, bst, {head: tied}]
        """,
         ("8:75", "a context source must be a sublayer of this block, not 'block.sublayer'", EDGE_ACROSS_BLOCKS)),
    case("yaml-context-list-not-edges", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          bst:
            layers:
              ssm: {kind: s4d, state: 16, filters: 4}
              attn: {kind: block_attention, window: window, context: [ssm -> mf, 3]}
        layers: [embed, bst, {head: tied}]
        """,
         ("7:74", "a list value holds context edges, `source -> variant`", "e.g. `context: [ssm -> mf, conv -> sh]`")),

    # ---- mesh and rules ----------------------------------------------------------------------------
    case("mesh-unknown-mesh-axis", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
          mesh { data = 2, tensor = 2 }
          rules { batch -> data; heads -> tensr }
        }
        """,
         ("6:35", "rule 'heads' names unknown mesh axis 'tensr'", "did you mean 'tensor'?")),
    case("mesh-logical-axis-claimed-twice", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
          mesh { data = 2, tensor = 2 }
          rules {
            batch -> data
            batch -> tensor
          }
        }
        """,
         ("8:5", "logical axis 'batch' is claimed by two rules", "the first is at line 7; keep one")),
    case("mesh-unknown-logical-axis", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
          mesh { data = 2, tensor = 2 }
          rules { batch -> data; btach -> tensor }
        }
        """,
         ("6:26", "unknown logical axis 'btach'", "did you mean 'batch'?")),
    case("mesh-axis-declared-twice", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
          mesh { data = 2, data = 4 }
        }
        """,
         ("5:20", "mesh axis 'data' is declared twice", "first declared at line 5")),
    case("mesh-axis-size-zero", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
          mesh { data = 0 }
        }
        """,
         ("5:10", "mesh axis 'data' must have a positive integer size, got 0", None)),
    case("mesh-rule-unknown-default-axis", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window); mlp = mlp(hidden: 128) }
          layers { embed; local; head tied }
          rules { batch -> (data, gpu) }
        }
        """,
         ("5:20", "rule 'batch' names unknown mesh axis 'gpu'", "mesh axes: data, fsdp, tensor")),

    # ---- patterns and placements -----------------------------------------------------------------
    case("pattern-unknown-letter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window) }
          layers { embed; pattern "LLKL" { L = local }; head tied }
        }
        """,
         ("4:30", "letter 'K' of the pattern is not bound to a block", "bind 'K' to a block next to the pattern")),
    case("pattern-letter-bound-twice", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window) }
          layers { embed; pattern "LL" { L = local; L = local }; head tied }
        }
        """,
         ("4:45", "letter 'L' is bound twice in this pattern", "first at line 4")),
    case("pattern-unused-letter", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window) }
          layers { embed; pattern "LL" { L = local; B = local }; head tied }
        }
        """,
         ("4:45", "letter 'B' is bound but not used in the pattern", "remove it")),
    case("place-out-of-range", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window) }
          layers { embed; repeat 4 { local }; at [1, -5] local; head tied }
        }
        """,
         ("4:46", "position -5 is outside the stack of 4 blocks", "positions are 0 … 3, or -4 … -1 from the end")),
    case("place-overlap", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window) }
          layers { embed; repeat 8 { local }; every 2 from 1 local; at [-1] local; head tied }
        }
        """,
         ("4:61", "position 7 of the stack is placed twice", "the first placement is at line 4; keep one")),
    case("place-inside-repeat", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window) }
          layers { embed; repeat 4 { local; at [0] local }; head tied }
        }
        """,
         ("4:37", "a placement (`every`, `at`) cannot be inside 'repeat'",
          "write it at the top level of layers: it places into the whole stack")),
    case("place-every-zero", """
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window) }
          layers { embed; repeat 4 { local }; every 0 from 1 local; head tied }
        }
        """,
         ("4:45", "`every` needs a positive integer step, got 0", None)),
    case("yaml-pattern-unknown-letter", """
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          local: {layers: {attn: {kind: block_attention, window: window}}}
        layers:
          - embed
          - {pattern: "LKL", blocks: {L: local}}
          - {head: tied}
        """,
         ("7:17", "letter 'K' of the pattern is not bound to a block", "bind 'K' to a block next to the pattern")),

    # ---- imports -----------------------------------------------------------------------------------
    case("import-missing-file", """
        import "nope.bst"
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window) }
          layers { embed; local; head tied }
        }
        """,
         ("1:8", "cannot find 'nope.bst' to import",
          "a path relative to this file's directory, or a zoo library: blocks, s4_blocks")),
    case("import-cycle", """
        import "a.bst"
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          layers { embed; local; head tied }
        }
        """,
         ("b.bst:1:8", "import cycle: a.bst -> b.bst -> a.bst",
          "a.bst imports b.bst at a.bst:1:8: a library cannot import a file that imports it; "
          "move what both need into a third library"),
         ("1:8", "the errors are in the imported files", "the first is at b.bst:1:8"),
         files={"a.bst": """
             import "b.bst"
             library a {
               block local { attn = block_attention(window: window) }
             }
             """, "b.bst": """
             import "a.bst"
             library b {
               block x { attn = block_attention(window: window) }
             }
             """}),
    case("import-itself", """
        import "import-itself.bst"
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = block_attention(window: window) }
          layers { embed; local; head tied }
        }
        """,
         ("1:8", "import cycle: import-itself.bst -> import-itself.bst", "remove this import")),
    case("import-a-model", """
        import "other.bst"
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          layers { embed; local; head tied }
        }
        """,
         ("1:8", "'other.bst' is a model, not a library",
          "only a library (`library NAME { parameters and blocks }`) can be imported; "
          "move the blocks to share from other.bst into one"),
         files={"other.bst": """
             model other {
               vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
               block local { attn = block_attention(window: window) }
               layers { embed; local; head tied }
             }
             """}),
    case("import-block-clash", """
        import "lib.bst"
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          block local { attn = sliding_attention(window: window) }
          layers { embed; local; head tied }
        }
        """,
         ("4:9", "block 'local' is defined twice",
          "first defined at lib.bst:2:9; a name may be defined in one file only: rename or remove one"),
         files={"lib.bst": """
             library lib {
               block local { attn = block_attention(window: window) }
             }
             """}),
    case("import-parameter-clash", """
        import "lib.bst"
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          layers { embed; local; head tied }
        }
        """,
         ("3:41", "parameter 'window' is defined twice",
          "first defined at lib.bst:2:3; a name may be defined in one file only: rename or remove one"),
         files={"lib.bst": """
             library lib {
               window = 32
               block local { attn = block_attention(window: window) }
             }
             """}),
    case("import-two-libraries-clash", """
        import "a.bst"
        import "b.bst"
        model m {
          vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64
          layers { embed; local; head tied }
        }
        """,
         ("b.bst:2:9", "block 'local' is defined twice",
          "first defined at a.bst:2:9; a name may be defined in one file only: rename or remove one"),
         ("5:19", "block 'local' is used here", "its error is at b.bst:2:9"),
         files={"a.bst": """
             library a {
               block local { attn = block_attention(window: window) }
             }
             """, "b.bst": """
             library b {
               block local { attn = sliding_attention(window: window) }
             }
             """}),
    case("library-is-not-a-model", """
        library lib {
          block local { attn = block_attention(window: window) }
        }
        """,
         ("1:9", "'lib' is a library, not a model",
          "import it from a model (`import \"FILE\"`); `bstc validate` checks a library's blocks")),
    case("library-has-no-layers", """
        library lib {
          block local { attn = block_attention(window: window) }
          layers { embed; local; head tied }
        }
        """,
         ("3:3", "unexpected 'layers'",
          "a library holds parameters and blocks; the stack belongs to the models that import it")),
    case("yaml-import-missing-file", """
        imports: [nope.yaml]
        model: m
        params: {vocab: 256, d_model: 64, heads: 4, window: 16, seq_len: 64}
        blocks:
          local: {layers: {attn: {kind: block_attention, window: window}}}
        layers: [embed, local, {head: tied}]
        """,
         ("1:11", "cannot find 'nope.yaml' to import",
          "a path relative to this file's directory, or a zoo library: blocks, s4_blocks")),
    case("yaml-library-has-no-layers", """
        library: lib
        blocks:
          local: {layers: {attn: {kind: block_attention, window: window}}}
        layers: [embed, local, {head: tied}]
        """,
         ("4:1", "a library has no 'layers'",
          "a library holds parameters and blocks; the stack belongs to the models that import it")),
]


def _where(d, path) -> str:
    if d.span is None:
        return "-"
    loc = f"{d.span.line}:{d.span.col}"
    return loc if d.span.file == str(path) else f"{_local(d.span.file, path)}:{loc}"


def _local(text, path):
    """`text` with the test directory left out (imported files are named by their full path)."""
    return text.replace(f"{path.parent}/", "") if text else text


def _diagnose(c: Case, tmp_path):
    path = tmp_path / f"{c.id}{c.suffix}"
    path.write_text(c.text)
    for name, text in c.files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(BstcError) as info:
        bstc.parse(str(path), overrides=c.overrides or None)
    return path, info.value


def test_table_is_big_and_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 30


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_example(c: Case, tmp_path):
    path, err = _diagnose(c, tmp_path)
    got = [(_where(d, path), d.message, _local(d.hint, path)) for d in err.diagnostics]
    assert got == [tuple(e) for e in c.expected]
    # Every diagnostic renders as `file:line:col: error: message`, with the source line and a
    # caret under the reported column when it points into the model file.
    text = err.render()
    for d in err.diagnostics:
        assert f"{d.span}: {d.severity}: {d.message}" in text
        if d.span.file == str(path):
            src = c.text.splitlines()[d.span.line - 1]
            assert f"{d.span.line} | {src}" in text
            assert re.search(rf"^ *\| {' ' * (d.span.col - 1)}\^", text, re.M)
        if d.hint:
            assert f"= help: {d.hint}" in text
    n = sum(d.severity == "error" for d in err.diagnostics)
    if n > 1:
        assert text.endswith(f"found {n} errors")
    else:
        assert "found" not in text.splitlines()[-1]  # notes are not counted




def test_three_independent_mistakes_are_all_reported_with_carets(tmp_path):
    path = tmp_path / "three.bst"
    path.write_text(THREE_MISTAKES)
    with pytest.raises(BstcError) as info:
        bstc.parse(str(path))
    err = info.value
    assert [(d.span.line, d.span.col, d.message) for d in err.diagnostics] == [
        (3, 3, "seq_len (100) is not divisible by window (16)"),
        (5, 12, "unknown layer kind 's4dd'"),
        (6, 53, "context source 'ssm2' is not defined in block 'bst'"),
    ]
    lines = err.render().splitlines()
    # each error line is followed by ` |`, `N | <source line>`, ` | <spaces>^^^`
    for (line, col, width) in ((3, 3, 7), (5, 12, 4), (6, 53, 4)):
        head = next(i for i, ln in enumerate(lines) if ln.startswith(f"{path}:{line}:{col}: error:"))
        assert lines[head + 2] == f"{line} | {THREE_MISTAKES.splitlines()[line - 1]}"
        caret = lines[head + 3]
        assert caret == "  | " + " " * (col - 1) + "^" * width
    assert lines[-1] == "found 3 errors"
