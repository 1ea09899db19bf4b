"""The README's model file compiles, and its two set-up commands are the ones CI runs."""
from __future__ import annotations

import re
from pathlib import Path

import bstc

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_model_files_compile():
    blocks = re.findall(r"```bst\n(.*?)```", README, re.S)
    assert blocks
    for text in blocks:
        m = bstc.parse(text)
        assert bstc.explain(m).params > 0


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert len(commands) == 2, "the README has exactly two set-up commands"
    install_and_run, test = commands
    assert "bstc train" in install_and_run
    ci = (ROOT / ".ci" / "run").read_text()
    assert test.strip() in ci
