"""rewards.py on real gold formats, adversarial completions and the group-aware shaping."""

import time

import pytest

import rewards

BOUND_S = 10.0  # a hang guard, not a speed target: one call must come back, whatever the text


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("so she has \\boxed{1234} apples", "Natalia sold ... 1,234 total.\n#### 1,234", 1.0),  # GSM8K gold
        ("\\boxed{1,234}", "#### 1234", 1.0),
        ("\\boxed{1235}", "#### 1,234", 0.0),
        ("The answer is 1234.", "#### 1234", 0.0),  # no \boxed{}: no answer
        ("\\boxed{\\frac{3}{56}}", "so \\boxed{\\frac{3}{56}}", 1.0),  # MATH gold in a solution
        ("\\boxed{\\dfrac{3}{56}}", "\\frac{3}{56}", 1.0),
        ("\\boxed{3/56}", "\\frac{3}{56}", 1.0),
        ("\\boxed{\\frac{3}{57}}", "\\frac{3}{56}", 0.0),
        ("\\boxed{0.5}", "1/2", 1.0),  # 0.5 vs 1/2
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{72}", 72.0, 1.0),  # numeric answer fields (AMC, SVAMP)
        ("first \\boxed{3} then \\boxed{4}", "#### 4", 1.0),  # the last box counts
        ("\\boxed{x^2+1}", "1 + x^2", 1.0),
    ],
)
def test_correctness_on_real_gold_formats(completion, gold, expected):
    assert rewards.correctness_reward(["q"], [completion], [gold]) == [expected]


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


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
@pytest.mark.parametrize("gold", ["#### 7", "\\frac{3}{4}"])
def test_adversarial_completions_return_in_bounded_time(text, gold):
    t = time.perf_counter()
    out = rewards.correctness_reward(["q"], [text], [gold])
    assert out == [0.0]
    assert time.perf_counter() - t < BOUND_S
    assert rewards.format_reward(["q"], [text]) in ([0.0], [1.0])


def test_format_reward():
    assert rewards.format_reward(None, ["so \\boxed{3}", "no box", "\\boxed{1} \\boxed{2}", "\\boxed{}"]) == [1.0, 0.0, 0.0, 0.0]


def test_agpo_length_bonus_only_for_correct_completions_of_mixed_groups():
    correct = [True, True, False, False, True, True, True, True]
    lengths = [10, 20, 5, 5, 10, 20, 30, 40]
    b = rewards.agpo_length_bonus(correct, lengths, 4, coef=0.1)
    assert b[0] == pytest.approx(0.1) and b[1] == pytest.approx(0.1 * 1e-6 / (10 + 1e-6))
    assert b[2:] == [0.0] * 6  # wrong completions, and the all-correct group


def test_kimi_length_penalty():
    correct = [True, False, True, False]
    lengths = [10, 10, 30, 20]
    p = rewards.kimi_length_penalty(correct, lengths, 4)
    # λ = 0.5 − (L − 10)/20: [0.5, 0.5, -0.5, 0.0]; wrong ones get min(0, λ)
    assert p == pytest.approx([0.5, 0.0, -0.5, 0.0])
    assert rewards.kimi_length_penalty([True, True], [5, 5], 2) == [0.0, 0.0]


def test_length_penalty_trl_signature():
    out = rewards.length_penalty(["q"] * 2, ["\\boxed{1}", "\\boxed{2}"], ["#### 1"] * 2,
                                 completion_ids=[[1] * 3, [1] * 7], num_generations=2)
    assert out == pytest.approx([0.5, -0.5])


def test_reward_lookup():
    assert rewards.get_reward_func("correctness") is rewards.correctness_reward
    assert rewards.get_reward_func("rewards:format_reward") is rewards.format_reward
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.get_reward_func("nope")
    with pytest.raises(ValueError, match="cannot import"):
        rewards.get_reward_func("no_such_module:f")
