"""Rewards for the tests' synthetic tasks, in TRL's signature (passed as --reward-funcs module:function)."""

import os
import random


def letter_a(prompts, completions, **kwargs):
    """Fraction of a completion's characters that are the letter 'a' (a random tiny model gets some)."""
    return [text.count("a") / max(len(text), 1) for text in completions]


def has_a_pm1(prompts, completions, **kwargs):
    """+1 if the completion contains the letter 'a', else −1: a ±1 "correctness" that a random tiny
    model gets right about half the time, so its groups are mixed."""
    return [1.0 if "a" in text else -1.0 for text in completions]


def python_random(prompts, completions, **kwargs):
    """Noise drawn from Python's global RNG: it reproduces across --resume only if that RNG's state does."""
    return [random.random() for _ in completions]


def parity_pm1(prompts, completions, **kwargs):
    """+1 if the completion has an even number of characters, else −1: mixed groups for any model and vocabulary."""
    return [1.0 if len(text) % 2 == 0 else -1.0 for text in completions]


def fails_on_rank_1(prompts, completions, **kwargs):
    """Raises on rank 1 only (RANK, set by the launcher), so its peers wait in a collective: the run must still end."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("toy reward failed on rank 1 on purpose")
    return [0.0 for _ in completions]
