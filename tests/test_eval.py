"""eval.py: pass@k and maj@n on hand-made samples, every preset's field mapping on rows in the
formats of the published files, and end-to-end runs (transformers; vLLM when importable)."""

import json
import os
import sys

import pytest
from conftest import ROOT, run_script, vllm_importable, write_jsonl

import eval as ev


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4), (5, 2, 2, 1 - 3 / 10), (5, 0, 3, 0.0), (5, 4, 2, 1.0), (4, 4, 1, 1.0), (10, 3, 5, 1 - 21 / 252),
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert ev.pass_at_k(n, c, k) == pytest.approx(expected)


def test_majority_vote():
    assert ev.majority_correct(["\\boxed{3}", "\\boxed{ 3 }", "\\boxed{4}"], "3")
    assert not ev.majority_correct(["\\boxed{4}", "\\boxed{4}", "\\boxed{3}"], "3")
    assert ev.majority_correct(["no answer", "none", "\\boxed{3}"], "3")  # no answer never wins
    assert not ev.majority_correct(["nothing"] * 3, "3")
    assert ev.majority_correct(["\\boxed{3}", "\\boxed{4}"], "3")  # a tie goes to the first seen


def test_summary_numbers():
    problems = [{"lengths": [10, 20], "correct": [True, False], "majority_correct": True},
                {"lengths": [30, 40], "correct": [False, False], "majority_correct": False}]
    s = ev.summarise(problems, 2)
    assert s["avg@2"] == 0.25 and s["pass@1"] == 0.25 and s["pass@2"] == 0.5 and s["maj@2"] == 0.5
    assert s["tokens_mean"] == 25 and s["tokens_median"] == 25 and s["tokens_correct_mean"] == 10


# one row per preset in the format of the published files (../shared/data), plus a bad row each
ROWS = {
    "gsm8k": ({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}, "5"),
    "math500": ({"problem": "Simplify 6/8.", "solution": "\\boxed{\\frac{3}{4}}", "answer": "\\frac34"}, "\\frac34"),
    "aime24": ({"id": 1, "problem": "Find x.", "answer": "204"}, "204"),
    "amc23": ({"id": 0, "problem": "How many?", "answer": 27.0}, "27"),
    "minerva": ({"problem": "Compute.", "solution": "so it is \\boxed{1.6}"}, "1.6"),
    "olympiadbench": ({"id": 1, "question": "Find N.", "final_answer": ["$7$"]}, "7"),
    "svamp": ({"Body": "There are 87 oranges.", "Question": "How many?", "Answer": "87.0"}, "87.0"),
    "multiarith": ({"input": "Debby had 39.", "target": "39"}, "39"),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_preset_field_mapping(name, tmp_path):
    row, gold = ROWS[name]
    bad = {k: None for k in row}  # missing fields: skipped and counted, never a crash
    write_jsonl(str(tmp_path / ev.PRESETS[name]["file"]), [row, bad])
    args = ev.Args(model=["x"], data_dir=str(tmp_path))
    problems, skipped = ev.load_problems(name, args)
    assert skipped == 1 and len(problems) == 1
    assert problems[0]["gold"] == gold
    if name == "svamp":
        assert problems[0]["question"] == "There are 87 oranges. How many?"


def test_same_prompt_as_training(tiny_model):
    import grpo
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for template in ("chat", "plain"):
        assert ev.build_prompt(tok, "What is 1+1?", ev.Args(model=["x"], template=template)) == \
            grpo.build_prompt(tok, "What is 1+1?", grpo.Args(prompt_template=template))


def test_missing_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", str(tmp_path / "nope"), "--datasets", "gsm8k"])
    with pytest.raises(SystemExit) as e:
        ev.main()
    assert "--model" in str(e.value.code) and "checkpoint directory" in str(e.value.code)


def _eval_run(tiny_model, tmp_path, extra):
    data = write_jsonl(str(tmp_path / "add.jsonl"), [{"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"} for a in range(4)]
                       + [{"question": "broken", "answer": "???{"}])
    out = str(tmp_path / "out")
    proc = run_script([os.path.join(ROOT, "eval.py"), "--model", tiny_model, "--datasets", data, "--n", "2",
                       "--temperature", "1.0", "--max-tokens", "8", "--limit", "3", "--output-dir", out, *extra], cwd=str(tmp_path))
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)["results"][tiny_model]["add.jsonl"]
    lines = open(os.path.join(out, [f for f in os.listdir(out) if f.endswith(".jsonl")][0])).read().splitlines()
    assert res["problems"] == 3 and len(lines) == 3  # --limit
    row = json.loads(lines[0])
    assert len(row["completions"]) == 2 and all(0 < n <= 8 for n in row["lengths"])
    assert 0 <= res["avg@2"] <= res["pass@2"] <= 1 and res["tokens_mean"] > 0
    assert "| model | data set | avg@2 | pass@2 | maj@2 |" in proc.stdout and "temperature=1.0" in proc.stdout


def test_end_to_end_transformers(tiny_model, tmp_path):
    _eval_run(tiny_model, tmp_path, ["--no-use-vllm"])


@pytest.mark.skipif(not vllm_importable(), reason="vLLM is not importable here")
def test_end_to_end_vllm(tiny_model, tmp_path):
    _eval_run(tiny_model, tmp_path, [])


@pytest.mark.skipif(not vllm_importable(), reason="vLLM is not importable here")
def test_vllm_seeded_batch_longer_than_one_prefill_chunk(tiny_model, tmp_path):
    """Seeded requests whose prefill vLLM would chunk crashed vLLM 0.32's CPU build ("CPU
    Generator does not use offset"); the scripts turn chunked prefill off on CPU."""
    filler = " and then one more apple" * 30
    data = write_jsonl(str(tmp_path / "long.jsonl"), [{"question": f"Start with {a}{filler}. How many?", "answer": f"#### {a}"} for a in range(24)])
    out = str(tmp_path / "out")
    run_script([os.path.join(ROOT, "eval.py"), "--model", tiny_model, "--datasets", data, "--n", "2", "--temperature", "1.0",
                "--max-tokens", "4", "--output-dir", out], cwd=str(tmp_path))
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["results"][tiny_model]["long.jsonl"]["problems"] == 24
