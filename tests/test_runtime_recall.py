"""Context injection carries information across blocks: a tiny BST-SH learns associative recall
with the key-value pairs several windows before the queries, and the same network with
block-local attention only (no context injection) stays at chance. Results: docs/results.md."""
from __future__ import annotations

import pytest

from bstc.runtime.experiments import RecallSetup, run_recall, recall_model_text


def test_the_two_models_differ_only_in_context_injection():
    s = RecallSetup()
    bst, local = recall_model_text(s, True), recall_model_text(s, False)
    diff = [(a, b) for a, b in zip(bst.splitlines(), local.splitlines()) if a != b]
    # the comment, the model name, and the middle layer: `bst` (SSM context) vs `local`
    assert [b.strip() for _, b in diff][-1] == "local" and [a.strip() for a, _ in diff][-1] == "bst"
    assert len(diff) == 3


@pytest.mark.slow
def test_bst_learns_recall_beyond_the_window_and_local_attention_cannot(tmp_path):
    s = RecallSetup(steps=400)
    assert s.seq_len >= 4 * s.window  # pairs in block 0, queries in block 3
    res = run_recall(s, tmp_path)
    chance = res["chance"]
    assert res["bst_sh"]["accuracy"] > 3 * chance, res          # measured: 0.60 at 400 steps
    assert res["local_only"]["accuracy"] < chance + 0.07, res    # measured: 0.14 (chance 0.125)
    assert res["bst_sh"]["loss"] < res["local_only"]["loss"] - 0.5
