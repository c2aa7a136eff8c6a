"""Reward functions shared by every training script (docs/algorithms.md §5).

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
The regular expressions below are unambiguous (one way to match any text), so they are linear in it
too, docs/algorithms.md (5.3).
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from fractions import Fraction
from functools import lru_cache
from typing import Callable

MAX_ANSWER_CHARS = 200  # no real final answer is longer; longer ones are counted wrong, unparsed
MATH_VERIFY_TIMEOUT_S = 1  # per parse and per verify call (math-verify's alarm granularity is 1 s)

RewardFunc = Callable[..., list]

# A number is plain digits or thousands groups (1,234,567; SI style 1 234 567), with an optional decimal
# part; "1,3,5" is a list, not 135 (docs/algorithms.md (5.2)). Plain decimals only: no 1e999999 blow-ups.
_INT = r"(?:\d{1,3}(?:,\d{3}){1,10}|\d{1,3}(?: \d{3}){1,10}|\d{1,30})"
_NUMBER = re.compile(rf"-?{_INT}(?:\.\d{{1,30}})?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LAST_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|-?\d+(?:\.\d+)?")

# What may follow the number of an answer such as "9 (apples)", "12 cm^2", "40\%", "3 \text{ cm}"
# (docs/algorithms.md (5.1)): spaces, a percent sign, degrees, words (optionally with a ^2-style
# exponent), a parenthesised phrase, a \text{}/\mbox{} unit, a final period. No digits except exponents,
# so an answer holding a second number ("3 and 4", "5 cm by 3 cm") is never reduced to its first.
_EXPONENT = r"(?:\^\{?\d\}?)?"
_UNIT_TOKEN = re.compile(
    r"\s+|\\[,;: ]|~|\\?%|\^\{?\\circ\}?|°"
    rf"|(?P<word>[A-Za-z]+){_EXPONENT}"
    r"|\([A-Za-z][A-Za-z' -]*[A-Za-z]\)"
    rf"|\\(?:text|mbox|mathrm)\{{[^{{}}\d]*\}}{_EXPONENT}"
    r"|\.\s*$"
)
# words that make an expression of the number before them (3 pi, 2 sin), not a unit
_NOT_UNITS = frozenset("pi sin cos tan sec csc cot log ln exp sqrt mod".split())
_TEXT_WRAPPER = re.compile(r"\\(?:text|mbox|textbf|mathrm)\{([^{}]*)\}")
_WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")


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
        text = _without_thousands_commas(text.rsplit("####", 1)[1].strip())
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
        numbers = _LAST_NUMBER.findall(completion[-1000:])  # "1,3,5" gives 1, 3, 5: its last is 5
        if numbers:
            return _without_thousands_commas(numbers[-1])
    return None


def _without_thousands_commas(s: str) -> str:
    """``1,234`` → ``1234``; anything else (a list ``1,3,5``, an expression) unchanged (docs/algorithms.md (5.2))."""
    return s.replace(",", "") if _THOUSANDS.fullmatch(s) else s


def number_of(answer: str) -> str | None:
    r"""The number of an answer that is a number, possibly with a unit or words, else None.

    ``9 (apples)``, ``15 balls``, ``\$18``, ``5 cm``, ``40\%``, ``3 \text{ cm}``, ``12 cm^2`` → the number
    (thousands commas dropped): math-verify reads ``9 (apples)`` as ``9*E*a*l*p*p*s``, so a correct
    ``\boxed{9}`` would score 0 (docs/algorithms.md (5.1)). Expressions stay None: ``2x`` (a word glued
    to the number), ``2 x`` (a one-letter word is a variable), ``3 pi``, ``3 and 4``, ``5 + 3``,
    ``\frac{3}{4}``. A scan token by token, linear in the length (docs/algorithms.md (5.3)).
    """
    s = answer.replace("\\!", "").strip()
    wrapped = _TEXT_WRAPPER.fullmatch(s)  # \text{9 apples}
    s = (wrapped.group(1) if wrapped else s).strip().strip("$").strip()
    s = s.removeprefix("\\$").lstrip()
    m = _NUMBER.match(s)
    if m is None:
        return None
    pos = m.end()
    while pos < len(s):
        token = _UNIT_TOKEN.match(s, pos)
        if token is None:
            return None
        word = token.group("word")
        if word is not None and (pos == m.end() or len(word) < 2 or word.lower() in _NOT_UNITS):
            return None
        pos = token.end()
    return m.group().replace(",", "").replace(" ", "")


def _as_text(s: str) -> str:
    r"""An answer as plain text: ``\text{}`` unwrapped, whitespace collapsed, final period dropped, lower case."""
    s = _TEXT_WRAPPER.sub(lambda m: m.group(1), s)
    return " ".join(s.split()).rstrip(".").strip().lower()


def is_word_gold(gold: str) -> bool:
    """Whether a gold is a plain word (``Tuesday``, ``yes``, ``apples``), to be compared as text.

    math-verify turns a word into a product of one-letter symbols, ``T*u*e*s*d*a*y``, which any
    permutation of its letters (``sey`` for ``yes``) would equal. Known cost: a product of
    variables written without signs (``xy``) is compared as text too, so ``yx`` is wrong for it.
    """
    text = _TEXT_WRAPPER.sub(lambda m: m.group(1), gold).strip().rstrip(".").strip()
    if not _WORDS.fullmatch(text) or len(text) < 2:
        return False
    parsed = [p for p in _parse(text) if not isinstance(p, str)]
    return bool(parsed) and bool(getattr(parsed[0], "is_Mul", False))


@lru_cache(maxsize=4096)
def _parse(expr: str):
    from math_verify import parse

    return parse("\\boxed{" + expr + "}", parsing_timeout=MATH_VERIFY_TIMEOUT_S)


def is_correct(pred: str | None, gold: str) -> bool:
    """Whether a predicted final answer equals the gold one: exact numbers (units dropped), words as
    text, then math-verify."""
    if pred is None or len(pred) > MAX_ANSWER_CHARS:
        return False
    a, b = number_of(pred), number_of(gold)
    if a is not None and b is not None:  # fast path for GSM8K-style integers and decimals
        return Fraction(a) == Fraction(b)
    if is_word_gold(gold):
        return _as_text(pred) == _as_text(gold)
    if pred.strip() == gold.strip():
        return True
    from math_verify import verify

    pred, gold = a or pred, b or gold  # "9 (apples)" is 9 to math-verify as well
    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=MATH_VERIFY_TIMEOUT_S))


def gold_is_scorable(gold: str | None) -> bool:
    if gold is None or len(gold) > MAX_ANSWER_CHARS:
        return False
    # a gold that math-verify only keeps as its raw string (no expression parsed) cannot be scored
    return number_of(gold) is not None or any(not isinstance(p, str) for p in _parse(gold))


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
        except (ImportError, AttributeError) as e:  # a user's mistake: one line, no traceback
            raise SystemExit(f"--reward-funcs {name!r}: cannot import it ({e})") from None
        if callable(fn):
            return fn
    raise SystemExit(
        f"--reward-funcs: unknown reward {name!r}; choose from {sorted(REWARD_FUNCS)} "
        "or give an importable 'module:function'"
    )


def checked(name: str, values, n: int) -> list[float]:
    """Reward `name`'s output for n completions as n floats, NaN for None ("cannot score"); anything else stops the
    run with what it returned."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{type(values).__name__} of length {len(values) if hasattr(values, '__len__') else '?'}"
        raise RuntimeError(f"reward {name!r} returned {got} for {n} completions; "
                           "it must return a list of one float or None per completion")
    bad = [v for v in values if v is not None and not (
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v))]
    if bad:
        raise RuntimeError(f"reward {name!r} returned {bad[0]!r} ({len(bad)} such values); "
                           "a reward is a finite number, or None for 'cannot score'")
    return [float("nan") if v is None else float(v) for v in values]
