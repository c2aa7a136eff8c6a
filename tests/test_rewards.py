"""rewards.py on real gold formats, adversarial completions and the Kimi length penalty."""

import inspect

import math_verify
import pytest

import rewards


# (what it checks, completion, gold, expected reward): rewards.correctness_reward on one completion
CORRECTNESS = [
    # real gold formats: GSM8K's `#### n`, MATH's solutions, numeric answer fields
    ("gold_format", "so she has \\boxed{1234} apples", "Natalia sold ... 1,234 total.\n#### 1,234", 1.0),  # GSM8K gold
    ("gold_format", "\\boxed{1,234}", "#### 1234", 1.0),
    ("gold_format", "\\boxed{1235}", "#### 1,234", 0.0),
    ("gold_format", "The answer is 1234.", "#### 1234", 0.0),  # no \boxed{}: no answer
    ("gold_format", "\\boxed{\\frac{3}{56}}", "so \\boxed{\\frac{3}{56}}", 1.0),  # MATH gold in a solution
    ("gold_format", "\\boxed{\\dfrac{3}{56}}", "\\frac{3}{56}", 1.0),
    ("gold_format", "\\boxed{3/56}", "\\frac{3}{56}", 1.0),
    ("gold_format", "\\boxed{\\frac{3}{57}}", "\\frac{3}{56}", 0.0),
    ("gold_format", "\\boxed{0.5}", "1/2", 1.0),  # 0.5 vs 1/2
    ("gold_format", "\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("gold_format", "\\boxed{72}", 72.0, 1.0),  # numeric answer fields (AMC, SVAMP)
    ("gold_format", "first \\boxed{3} then \\boxed{4}", "#### 4", 1.0),  # the last box counts
    ("gold_format", "\\boxed{x^2+1}", "1 + x^2", 1.0),
    # docs/algorithms.md (5.1): a number with a unit or words is that number, on either side
    ("unit", "\\boxed{9}", "9 (apples)", 1.0),  # math-verify reads this gold as 9*E*a*l*p*p*s
    ("unit", "\\boxed{9 apples}", "9 (apples)", 1.0),
    ("unit", "\\boxed{8}", "9 (apples)", 0.0),
    ("unit", "\\boxed{9 (apples)}", "9", 1.0),
    ("unit", "\\boxed{15}", "15 balls", 1.0),
    ("unit", "\\boxed{16 balls}", "15 balls", 0.0),
    ("unit", "\\boxed{18}", "$18", 1.0),
    ("unit", "\\boxed{18}", "\\$18", 1.0),
    ("unit", "\\boxed{\\$18}", "18", 1.0),
    ("unit", "\\boxed{\\$17}", "\\$18", 0.0),
    ("unit", "\\boxed{5}", "5 cm", 1.0),
    ("unit", "\\boxed{5\\,\\text{cm}}", "5", 1.0),
    ("unit", "\\boxed{40}", "40%", 1.0),
    ("unit", "\\boxed{40\\%}", "40\\%", 1.0),
    ("unit", "\\boxed{41}", "40\\%", 0.0),
    ("unit", "\\boxed{3}", "3 \\text{ cm}", 1.0),
    ("unit", "\\boxed{12}", "12 cm^2", 1.0),
    ("unit", "\\boxed{12 \\text{ cm}^2}", "12", 1.0),
    ("unit", "\\boxed{13}", "12 cm^2", 0.0),
    ("unit", "\\boxed{\\text{9 apples}}", "9 (apples)", 1.0),
    ("unit", "\\boxed{90}", "90^\\circ", 1.0),
    ("unit", "\\boxed{\\frac{18}{2}}", "9 (apples)", 1.0),  # the reduced gold goes to math-verify too
    ("unit", "\\boxed{1,234 dollars}", "#### 1,234", 1.0),
    # an expression is not reduced to its number
    ("expression", "\\boxed{2}", "2x", 0.0),
    ("expression", "\\boxed{2x}", "2x", 1.0),
    ("expression", "\\boxed{2}", "2xy", 0.0),
    ("expression", "\\boxed{1}", "x^2+1", 0.0),
    ("expression", "\\boxed{3}", "3 and 4", 0.0),
    ("expression", "\\boxed{3}", "\\frac{3}{4}", 0.0),
    ("expression", "\\boxed{5}", "5 + 3", 0.0),
    ("expression", "\\boxed{8}", "5 + 3", 1.0),
    ("expression", "\\boxed{3}", "3 pi", 0.0),
    ("expression", "\\boxed{5}", "5 cm by 3 cm", 0.0),  # a second number: not one number with a unit
    # math-verify reads a plain word as a product of letters, so any permutation would be "equal"
    ("word", "\\boxed{Tuesday}", "Tuesday", 1.0),
    ("word", "\\boxed{\\text{tuesday}}", "Tuesday", 1.0),
    ("word", "\\boxed{ TUESDAY. }", "\\text{Tuesday}", 1.0),
    ("word", "\\boxed{yadseuT}", "Tuesday", 0.0),
    ("word", "\\boxed{Yes}", "yes", 1.0),
    ("word", "\\boxed{sey}", "yes", 0.0),
    ("word", "\\boxed{apples}", "apples", 1.0),
    ("word", "\\boxed{sppale}", "apples", 0.0),
    ("word", "\\boxed{no  solution}", "No solution", 1.0),
    # docs/algorithms.md (5.2): only thousands groups are one number; a comma list stays a list
    ("comma", "\\boxed{1, 3, 5}", "1,3,5", 1.0),
    ("comma", "\\boxed{135}", "1,3,5", 0.0),
    ("comma", "\\boxed{1,3,5}", "135", 0.0),
    ("comma", "\\boxed{1, 35}", "135", 0.0),
    ("comma", "\\boxed{1,234,567}", "1234567", 1.0),
    ("comma", "\\boxed{-1,234.5}", "-1234.5", 1.0),
    ("comma", "\\boxed{1,2345}", "12345", 0.0),
    ("comma", "\\boxed{1 234}", "1234", 1.0),  # SI-style groups (math-verify alone reads "1 234" as 235)
]


@pytest.mark.parametrize("kind, completion, gold, expected", CORRECTNESS)
def test_correctness(kind, completion, gold, expected):
    assert rewards.correctness_reward(["q"], [completion], [gold]) == [expected]


def test_commas_in_gsm8k_golds_and_the_last_number_fallback():
    assert rewards.extract_gold("...\n#### 1,234,567") == "1234567"
    assert rewards.extract_gold("...\n#### 1,3,5") == "1,3,5"
    assert rewards.extract_answer("it is 1,234", last_number_fallback=True) == "1234"
    assert rewards.extract_answer("it is -1,234.5.", last_number_fallback=True) == "-1234.5"
    assert rewards.extract_answer("the odd ones are 1,3,5", last_number_fallback=True) != "135"
    assert rewards.correctness_reward_last_number(["q"], ["the odd ones are 1,3,5"], ["#### 135"]) == [0.0]


def test_unparseable_gold_is_none_not_a_crash():
    assert rewards.correctness_reward(["q"] * 3, ["\\boxed{5}"] * 3, ["???{", None, ""]) == [None, None, None]


def test_conversational_completions():
    assert rewards.correctness_reward(["q"], [[{"role": "assistant", "content": "\\boxed{7}"}]], ["#### 7"]) == [1.0]


def test_last_number_fallback_is_opt_in():
    assert rewards.correctness_reward(["q"], ["it is 1,234"], ["#### 1234"]) == [0.0]
    assert rewards.correctness_reward_last_number(["q"], ["it is 1,234"], ["#### 1234"]) == [1.0]


def test_extract_gold_formats():
    assert rewards.extract_gold("...\n#### 1,234") == "1234"
    assert rewards.extract_gold("so \\boxed{\\frac{3}{56}}.") == "\\frac{3}{56}"
    assert rewards.extract_gold(["17"]) == "17"
    assert rewards.extract_gold(3.0) == "3"
    assert rewards.extract_gold(None) is None


ADVERSARIAL = [
    "9" * 100_000,
    "\\boxed{" + "9" * 100_000 + "}",
    "\\boxed{" + "{" * 50_000,  # unbalanced
    "\\boxed{" + "{" * 20_000 + "}" * 20_000 + "}",  # deep nesting
    "\\boxed{9^{9^{9^{9^{9}}}}}",  # huge number
    "\\boxed{10^{10^{10^{10}}}!}",
    "\\boxed{1e99999999}",
    "\\boxed{" + "x+" * 90 + "x}",
    "\\boxed{" * 30_000,
    ("\\frac{" * 50) + "1" + ("}{2}" * 50),
]


TIMEOUT_ARGUMENT = {"parse": "parsing_timeout", "verify": "timeout_seconds"}


def assert_within_the_guards(name, arguments):
    """What bounds the time of a reward on any text, for one call to math-verify's `name` with these arguments: it
    never sees an answer over MAX_ANSWER_CHARS (parse gets it as \\boxed{answer}), and it runs under its alarm of
    MATH_VERIFY_TIMEOUT_S (None or 0 would turn it off)."""
    assert rewards.MATH_VERIFY_TIMEOUT_S >= 1
    assert arguments.get(TIMEOUT_ARGUMENT[name]) == rewards.MATH_VERIFY_TIMEOUT_S, (name, arguments)
    if name == "parse":
        assert len(arguments["pred"]) <= rewards.MAX_ANSWER_CHARS + len("\\boxed{}")


@pytest.fixture
def math_verify_calls(monkeypatch):
    """Every call of rewards to math-verify's parse and verify, as (name, its arguments by name), checked by
    assert_within_the_guards before it goes on to the real function (a call outside them could hang); rewards' parse
    cache is emptied first, so that no parse is skipped."""
    calls = []

    def guarded(name):
        real = getattr(math_verify, name)

        def call(*args, **kwargs):
            arguments = inspect.signature(real).bind(*args, **kwargs).arguments
            assert_within_the_guards(name, arguments)
            calls.append((name, arguments))
            return real(*args, **kwargs)

        return call

    for name in TIMEOUT_ARGUMENT:
        monkeypatch.setattr(math_verify, name, guarded(name))
    rewards._parse.cache_clear()
    return calls


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
@pytest.mark.parametrize("gold", ["#### 7", "\\frac{3}{4}"])
def test_adversarial_completions_stay_within_the_guards(text, gold, math_verify_calls):
    """Wrong, and every call to math-verify within the guards (checked as it is made)."""
    assert rewards.correctness_reward(["q"], [text], [gold]) == [0.0]
    assert rewards.format_reward(["q"], [text]) in ([0.0], [1.0])


def test_guards_at_the_answer_length_cap(math_verify_calls):
    """An expression of MAX_ANSWER_CHARS characters goes to math-verify (parse and verify, each under the timeout);
    one character more is counted wrong unparsed."""
    at_cap = "x" * rewards.MAX_ANSWER_CHARS
    assert rewards.correctness_reward(["q"], ["\\boxed{%s}" % at_cap], ["\\frac{3}{4}"]) == [0.0]
    assert [name for name, _ in math_verify_calls] == ["parse", "parse", "verify"]  # the gold, the answer, both
    math_verify_calls.clear()
    assert rewards.correctness_reward(["q"], ["\\boxed{%sx}" % at_cap], ["\\frac{3}{4}"]) == [0.0]
    assert math_verify_calls == []  # the gold's parse is cached


def test_format_reward():
    completions = ["so \\boxed{3}", "no box", "\\boxed{1} \\boxed{2}", "\\boxed{}"]
    assert rewards.format_reward(None, completions) == [1.0, 0.0, 0.0, 0.0]


def test_kimi_length_penalty():
    correct = [True, False, True, False]
    lengths = [10, 10, 30, 20]
    p = rewards.kimi_length_penalty(correct, lengths, 4)
    # λ = 0.5 − (L − 10)/20: [0.5, 0.5, -0.5, 0.0]; wrong ones get min(0, λ)
    assert p == pytest.approx([0.5, 0.0, -0.5, 0.0])
    assert rewards.kimi_length_penalty([True, True], [5, 5], 2) == [0.0, 0.0]


def test_length_penalty_trl_signature():
    out = rewards.length_penalty(
        ["q"] * 2, ["\\boxed{1}", "\\boxed{2}"], ["#### 1"] * 2, completion_ids=[[1] * 3, [1] * 7], num_generations=2
    )
    assert out == pytest.approx([0.5, -0.5])


def test_reward_lookup():
    assert rewards.get_reward_func("correctness") is rewards.correctness_reward
    assert rewards.get_reward_func("rewards:format_reward") is rewards.format_reward
    with pytest.raises(SystemExit, match="unknown reward"):
        rewards.get_reward_func("nope")
    with pytest.raises(SystemExit, match="cannot import"):
        rewards.get_reward_func("no_such_module:f")
