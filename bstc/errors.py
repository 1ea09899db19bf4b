"""Diagnostics: every error a user can cause carries a source span, a message and a hint.

Checks collect Diagnostics in a list and raise one BstcError holding all of them, so a
model file with three mistakes reports three errors at once.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A place in a source file; line and col are 1-based, end is exclusive."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    span: Span | None
    message: str
    hint: str | None = None
    severity: str = "error"


@dataclass
class BstcError(Exception):
    """One or more diagnostics; str() renders them like a compiler would."""

    diagnostics: list[Diagnostic]
    sources: dict[str, str] = field(default_factory=dict)  # file name -> text, for carets

    def __post_init__(self):
        super().__init__(self.render(color=False))

    def __str__(self) -> str:
        return self.render(color=False)

    def render(self, color: bool = False) -> str:
        out = [render_diagnostic(d, self.sources.get(d.span.file) if d.span else None, color)
               for d in self.diagnostics]
        n = sum(d.severity == "error" for d in self.diagnostics)
        if n > 1:
            out.append(f"found {n} errors")
        return "\n".join(out)


def render_diagnostic(d: Diagnostic, source: str | None, color: bool = False) -> str:
    red, blue, bold, reset = ("\x1b[31m", "\x1b[34m", "\x1b[1m", "\x1b[0m") if color else ("",) * 4
    where = f"{d.span}: " if d.span else ""
    lines = [f"{bold}{where}{red}{d.severity}:{reset}{bold} {d.message}{reset}"]
    if d.span and source is not None:
        text_lines = source.splitlines()
        if 1 <= d.span.line <= len(text_lines):
            text = text_lines[d.span.line - 1]
            num = str(d.span.line)
            pad = " " * len(num)
            width = 1
            if d.span.end_line == d.span.line and d.span.end_col and d.span.end_col > d.span.col:
                width = d.span.end_col - d.span.col
            lines.append(f"{blue}{pad} |{reset}")
            lines.append(f"{blue}{num} |{reset} {text}")
            lines.append(f"{blue}{pad} |{reset} {' ' * (d.span.col - 1)}{red}{'^' * width}{reset}")
    if d.hint:
        pad = " " * (len(str(d.span.line)) if d.span else 1)
        lines.append(f"{blue}{pad} ={reset} help: {d.hint}")
    return "\n".join(lines)


def suggest(name: str, candidates) -> str | None:
    """'did you mean ...?' by edit distance over the valid names, or None."""
    cands = sorted(set(candidates))
    close = difflib.get_close_matches(name, cands, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return None


def suggest_or_list(name: str, candidates, what: str = "valid names") -> str | None:
    s = suggest(name, candidates)
    if s:
        return s
    cands = sorted(set(candidates))
    if not cands:
        return None
    return f"{what}: " + ", ".join(cands)


class Collector:
    """Accumulates diagnostics through a pass; raise_if_any() at the end."""

    def __init__(self, sources: dict[str, str] | None = None):
        self.diagnostics: list[Diagnostic] = []
        self._seen: set[Diagnostic] = set()
        self.sources = dict(sources or {})
        self.reported = 0  # every error() call, repeats included: "did this pass find a problem?"

    def error(self, span: Span | None, message: str, hint: str | None = None) -> None:
        self.reported += 1
        d = Diagnostic(span, message, hint)
        # Each occurrence of a block re-checks the same source lines: report a line's problem once.
        if d not in self._seen:
            self._seen.add(d)
            self.diagnostics.append(d)

    def __bool__(self) -> bool:
        return bool(self.diagnostics)

    def raise_if_any(self) -> None:
        if self.diagnostics:
            ds = sorted(self.diagnostics, key=lambda d: (d.span.file, d.span.line, d.span.col) if d.span else ("", 0, 0))
            raise BstcError(ds, self.sources)


def read_text_file(path, what: str = "model file") -> str:
    """A UTF-8 text file's contents (a UTF-8 byte-order mark is dropped). Not UTF-8 → a
    BstcError at the first bad byte (line, column and byte offset); a directory, FIFO or other
    non-regular file → FileNotFoundError with a message saying what the path is."""
    import stat
    from pathlib import Path

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        raise FileNotFoundError(f"no such {what}: {path}") from None
    if stat.S_ISDIR(mode):
        raise FileNotFoundError(f"{path} is a directory, not a {what}")
    if not stat.S_ISREG(mode):
        raise FileNotFoundError(f"{path} is not a regular file (a FIFO, socket or device), not a {what}")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start]
        line = before.count(b"\n") + 1
        col = len(before[before.rfind(b"\n") + 1:].decode("utf-8", errors="replace")) + 1
        # Shown under the caret: control characters of a binary file become U+FFFD, one each.
        text = "".join(c if c in "\n\t" or c >= " " else "\ufffd"
                       for c in data.decode("utf-8", errors="replace"))
        raise BstcError([Diagnostic(Span(str(path), line, col, line, col + 1),
                                    f"{what} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}",
                                    "save the file as UTF-8")], {str(path): text}) from None


def out_of_memory(e: BaseException) -> bool:
    """Whether XLA failed for want of device memory (RESOURCE_EXHAUSTED). Checked by the
    exception's name, so that the command line can ask without importing jax."""
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in str(e)
