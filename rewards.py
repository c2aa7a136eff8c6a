"""Reward functions shared by every training script (ALGORITHMS.md "Rewards").

Every reward has TRL's signature, ``fn(prompts, completions, **columns) -> list[float | None]``:
``completions`` are strings (or chat messages, whose last content is used), ``columns`` are the
data set's columns, one value per completion (the gold answer arrives as ``answer``), plus
``completion_ids`` and ``num_generations`` from the trainer. ``None`` means "cannot score" (the
gold does not parse): the trainer gives such a completion zero advantage instead of crashing.

Completions are ordered group by group (the G completions of one prompt are consecutive), which is
what the group-aware shaping functions below rely on.

Time per call is bounded on adversarial text: the answer is cut out of the completion by a linear
scan, over-long answers are rejected before any parsing, and math-verify's parse/verify run under
its own alarm-based timeout (which needs the main thread, where the trainers call rewards).
"""

from __future__ import annotations

import importlib
import re
from fractions import Fraction
from functools import lru_cache
from typing import Callable

MAX_ANSWER_CHARS = 200  # no real final answer is longer; longer ones are counted wrong, unparsed
MATH_VERIFY_TIMEOUT_S = 1  # per parse and per verify call (math-verify's alarm granularity is 1 s)

RewardFunc = Callable[..., list]

_NUMBER = re.compile(r"-?\d{1,30}(?:\.\d{1,30})?")  # plain decimals only: no 1e999999 blow-ups
_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _text(completion) -> str:
    """A completion as text: a string, or the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces matched.

    Linear in the length of the text, so 100k characters or deep nesting cost microseconds;
    an unbalanced last box gives None.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip("\\boxedfbox ") != "":
        # "\boxed 5" (no braces): the token after the space
        m = re.match(r"\\(?:boxed|fbox) +([^\s$]+)", text[start : start + 100])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def extract_gold(answer) -> str | None:
    r"""The gold final answer of a data-set row, whatever its format.

    GSM8K ``"...#### 1,234"`` → ``"1234"``; MATH ``"...\boxed{\frac{3}{56}}"`` → ``"\frac{3}{56}"``;
    an answer field that is already the answer (``"0.5"``, ``72``, ``["3"]``) is returned as text.
    """
    if answer is None:
        return None
    if isinstance(answer, (list, tuple)):  # OlympiadBench stores final answers as lists
        answer = answer[0] if len(answer) == 1 else None
        if answer is None:
            return None
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    text = str(answer).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif "\\boxed" in text or "\\fbox" in text:
        text = last_boxed(text) or ""
    text = text.strip().strip("$").strip()
    return text or None


def extract_answer(completion: str, last_number_fallback: bool = False) -> str | None:
    r"""A completion's final answer: its last ``\boxed{}``; optionally the last number instead."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if last_number_fallback:
        numbers = _LAST_NUMBER.findall(completion[-1000:])
        if numbers:
            return numbers[-1].replace(",", "")
    return None


def _plain_number(s: str) -> Fraction | None:
    s = s.replace(",", "").replace("\\!", "").replace(" ", "").rstrip(".").strip("$")
    s = s.removesuffix("\\%").removesuffix("%")
    return Fraction(s) if _NUMBER.fullmatch(s) else None


@lru_cache(maxsize=4096)
def _parse(expr: str):
    from math_verify import parse

    return parse("\\boxed{" + expr + "}", parsing_timeout=MATH_VERIFY_TIMEOUT_S)


def is_correct(pred: str | None, gold: str) -> bool:
    """Whether a predicted final answer equals the gold one (exact numbers, then math-verify)."""
    if pred is None or len(pred) > MAX_ANSWER_CHARS:
        return False
    a, b = _plain_number(pred), _plain_number(gold)
    if a is not None and b is not None:  # fast path for GSM8K-style integers and decimals
        return a == b
    if pred.strip() == gold.strip():
        return True
    from math_verify import verify

    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=MATH_VERIFY_TIMEOUT_S))


def gold_is_scorable(gold: str | None) -> bool:
    if gold is None or len(gold) > MAX_ANSWER_CHARS:
        return False
    # a gold that math-verify only keeps as its raw string (no expression parsed) cannot be scored
    return _plain_number(gold) is not None or any(not isinstance(p, str) for p in _parse(gold))


def correctness_reward(prompts, completions, answer, last_number_fallback=False, **kwargs) -> list:
    r"""1.0 if the completion's final answer (last ``\boxed{}``) equals the gold, else 0.0.

    None where the gold answer does not parse (the row cannot be scored).
    """
    out = []
    for completion, gold_raw in zip(completions, answer, strict=True):
        gold = extract_gold(gold_raw)
        if not gold_is_scorable(gold):
            out.append(None)
            continue
        pred = extract_answer(_text(completion), last_number_fallback)
        out.append(1.0 if is_correct(pred, gold) else 0.0)
    return out


def correctness_reward_last_number(prompts, completions, answer, **kwargs) -> list:
    """``correctness_reward`` that falls back to the last number when there is no ``\\boxed{}``."""
    return correctness_reward(prompts, completions, answer, last_number_fallback=True)


def correctness_pm1(prompts, completions, answer, **kwargs) -> list:
    """AGPO's reward (ALGORITHMS.md §2): +1 if the final answer is correct, −1 otherwise (no answer
    counts as wrong); None where the gold does not parse."""
    return [None if s is None else 2.0 * s - 1.0 for s in correctness_reward(prompts, completions, answer)]


def format_reward(prompts, completions, **kwargs) -> list:
    r"""1.0 if the completion ends its reasoning with exactly one well-formed ``\boxed{...}``."""
    out = []
    for completion in completions:
        text = _text(completion)
        ok = text.count("\\boxed") == 1 and last_boxed(text) not in (None, "")
        out.append(1.0 if ok else 0.0)
    return out


# --- group-aware shaping (pure functions on one step's flat, group-ordered lists) -----------------


def _groups(n: int, num_generations: int):
    if num_generations < 1 or n % num_generations:
        raise ValueError(f"{n} completions do not split into groups of {num_generations}")
    return [range(s, s + num_generations) for s in range(0, n, num_generations)]


def agpo_length_bonus(correct, lengths, num_generations: int, coef: float = 0.1) -> list[float]:
    """AGPO's length bonus (ALGORITHMS.md §2), one value per completion.

    In a mixed group (some correct, some wrong) each correct completion gets
    ``coef * (1 - (L - Lmin) / (Lmax - Lmin + 1e-6))`` with Lmin/Lmax over the group's *correct*
    completions; wrong completions and unmixed groups get 0.
    """
    bonus = [0.0] * len(correct)
    for g in _groups(len(correct), num_generations):
        ok = [i for i in g if correct[i]]
        if not 0 < len(ok) < num_generations:
            continue
        lo, hi = min(lengths[i] for i in ok), max(lengths[i] for i in ok)
        for i in ok:
            bonus[i] = coef * (1.0 - (lengths[i] - lo) / (hi - lo + 1e-6))
    return bonus


def kimi_length_penalty(correct, lengths, num_generations: int) -> list[float]:
    """Kimi k1.5 length reward: ``λ = 0.5 − (L − Lmin)/(Lmax − Lmin)`` per group (Lmin/Lmax over
    the whole group); λ for correct completions, ``min(0, λ)`` for wrong ones, 0 if Lmax = Lmin."""
    out = [0.0] * len(correct)
    for g in _groups(len(correct), num_generations):
        lo, hi = min(lengths[i] for i in g), max(lengths[i] for i in g)
        if hi == lo:
            continue
        for i in g:
            lam = 0.5 - (lengths[i] - lo) / (hi - lo)
            out[i] = lam if correct[i] else min(0.0, lam)
    return out


def length_penalty(prompts, completions, answer, completion_ids, num_generations, **kwargs) -> list:
    """TRL-style wrapper of ``kimi_length_penalty``; correctness judged by ``correctness_reward``.

    Groups whose gold does not parse get None.
    """
    scores = correctness_reward(prompts, completions, answer)
    lengths = [len(ids) for ids in completion_ids]
    pen = kimi_length_penalty([s == 1.0 for s in scores], lengths, num_generations)
    return [None if s is None else p for s, p in zip(scores, pen)]


REWARD_FUNCS: dict[str, RewardFunc] = {
    "correctness": correctness_reward,
    "correctness_last_number": correctness_reward_last_number,
    "correctness_pm1": correctness_pm1,
    "format": format_reward,
    "length_penalty": length_penalty,
}


def get_reward_func(name: str) -> RewardFunc:
    """A reward by its name here, or any importable ``module:function`` with the same signature."""
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--reward-funcs {name!r}: cannot import it ({e})") from e
        if callable(fn):
            return fn
    raise ValueError(
        f"--reward-funcs: unknown reward {name!r}; choose from {sorted(REWARD_FUNCS)} "
        "or give an importable 'module:function'"
    )
