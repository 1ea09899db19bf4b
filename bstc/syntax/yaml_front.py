"""The YAML front end: the same meaning as the DSL, loaded safely, every node located.

The document is composed with yaml's SafeLoader (no object construction at all, so no tag
can run code) and walked node by node, which keeps each value's line and column for the
diagnostics. Any tag beyond plain YAML scalars, lists and maps is rejected, and so is every
unknown key: nothing is silently ignored.

    imports: [blocks.bst]                          # libraries (optional; a library file has `library: NAME`)
    model: NAME
    params: {vocab: 256, d_model: 512, ...}        # top-level parameters (values may be expressions)
    blocks:
      NAME:
        params: {context: sh}                      # block parameters with defaults (null = required)
        layers:
          SUB: {kind: s4d, state: 64}               # sublayers, in order
          attn: {kind: block_attention, window: window, context: ssm -> context}
    layers:                                        # the stack
      - embed                                      # or {embed: tokens}
      - {repeat: 3, layers: [local, {use: bst, args: {context: mf}}]}
      - {override: bst.3, set: {ssm.state: 128}}
      - {use: local, share: g}
      - {pattern: "LLBL", blocks: {L: local, B: {use: bst, args: {context: mf}}}}
      - {every: 4, from: 1, use: bst}                # placements: replace blocks of the stack
      - {at: [2, -1], use: bst}
      - {norm: rms}
      - {head: tied}
    mesh: {data: 2, tensor: 4}
    rules: {batch: data, heads: tensor, embed: [data, tensor]}
"""
from __future__ import annotations

import re

import yaml

from bstc.errors import Collector, Span, suggest_or_list
from bstc.syntax import ast
from bstc.syntax.dsl import parse_expr

_STD = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_STD + t for t in ("str", "int", "float", "bool", "null")}
_OK_TAGS = _SCALAR_TAGS | {_STD + "map", _STD + "seq"}

TOP_KEYS = ("imports", "model", "library", "params", "blocks", "layers", "mesh", "rules")
BLOCK_KEYS = ("params", "layers")


class _Walker:
    def __init__(self, file: str, errors: Collector):
        self.file, self.errors = file, errors

    def span(self, node) -> Span:
        s, e = node.start_mark, node.end_mark
        return Span(self.file, s.line + 1, s.column + 1, e.line + 1, e.column + 1)

    def err(self, node, msg, hint=None):
        self.errors.error(self.span(node) if node is not None else None, msg, hint)

    # ---- node helpers
    def check_tags(self, node) -> bool:
        ok = True
        if node.tag not in _OK_TAGS:
            self.err(node, f"YAML tag '{node.tag.replace(_STD, '!!')}' is not allowed",
                     "model files are plain data: use only strings, numbers, booleans, lists and maps")
            return False
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                ok &= self.check_tags(k) & self.check_tags(v)
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                ok &= self.check_tags(v)
        return ok

    def mapping(self, node, what: str, allowed=None) -> dict | None:
        if not isinstance(node, yaml.MappingNode):
            self.err(node, f"{what} must be a mapping")
            return None
        out = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.err(k, f"keys of {what} must be plain names")
                continue
            key = k.value
            if key in out:
                self.err(k, f"duplicate key '{key}' in {what}", "YAML would silently keep only the last one")
                continue
            if allowed is not None and key not in allowed:
                self.err(k, f"unknown key '{key}' in {what}", suggest_or_list(key, allowed, "allowed keys"))
                continue
            out[key] = (k, v)
        return out

    def name(self, node, what: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STD + "str" or not re.fullmatch(r"[A-Za-z_]\w*", node.value):
            self.err(node, f"{what} must be a name")
            return None
        return node.value

    def value(self, node, edge_ok: bool = True):
        """A scalar → expression AST (strings are parsed with the DSL's expression grammar); a
        list of edge strings → several context edges (`context: [ssm -> mf, conv -> sh]`)."""
        if isinstance(node, yaml.SequenceNode) and edge_ok and node.value:
            edges = [self.value(item) for item in node.value]
            if any(e is None for e in edges):
                return None  # reported
            bad = [(item, e) for item, e in zip(node.value, edges) if not isinstance(e, ast.Edge)]
            if bad:
                self.err(bad[0][0], "a list value holds context edges, `source -> variant`",
                         "e.g. `context: [ssm -> mf, conv -> sh]`")
                return None
            return ast.Edges(tuple(edges), self.span(node))
        if not isinstance(node, yaml.ScalarNode):
            self.err(node, "expected a number, name or expression")
            return None
        sp = self.span(node)
        if node.tag == _STD + "bool":
            return ast.Name("true" if yaml.safe_load(node.value) else "false", sp)
        if node.tag in (_STD + "int", _STD + "float"):
            v = yaml.safe_load(node.value)
            return ast.Num(v, sp)
        if node.tag == _STD + "null":
            self.err(node, "expected a value, got null")
            return None
        text = node.value
        col = sp.col + (1 if node.style in ("'", '"') else 0)
        v = parse_expr(text, self.file, sp.line, col, self.errors)
        if isinstance(v, (ast.Edge, ast.Edges)) and not edge_ok:
            self.err(node, "a context edge is only allowed as the 'context' argument of a sublayer")
            return None
        return v

    # ---- sections
    def model(self, root) -> ast.ModelDef | None:
        if not self.check_tags(root):
            return None
        top = self.mapping(root, "the model file", TOP_KEYS)
        if top is None:
            return None
        library = "library" in top and "model" not in top
        if "model" in top and "library" in top:
            self.err(top["library"][0], "a file is a model or a library, not both",
                     "a model file has `model: NAME`; a library has `library: NAME` and no layers")
            return None
        if library:
            for key in ("layers", "mesh", "rules"):
                if key in top:
                    self.err(top[key][0], f"a library has no '{key}'",
                             "a library holds parameters and blocks; the stack belongs to the models that import it")
        elif "model" not in top:
            self.err(root, "missing key 'model' (the model's name)")
            return None
        name = self.name(top["library" if library else "model"][1], "'library'" if library else "'model'")
        imports = []
        if "imports" in top:
            node = top["imports"][1]
            for item in node.value if isinstance(node, yaml.SequenceNode) else [node]:
                if isinstance(item, yaml.ScalarNode) and item.tag == _STD + "str" and item.value:
                    imports.append(ast.Import(item.value, self.span(item)))
                else:
                    self.err(item, "an import is a file name or a zoo library name, e.g. blocks.bst")
        assigns = self.named_values(top["params"][1], "'params'", ast.Assign) if "params" in top else []
        blocks = []
        if "blocks" in top:
            for bname, (kn, vn) in (self.mapping(top["blocks"][1], "'blocks'") or {}).items():
                b = self.block(bname, kn, vn)
                if b is not None:
                    blocks.append(b)
        layers, layers_span = (), None
        if "layers" in top:
            layers = self.stmts(top["layers"][1])
            layers_span = self.span(top["layers"][0])
        mesh = rules = None
        if "mesh" in top:
            mesh = []
            for key, (kn, vn) in (self.mapping(top["mesh"][1], "'mesh'") or {}).items():
                v = self.value(vn, edge_ok=False)
                if v is not None:
                    mesh.append(ast.MeshAxis(key, v, self.span(kn)))
            mesh = tuple(mesh)
        if "rules" in top:
            rules = []
            for key, (kn, vn) in (self.mapping(top["rules"][1], "'rules'") or {}).items():
                if isinstance(vn, yaml.SequenceNode):
                    targets = tuple(filter(None, (self.name(t, "a mesh axis") for t in vn.value)))
                else:
                    t = self.name(vn, "a mesh axis")
                    targets = (t,) if t else ()
                rules.append(ast.Rule(key, targets, self.span(kn), self.span(vn)))
            rules = tuple(rules)
        if name is None:
            return None
        if library:
            return ast.ModelDef(name, tuple(assigns), tuple(blocks), (), span=self.span(top["library"][1]),
                                imports=tuple(imports), library=True)
        return ast.ModelDef(name, tuple(assigns), tuple(blocks), tuple(layers), mesh, rules,
                            self.span(top["model"][1]), layers_span, imports=tuple(imports))

    def block(self, bname, kn, vn) -> ast.BlockDef | None:
        body = self.mapping(vn, f"block '{bname}'", BLOCK_KEYS)
        if body is None:
            return None
        params = []
        if "params" in body:
            for pname, (pk, pv) in (self.mapping(body["params"][1], f"params of block '{bname}'") or {}).items():
                default = None
                if not (isinstance(pv, yaml.ScalarNode) and pv.tag == _STD + "null"):
                    default = self.value(pv, edge_ok=False)
                params.append(ast.BlockParam(pname, default, self.span(pk)))
        subs = []
        if "layers" not in body:
            self.err(kn, f"block '{bname}' has no 'layers'")
        else:
            for sname, (sk, sv) in (self.mapping(body["layers"][1], f"layers of block '{bname}'") or {}).items():
                fields = self.mapping(sv, f"sublayer '{sname}'")
                if fields is None:
                    continue
                if "kind" not in fields:
                    self.err(sk, f"sublayer '{sname}' has no 'kind'", "e.g. {kind: s4d, state: 64}")
                    continue
                kind_node = fields.pop("kind")[1]
                kind = self.name(kind_node, "'kind'")
                args = []
                for aname, (ak, av) in fields.items():
                    v = self.value(av)
                    if v is not None:
                        args.append(ast.Arg(aname, v, self.span(ak)))
                if kind:
                    subs.append(ast.SubDef(sname, kind, tuple(args), self.span(sk), self.span(kind_node)))
        return ast.BlockDef(bname, tuple(params), tuple(subs), self.span(kn))

    _BUILTINS = ("embed", "norm", "head")
    _STMT_KEYS = ("use", "args", "share", "repeat", "layers", "override", "set", "pattern", "blocks", "every",
                  "from", "at") + _BUILTINS

    def stmts(self, node) -> tuple:
        if not isinstance(node, yaml.SequenceNode):
            self.err(node, "'layers' must be a list")
            return ()
        out = []
        for item in node.value:
            s = self.stmt(item)
            if s is not None:
                out.append(s)
        return tuple(out)

    def stmt(self, node):
        sp = self.span(node)
        if isinstance(node, yaml.ScalarNode):
            n = self.name(node, "a layer")
            if n is None:
                return None
            if n == "embed":
                return ast.Builtin("embed", None, sp)
            return ast.Use(n, (), None, sp)
        m = self.mapping(node, "a layer entry", self._STMT_KEYS)
        if m is None:
            return None
        for b in self._BUILTINS:
            if b in m:
                kn, vn = m[b]
                arg = None
                if not (isinstance(vn, yaml.ScalarNode) and vn.tag == _STD + "null"):
                    arg = self.name(vn, f"the argument of '{b}'")
                return ast.Builtin(b, arg, self.span(kn), self.span(vn) if arg else None)
        if "repeat" in m:
            count = self.value(m["repeat"][1], edge_ok=False)
            if "layers" not in m:
                self.err(node, "'repeat' needs 'layers'")
                return None
            return ast.Repeat(count, self.stmts(m["layers"][1]), self.span(m["repeat"][0])) if count else None
        if "override" in m:
            target = m["override"][1]
            mt = re.fullmatch(r"([A-Za-z_]\w*)\.(\d+)", getattr(target, "value", "") or "")
            if not mt:
                self.err(target, "'override' names an occurrence like 'bst.3'")
                return None
            settings = []
            for key, (kn, vn) in (self.mapping(m["set"][1], "'set'") if "set" in m else {}).items():
                ms = re.fullmatch(r"([A-Za-z_]\w*)\.([A-Za-z_]\w*)", key)
                if not ms:
                    self.err(kn, f"'{key}' must name a sublayer parameter like 'ssm.state'")
                    continue
                v = self.value(vn, edge_ok=False)
                if v is not None:
                    settings.append(ast.Setting(ms.group(1), ms.group(2), v, self.span(kn)))
            return ast.Override(mt.group(1), int(mt.group(2)), tuple(settings), self.span(target))
        if "pattern" in m:
            pn = m["pattern"][1]
            if not (isinstance(pn, yaml.ScalarNode) and isinstance(pn.value, str)):
                self.err(pn, "'pattern' is a string of letters, e.g. \"LLBL\"")
                return None
            if "blocks" not in m:
                self.err(node, "'pattern' needs 'blocks': {LETTER: block, ...}")
                return None
            bindings = []
            for letter, (kn, vn) in (self.mapping(m["blocks"][1], "'blocks'") or {}).items():
                use = self.use(vn)
                if use is not None:
                    bindings.append((letter, use, self.span(kn)))
            sp = self.span(pn)
            # the letters' columns: a quoted scalar starts with its quote, as in the DSL
            quoted = pn.style in ('"', "'")
            letters_span = sp if quoted else Span(sp.file, sp.line, sp.col - 1, sp.end_line, sp.end_col)
            return ast.Pattern(pn.value, tuple(bindings), self.span(m["pattern"][0]), letters_span)
        if "every" in m or "at" in m:
            use = self.use(node, m)
            if use is None:
                return None
            if "every" in m:
                if "from" not in m:
                    self.err(node, "'every' needs 'from': the first position")
                    return None
                step, start = self.value(m["every"][1], edge_ok=False), self.value(m["from"][1], edge_ok=False)
                return ast.Place(use, step=step, start=start, span=self.span(m["every"][0])) if step and start else None
            an = m["at"][1]
            items = an.value if isinstance(an, yaml.SequenceNode) else [an]
            at = tuple(v for v in (self.value(i, edge_ok=False) for i in items) if v is not None)
            return ast.Place(use, at=at, span=self.span(m["at"][0])) if len(at) == len(items) else None
        if "use" in m:
            return self.use(node, m)
        self.err(node, "a layer entry needs one of: use, repeat, override, pattern, every, at, embed, norm, head")
        return None

    def use(self, node, m=None):
        """A block use: a name, or {use: NAME, args: {...}, share: GROUP}."""
        if m is None:
            if isinstance(node, yaml.ScalarNode):
                n = self.name(node, "a block")
                return ast.Use(n, (), None, self.span(node)) if n else None
            m = self.mapping(node, "a block use", ("use", "args", "share"))
            if m is None:
                return None
        if "use" not in m:
            self.err(node, "this entry needs 'use': the block to place")
            return None
        block = self.name(m["use"][1], "'use'")
        args = self.named_values(m["args"][1], "'args'", ast.Arg) if "args" in m else []
        share = self.name(m["share"][1], "'share'") if "share" in m else None
        return ast.Use(block, tuple(args), share, self.span(m["use"][1])) if block else None

    def named_values(self, node, what: str, make) -> list:
        """{name: expression} → [make(name, value, span)], each value an expression (no edges)."""
        out = []
        for key, (kn, vn) in (self.mapping(node, what) or {}).items():
            v = self.value(vn, edge_ok=False)
            if v is not None:
                out.append(make(key, v, self.span(kn)))
        return out


def parse_yaml(text: str, file: str, errors: Collector) -> ast.ModelDef | None:
    try:
        # Aliases (`*name`) are refused before composing: a model file is plain data, and an
        # alias can make the document recursive or exponentially large.
        aliases = [ev for ev in yaml.parse(text, Loader=yaml.SafeLoader) if isinstance(ev, yaml.AliasEvent)]
        for ev in aliases:
            errors.error(_mark_span(text, file, ev.start_mark, ev.end_mark), "YAML aliases are not allowed",
                         "write the value out: model files are plain data")
        if aliases:
            return None
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark or e.context_mark
        sp = _mark_span(text, file, m) if m else None
        errors.error(sp, f"YAML syntax error: {e.problem or e.context}")
        return None
    except yaml.YAMLError as e:
        errors.error(Span(file, 1, 1), f"YAML error: {e}")
        return None
    except RecursionError:
        errors.error(Span(file, 1, 1), "YAML nesting is too deep")
        return None
    if root is None:
        errors.error(Span(file, 1, 1), "the model file is empty")
        return None
    try:
        return _Walker(file, errors).model(root)
    except RecursionError:
        errors.error(Span(file, 1, 1), "YAML nesting is too deep")
        return None


def _mark_span(text: str, file: str, start, end=None) -> Span:
    """A yaml Mark as a Span; a mark past the last line (end of stream) moves to the end of the last line."""
    lines = text.splitlines() or [""]
    line, col = start.line + 1, start.column + 1
    if line > len(lines):
        line, col = len(lines), len(lines[-1]) + 1
    if end is not None and end.line == start.line:
        return Span(file, line, col, line, col + max(end.column - start.column, 1))
    return Span(file, line, col)
