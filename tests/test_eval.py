"""eval.py: pass@k and maj@n on hand-made samples, every preset's field mapping on rows in the
formats of the published files, and end-to-end runs (transformers; vLLM when importable; stubbed samples with
exact scores)."""

import json
import os
import sys

import pytest
from conftest import ROOT, run_script, write_jsonl

import eval as ev


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),
        (5, 2, 2, 1 - 3 / 10),
        (5, 0, 3, 0.0),
        (5, 4, 2, 1.0),
        (4, 4, 1, 1.0),
        (10, 3, 5, 1 - 21 / 252),
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert ev.pass_at_k(n, c, k) == pytest.approx(expected)


def test_majority_vote():
    assert ev.majority_correct(["\\boxed{3}", "\\boxed{ 3 }", "\\boxed{4}"], "3")
    assert not ev.majority_correct(["\\boxed{4}", "\\boxed{4}", "\\boxed{3}"], "3")
    assert ev.majority_correct(["no answer", "none", "\\boxed{3}"], "3")  # no answer never wins
    assert not ev.majority_correct(["nothing"] * 3, "3")
    assert ev.majority_correct(["\\boxed{3}", "\\boxed{4}"], "3")  # a tie goes to the first seen


def boxed(*answers):
    return ["\\boxed{%s}" % a for a in answers]


def test_majority_vote_counts_equal_answers_together():
    """Answers the correctness reward holds equal vote together (0.5 and \\frac{1}{2} split the vote before)."""
    assert ev.majority_correct(boxed("3", "0.5", "\\frac{1}{2}"), "1/2")
    assert ev.majority_correct(boxed("7", "18", "18.00", "\\$18", "7"), "18")
    assert not ev.majority_correct(boxed("4", "3", "4", "\\frac{6}{2}", "4"), "3")  # equal strings still together
    assert not ev.majority_correct(boxed("x" * 300, "3", "x" * 300), "3")  # over-long ones too, by their text
    assert ev.majority_correct(boxed("0.5", "3", "\\frac{1}{2}", "3"), "1/2")  # a tie goes to the first seen
    assert not ev.majority_correct(boxed("3", "0.5", "\\frac{1}{2}", "3"), "1/2")


def test_summary_numbers():
    problems = [
        {"lengths": [10, 20], "correct": [True, False], "majority_correct": True},
        {"lengths": [30, 40], "correct": [False, False], "majority_correct": False},
    ]
    s = ev.summarise(problems, 2)
    assert s["avg@2"] == 0.25 and s["pass@1"] == 0.25 and s["pass@2"] == 0.5 and s["maj@2"] == 0.5
    assert s["tokens_mean"] == 25 and s["tokens_median"] == 25 and s["tokens_correct_mean"] == 10


# one row per preset in the format of the published test files (<name>_test.jsonl), plus a bad row each
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
    assert ev.build_prompt is grpo.build_prompt and ev.stop_token_ids is grpo.stop_token_ids
    chat = ev.build_prompt(tok, "What is 1+1?", ev.Args(model=["x"]).prompt_suffix)
    assert chat.startswith("<|im_start|>user\nWhat is 1+1? Please reason") and chat.endswith("<|im_start|>assistant\n")
    tok.chat_template = None  # a base model without a chat template: the plain prompt
    assert grpo.build_prompt(tok, " What is 1+1? ", " Go.") == "Question: What is 1+1? Go.\nAnswer:"


def test_missing_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", str(tmp_path / "nope"), "--datasets", "gsm8k"])
    with pytest.raises(SystemExit) as e:
        ev.main()
    assert "--model" in str(e.value.code) and "checkpoint directory" in str(e.value.code)


# Flag combinations vLLM or transformers would reject deep inside generation, refused before any
# model loads (the model path does not exist, so reaching it would give a different error).
FLAG_ERRORS = [
    (["--n", "2"], ["--n 2", "--temperature 0", "greedy", "identical", "--temperature 0.6", "--n 1"]),
    (["--n", "0"], ["--n 0", ">= 1"]),
    (["--temperature", "-0.5"], ["--temperature -0.5", ">= 0"]),
    (["--temperature", "2.5"], ["--temperature 2.5", "at most 2", "--no-use-vllm"]),
    (["--top-p", "0"], ["--top-p 0", "(0, 1]"]),
    (["--top-p", "1.5"], ["--top-p 1.5", "(0, 1]"]),
    (["--max-tokens", "0"], ["--max-tokens 0", ">= 1"]),
    (["--limit", "0"], ["--limit 0", ">= 1", "leave it out"]),
    (["--vllm-gpu-memory-utilization", "1.5"], ["--vllm-gpu-memory-utilization 1.5", "(0, 1]"]),
    (["--vllm-gpu-memory-utilization", "0"], ["--vllm-gpu-memory-utilization 0", "(0, 1]"]),
    (["--hf-batch-size", "0"], ["--hf-batch-size 0", ">= 1"]),
]


@pytest.mark.parametrize("flags, phrases", FLAG_ERRORS, ids=[" ".join(f) for f, _ in FLAG_ERRORS])
def test_rejected_flag_combinations_are_clear_errors_up_front(flags, phrases, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", str(tmp_path / "nope"), "--datasets", "gsm8k", *flags])
    with pytest.raises(SystemExit) as e:
        ev.main()
    message = str(e.value.code)
    assert "cannot load" not in message  # refused before the model is even looked at
    for phrase in phrases:
        assert phrase in message


def test_every_rejected_flag_is_reported_at_once(monkeypatch, tmp_path):
    argv = ["eval.py", "--model", str(tmp_path / "nope"), "--top-p", "2", "--max-tokens", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        ev.main()
    assert "--top-p 2" in str(e.value.code) and "--max-tokens 0" in str(e.value.code)


def test_prompt_plus_budget_beyond_the_model_positions_is_a_clear_error(tiny_model, monkeypatch, tmp_path):
    """vLLM rejects a max_model_len above max_position_embeddings (1024 for the tiny model)."""
    data = write_jsonl(str(tmp_path / "q.jsonl"), [{"question": "What is 2 + 3?", "answer": "#### 5"}])
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "eval.py",
            "--model",
            tiny_model,
            "--datasets",
            data,
            "--max-tokens",
            "1020",
            "--output-dir",
            str(tmp_path / "out"),
        ],
    )
    with pytest.raises(SystemExit) as e:
        ev.main()
    message = str(e.value.code)
    for phrase in ("--max-tokens 1020", "max_position_embeddings (1024)", "--limit", "q.jsonl"):
        assert phrase in message
    assert not os.path.exists(tmp_path / "out")  # nothing was generated


def _tokenizer(tmp_path, eos_token, chat_template=True):
    from tiny import build_tokenizer

    tok = build_tokenizer(str(tmp_path))
    tok.eos_token = eos_token
    if not chat_template:
        tok.chat_template = None
    return tok


def test_stop_tokens_include_the_chat_templates_end_of_turn(tmp_path):
    """A base model (Qwen2.5) ends its text with <|endoftext|> but a chat turn with <|im_end|>."""
    tok = _tokenizer(tmp_path, "<|endoftext|>")
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert ev.stop_token_ids(str(tmp_path), tok) == sorted([im_end, endoftext])


def test_stop_tokens_add_the_generation_configs_eos(tmp_path):
    from transformers import GenerationConfig

    tok = _tokenizer(tmp_path, "<|endoftext|>")
    im_start, im_end, endoftext = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    GenerationConfig(eos_token_id=[endoftext, im_start]).save_pretrained(str(tmp_path))
    assert ev.stop_token_ids(str(tmp_path), tok) == sorted([im_start, im_end, endoftext])


def test_stop_tokens_without_a_chat_template_are_the_eos(tmp_path):
    tok = _tokenizer(tmp_path, "<|endoftext|>", chat_template=False)
    assert ev.stop_token_ids(str(tmp_path), tok) == [tok.convert_tokens_to_ids("<|endoftext|>")]


@pytest.mark.needs_vllm
def test_vllm_request_carries_the_stop_tokens_and_no_seed():
    class Engine:  # records the request instead of generating
        def generate(self, prompts, params, use_tqdm):
            self.params = params
            return []

    engine = Engine()
    ev.generate_vllm(engine, [[1, 2]], ev.Args(model=["x"]), [7, 9], 0)
    assert engine.params.stop_token_ids == [7, 9] and engine.params.seed is None


def test_end_to_end_transformers(tiny_model, tmp_path):
    """eval.py generating with transformers: --limit, the per-problem rows, the table."""
    data = write_jsonl(
        str(tmp_path / "add.jsonl"),
        [{"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"} for a in range(4)]
        + [{"question": "broken", "answer": "???{"}],
    )
    out = str(tmp_path / "out")
    proc = run_script([os.path.join(ROOT, "eval.py"), "--model", tiny_model, "--datasets", data, "--n", "2",
                       "--temperature", "1.0", "--output-dir", out, "--max-tokens", "8", "--limit", "3",
                       "--no-use-vllm"], cwd=str(tmp_path))
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)["results"][tiny_model]["add.jsonl"]
    lines = open(os.path.join(out, [f for f in os.listdir(out) if f.endswith(".jsonl")][0])).read().splitlines()
    assert res["problems"] == 3 and len(lines) == 3  # --limit
    row = json.loads(lines[0])
    assert len(row["completions"]) == 2 and all(0 < n <= 8 for n in row["lengths"])
    assert 0 <= res["avg@2"] <= res["pass@2"] <= 1 and res["tokens_mean"] > 0
    assert "| model | data set | avg@2 | pass@2 | maj@2 |" in proc.stdout and "temperature=1.0" in proc.stdout


# (gold, the 4 samples of its problem as (text, tokens)) for test_end_to_end_scores; a broken row comes last
SAMPLES = [
    # right 3 of 4 in three equal forms, wrong first: the vote needs the equal forms together
    ("#### 5", [("\\boxed{6}", 8), ("\\boxed{5}", 4), ("\\boxed{5.0}", 4), ("so \\boxed{\\frac{10}{2}}", 4)]),
    # right once (so pass@4 = 1), a wrong majority, no box (no answer)
    ("#### 12", [("\\boxed{7}", 8), ("\\boxed{7}", 8), ("The answer is 12.", 8), ("\\boxed{12}", 16)]),
    # never right; the unboxed 3 counts only with --last-number-fallback
    ("#### 3", [("\\boxed{4}", 8), ("so it is 3", 8), ("\\boxed{2}", 8), ("\\boxed{4}", 8)]),
    # right twice, as 0.5 and 1/2 (one class of the vote), against the gold \frac{1}{2}
    ("\\frac{1}{2}", [("\\boxed{0.5}", 2), ("\\boxed{1/2}", 6), ("\\boxed{2}", 8), ("\\boxed{\\frac{1}{3}}", 8)]),
]


def test_end_to_end_scores(tiny_model, monkeypatch, capsys, tmp_path):
    """eval.py's main on stubbed samples (SAMPLES) with known right, wrong and equal answers: exact scores in
    results.json, the printed table and the per-problem rows. By hand, right answers c = 3, 1, 0, 2 of n = 4:
    avg@4 = pass@1 = (3 + 1 + 0 + 2) / 16 = 0.375;
    pass@2 = mean(1 - C(4 - c, 2) / C(4, 2)) = mean(1, 1 - 3/6, 0, 1 - 1/6) = (7/3) / 4 = 7/12;
    pass@4 = mean(1, 1, 0, 1) = 0.75; maj@4: the winning votes are 5 (5, 5.0, 10/2), 7 (twice), 4 (twice), 0.5 (0.5,
    1/2), so mean(1, 0, 0, 1) = 0.5;
    tokens: 116 in 16 samples, mean 7.25, median 8 (sorted, the 8th and 9th are 8); right ones 4, 4, 4, 16, 2, 6:
    mean 6."""
    rows = [{"question": f"Problem {i}?", "answer": gold} for i, (gold, _) in enumerate(SAMPLES)]
    data = write_jsonl(str(tmp_path / "q.jsonl"), rows + [{"question": "broken", "answer": "???{"}])

    def stub_samples(model_name, tokenizer, prompt_ids, args, stop_ids):
        assert list(prompt_ids) == [data] and len(prompt_ids[data]) == len(SAMPLES)
        return {data: [[([0] * tokens, text) for text, tokens in samples] for _, samples in SAMPLES]}

    monkeypatch.setattr(ev, "hf_samples", stub_samples)
    out = tmp_path / "out"
    argv = ["eval.py", "--model", tiny_model, "--datasets", data, "--no-use-vllm", "--n", "4", "--temperature", "1.0",
            "--max-tokens", "16", "--output-dir", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    ev.main()
    with open(out / "results.json") as f:
        scores = json.load(f)["results"][tiny_model]["q.jsonl"]
    expected = {"avg@4": 0.375, "pass@1": 0.375, "pass@2": 7 / 12, "pass@4": 0.75, "maj@4": 0.5, "tokens_mean": 7.25,
                "tokens_median": 8, "tokens_correct_mean": 6, "problems": 4, "rows_skipped": 1}
    assert scores == pytest.approx(expected)
    # the table: scores in percent (pass@1 is avg@4, not repeated), tokens rounded
    assert f"| {tiny_model} | q.jsonl | 37.5 | 58.3 | 75.0 | 50.0 | 7 | 8 | 6 | 4 | 1 |" in capsys.readouterr().out
    (completions,) = [f for f in os.listdir(out) if f.endswith(".jsonl")]
    problems = [json.loads(line) for line in open(out / completions)]
    assert [p["gold"] for p in problems] == ["5", "12", "3", "\\frac{1}{2}"]
    assert [p["answers"] for p in problems] == [["6", "5", "5.0", "\\frac{10}{2}"], ["7", "7", None, "12"],
                                                ["4", None, "2", "4"], ["0.5", "1/2", "2", "\\frac{1}{3}"]]
    right, wrong = True, False
    assert [p["correct"] for p in problems] == [[wrong, right, right, right], [wrong, wrong, wrong, right],
                                                [wrong] * 4, [right, right, wrong, wrong]]
    assert [p["majority_correct"] for p in problems] == [True, False, False, True]


def test_results_are_written_after_each_model(tiny_model, tiny_untied_model, monkeypatch, tmp_path):
    """A failure while the second model generates keeps the first model's scores in results.json (they were
    lost before: only its completions file had been written)."""
    data = write_jsonl(str(tmp_path / "q.jsonl"), [{"question": "What is 2 + 3?", "answer": "#### 5"}])
    out = tmp_path / "out"
    real = ev.hf_samples

    def second_model_fails(model_name, *a, **k):
        if model_name == tiny_untied_model:
            raise RuntimeError("the second engine did not start")
        return real(model_name, *a, **k)

    monkeypatch.setattr(ev, "hf_samples", second_model_fails)
    argv = ["eval.py", "--model", tiny_model, "--model", tiny_untied_model, "--datasets", data, "--no-use-vllm",
            "--n", "2", "--temperature", "1.0", "--max-tokens", "4", "--output-dir", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(RuntimeError):
        ev.main()
    with open(out / "results.json") as f:
        assert list(json.load(f)["results"]) == [tiny_model]
    assert tiny_model in (out / "results.md").read_text()


@pytest.fixture(scope="module")
def vllm_eval(tiny_model, tiny_untied_model, tmp_path_factory):
    """One eval.py run with vLLM, which the tests below read: two models, four data sets (additions with an unscorable
    row; 24 prompts longer than one prefill chunk; two data sets of two problems of the same text), 2 samples each at
    temperature 1, 16 tokens. Its stdout, output directory and results."""
    tmp = tmp_path_factory.mktemp("vllm_eval")
    add = [{"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"} for a in range(4)]
    filler = " and then one more apple" * 30
    long = [{"question": f"Start with {a}{filler}. How many?", "answer": f"#### {a}"} for a in range(24)]
    same = [{"question": "What is 2 + 3?", "answer": "#### 5"}] * 2
    data = [write_jsonl(str(tmp / "add.jsonl"), add + [{"question": "broken", "answer": "???{"}]),
            write_jsonl(str(tmp / "long.jsonl"), long), write_jsonl(str(tmp / "a.jsonl"), same),
            write_jsonl(str(tmp / "b.jsonl"), same)]
    out = str(tmp / "out")
    proc = run_script([os.path.join(ROOT, "eval.py"), "--model", tiny_model, "--model", tiny_untied_model, "--datasets",
                       *data, "--n", "2", "--temperature", "1.0", "--max-tokens", "16", "--output-dir", out],
                      cwd=str(tmp))
    with open(os.path.join(out, "results.json")) as f:
        return proc.stdout, out, json.load(f)["results"]


def samples_of(out: str, model: str, label: str) -> list:
    """The per-problem rows eval.py wrote for `model` on data set `label`."""
    with open(os.path.join(out, f"{model.strip('/').replace('/', '__')}__{label}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.needs_vllm
def test_end_to_end_vllm(vllm_eval, tiny_model):
    stdout, out, results = vllm_eval
    res = results[tiny_model]["add.jsonl"]
    rows = samples_of(out, tiny_model, "add.jsonl")
    assert res["problems"] == 4 and res["rows_skipped"] == 1 and len(rows) == 4
    assert all(len(r["completions"]) == 2 and all(0 < n <= 16 for n in r["lengths"]) for r in rows)
    assert 0 <= res["avg@2"] <= res["pass@2"] <= 1 and res["tokens_mean"] > 0
    assert "| model | data set | avg@2 | pass@2 | maj@2 |" in stdout and "temperature=1.0" in stdout


@pytest.mark.needs_vllm
def test_end_to_end_vllm_two_models(vllm_eval, tiny_model, tiny_untied_model):
    """Each model's engine runs in a child process of its own, which gives all of its memory back before the next
    starts (an engine released in-process left memory behind: a second SmolLM2 engine could not size its KV cache)."""
    _, _, results = vllm_eval
    assert list(results) == [tiny_model, tiny_untied_model]
    assert all(list(results[m]) == ["add.jsonl", "long.jsonl", "a.jsonl", "b.jsonl"] for m in results)
    assert all(results[m]["add.jsonl"]["problems"] == 4 and results[m]["add.jsonl"]["tokens_mean"] > 0 for m in results)


@pytest.mark.needs_vllm
def test_vllm_batch_longer_than_one_prefill_chunk(vllm_eval):
    """Seeded requests whose prefill vLLM chunks crashed vLLM 0.32's CPU build ("CPU Generator does not use offset",
    a per-request generator's offset moved back for a partial prefill); eval's requests carry no seed."""
    _, _, results = vllm_eval
    assert all(results[m]["long.jsonl"]["problems"] == 24 for m in results)


@pytest.mark.needs_vllm
def test_vllm_samples_of_identical_problems_all_differ(vllm_eval, tiny_model):
    """Every sample draws its own random stream: two data sets of two problems of the same text give 8 different
    completions of 16 tokens (every request carried seed --seed, so sample j of every problem was the same text)."""
    _, out, _ = vllm_eval
    rows = samples_of(out, tiny_model, "a.jsonl") + samples_of(out, tiny_model, "b.jsonl")
    texts = [t for r in rows for t in r["completions"]]
    assert len(texts) == 8 and len(set(texts)) == 8, texts
