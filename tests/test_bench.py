"""The comparison's task: the held-out split is never trained on, and the table's spread is what it says."""

import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import compare_algorithms  # noqa: E402


def operand_pairs(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    pairs = set()
    for r in rows:
        a, b = map(int, re.findall(r"\d+", r["question"]))
        assert r["answer"] == f"#### {a + b}", r
        pairs.add((a, b))
    return rows, pairs


def test_held_out_pairs_never_in_training(tmp_path):
    train, test = compare_algorithms.write_task(str(tmp_path), held_out_pairs=30)
    train_rows, train_pairs = operand_pairs(train)
    test_rows, test_pairs = operand_pairs(test)
    assert len(test_pairs) == 30 and len(train_pairs) == 70
    assert not train_pairs & test_pairs
    phrasings = len(compare_algorithms.PHRASINGS)
    assert len(train_rows) == 70 * phrasings and len(test_rows) == 30 * phrasings
    # the split is seeded: the same task every time
    assert compare_algorithms.write_task(str(tmp_path / "again"), held_out_pairs=30) and \
        operand_pairs(str(tmp_path / "again" / "test.jsonl"))[1] == test_pairs


def test_spread_is_mean_and_half_range_in_percent():
    assert compare_algorithms.spread([0.5]) == "50.0"
    assert compare_algorithms.spread([0.8, 0.9]) == "85.0 ± 5.0"
