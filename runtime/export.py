"""`bstc export RUN -o model.safetensors`: a trained model that leaves its run directory.

Writes the checkpoint's parameters as safetensors (`bstc.weights`: dotted parameter paths,
scanned stacks stored stacked) and, beside them, the **resolved** model file: the run's model
file with the run's overrides (`--set`, the tiny preset) written into its parameter lines, so

    bstc.load("model.bst", weights="model.safetensors")

rebuilds the trained model with no overrides and no run directory. The resolved file is checked
before anything is written: it must compile to the IR the run trained (the same fingerprint).
A run trained with a tokenizer gets it copied beside them too (`NAME.tokenizer.json`, or
`NAME.tokenizer.model` for SentencePiece).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from bstc.runtime.errors import UsageError
from bstc.runtime.rundir import RunFiles


def _value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def resolved_model_text(path: Path, overrides: dict[str, Any]) -> str:
    """The model file's text with each override written as its parameter's value (a parameter
    line `name = value  # comment` keeps its comment); an override of a setting the file does not
    declare (dtype, norm, …) becomes a new line after the last parameter."""
    from bstc.frontend import parse_ast

    text = Path(path).read_text(encoding="utf-8-sig")
    if not overrides:
        return text
    tree = parse_ast(str(path))[0]
    yaml = Path(path).suffix in (".yaml", ".yml")
    sep = ":" if yaml else "="
    lines = text.split("\n")
    declared = {a.name: a.span for a in tree.assigns}
    last = max((s.line for s in declared.values() if s is not None), default=None)
    added = []
    for name, value in overrides.items():
        span = declared.get(name)
        if span is None:
            added.append((name, value))
            continue
        i = span.line - 1
        m = re.match(rf"^(\s*{re.escape(name)}\s*{sep}\s*)(.*?)(\s+#.*)?$", lines[i])
        if not m:
            raise UsageError(f"cannot write override {name}={value} into {path}:{span.line}")
        lines[i] = m.group(1) + _value_text(value) + (m.group(3) or "")
    if added:
        if last is None:
            raise UsageError(f"cannot write overrides {dict(added)} into {path}: it declares no parameters")
        indent = re.match(r"^\s*", lines[last - 1]).group(0)
        lines[last:last] = [f"{indent}{k}{' ' if not yaml else ''}{sep} {_value_text(v)}" for k, v in added]
    return "\n".join(lines)


def export_run(run_dir: Path, out: Path, step: int | None = None, say=print) -> dict[str, Path]:
    """Write the run's weights (latest readable checkpoint, or `step`) to `out` and the resolved
    model file beside it. Returns the paths written."""
    import bstc
    from bstc import weights as W
    from bstc.runtime.evaluator import load_model, load_run

    run_dir, out = Path(run_dir), Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"-o {out}: the weights file must end in .safetensors")
    if out.exists() and out.is_dir():
        raise UsageError(f"-o {out} is a directory: give a file name ending in .safetensors")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: the directory {out.parent} does not exist")
    cfg, info = load_run(run_dir)
    if not info.get("model_file"):
        raise UsageError(f"run '{run_dir}' has no saved model file to export")
    src = run_dir / info["model_file"]
    overrides = info.get("overrides") or {}
    model_out = out.with_suffix(src.suffix or ".bst")
    resolved = resolved_model_text(src, overrides)
    want = W.fingerprint(bstc.parse(str(src), overrides=overrides or None))
    tmp_model = model_out.with_name(model_out.name + ".partial" + (src.suffix or ".bst"))
    tmp_model.write_text(resolved)
    try:
        try:
            got = W.fingerprint(bstc.parse(str(tmp_model)))
        except bstc.BstcError as e:
            raise UsageError(f"the resolved model file does not compile: {e.diagnostics[0].message}") from None
        if got != want:
            raise UsageError(f"the resolved model file differs from the run's model (overrides {overrides}); "
                             "it was not written")
        model, at, _cfg, spec = load_model(run_dir, step=step)
        meta = dict(model=spec.name, fingerprint=want, step=str(at), vocab=str(spec.vocab),
                    seq_len=str(spec.seq_len), overrides=overrides, model_file=model_out.name)
        tok = RunFiles(run_dir).saved_tokenizer()
        written = {}
        if tok is not None:
            tok_out = out.with_name(out.stem + "." + tok.name)
            shutil.copyfile(tok, tok_out)
            meta["tokenizer"] = tok_out.name
            written["tokenizer"] = tok_out
        W.save(model, out, meta)
        tmp_model.replace(model_out)
    finally:
        if tmp_model.exists():
            tmp_model.unlink()
    written.update(weights=out, model=model_out)
    n = sum(int(x.size) for x in W.named_arrays(model).values())
    # Only a run of SCAN_MIN_COUNT or more repetitions is a scanned stack (bstc.lower.plan_stages).
    stacks = sum(st.stacked for st in model.stages)
    layout = f"; {stacks} scanned stack{'s' * (stacks != 1)} stored stacked" if stacks else ""
    say(f"wrote {out} ({n:,} parameters, step {at}{layout}) and {model_out}"
        + (f" and {written['tokenizer']}" if "tokenizer" in written else ""))
    say(f'load with: bstc.load("{model_out}", weights="{out}")')
    return written


def describe(path: Path) -> dict[str, Any]:
    """The metadata of an exported weights file (JSON values decoded)."""
    from bstc import weights as W

    _, meta = W.read(path)
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out
