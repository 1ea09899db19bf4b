"""Check a block library on its own (`bstc validate blocks.bst`): its imports, its parameters,
and each block's definition — names, sublayer kinds, argument names, context edges. The values
a block's arguments take are checked where a model uses the block: they may name the model's
parameters, which a library does not know."""
from __future__ import annotations

from bstc.errors import Collector, suggest, suggest_or_list
from bstc.ops import REGISTRY
from bstc.passes.check import DUPLICATE_SOURCE_HINT, VARIANTS
from bstc.passes.evaluate import Scope, evaluate
from bstc.passes.expand import UNIVERSAL_ARGS, block_table
from bstc.passes.resolve import _check_forward_refs, fresh_parameter
from bstc.syntax import ast


def check_library(lib: ast.ModelDef, errors: Collector) -> dict[str, ast.BlockDef]:
    scope = Scope({})
    seen: dict = {}
    later = {a.name: a for a in lib.assigns}
    for a in lib.assigns:
        if not fresh_parameter(a, seen, errors):
            continue
        if _check_forward_refs(a.value, scope, later, a.name, errors, a.span):
            scope.values[a.name] = evaluate(a.value, scope, errors)
    blocks = block_table(lib, scope, errors)
    for b in blocks.values():
        _check_block(b, errors)
    return blocks


def _check_edge(e: ast.Edge, s: ast.SubDef, b: ast.BlockDef, params: set, defined: dict, errors: Collector) -> None:
    """One edge of a sublayer's context: a source above it that can be one, a known variant."""
    if e.source not in defined:
        errors.error(e.source_span, f"context source '{e.source}' is not defined above '{s.name}' "
                     f"in block '{b.name}'", suggest(e.source, defined))
    elif defined[e.source] is not None and not defined[e.source].context_source:
        errors.error(e.source_span, f"'{e.source}' cannot be a context source",
                     "context sources are SSM sublayers such as s4d or long_conv")
    elif e.variant not in params and e.variant not in VARIANTS:
        errors.error(e.variant_span, f"unknown context variant '{e.variant}'",
                     suggest_or_list(e.variant, VARIANTS, "variants"))


def _check_block(b: ast.BlockDef, errors: Collector) -> None:
    params = {p.name for p in b.params}
    defined: dict[str, object] = {}  # sublayer -> its op (None: unknown kind)
    for s in b.subs:
        op = REGISTRY.get(s.kind)
        if op is None:
            errors.error(s.kind_span, f"unknown layer kind '{s.kind}'", suggest_or_list(s.kind, REGISTRY, "layer kinds"))
            defined[s.name] = None
            continue
        schema = {p.name for p in op.params}
        given = set()
        misspelled = set()  # required parameters an unknown argument was suggested for: not "missing" too
        for a in s.args:
            given.add(a.name)
            edges = ast.edges_of(a.value)
            if edges is not None:
                if a.name != "context":
                    errors.error(a.value.span, f"a context edge can only be given as 'context', not '{a.name}'")
                elif not op.accepts_context:
                    errors.error(a.value.span, f"layer kind '{s.kind}' does not take a context edge",
                                 "context edges feed block_attention")
                else:
                    named = set()
                    for e in edges:
                        if e.source in named:
                            errors.error(e.source_span, f"context source '{e.source}' is named twice in the "
                                         f"context of '{s.name}'", DUPLICATE_SOURCE_HINT)
                        named.add(e.source)
                        _check_edge(e, s, b, params, defined, errors)
                continue
            if a.name not in schema and a.name not in UNIVERSAL_ARGS:
                allowed = sorted(schema) + list(UNIVERSAL_ARGS) + (["context"] if op.accepts_context else [])
                errors.error(a.span, f"layer kind '{op.kind}' has no parameter '{a.name}'",
                             suggest_or_list(a.name, allowed, "parameters"))
                close = suggest(a.name, schema)
                if close:
                    misspelled.add(close.split("'")[1])
        for p in op.params:
            if p.required and p.name not in given and p.name not in misspelled:
                errors.error(s.span, f"{op.kind} '{s.name}' needs parameter '{p.name}'",
                             f"e.g. `{s.name} = {op.kind}({p.name}: ...)`" + (f" — {p.doc}" if p.doc else ""))
        defined[s.name] = op
