"""Rewards for the tests' synthetic tasks, in TRL's signature (passed as --reward-funcs module:function)."""


def letter_a(prompts, completions, **kwargs):
    """Fraction of a completion's characters that are the letter 'a' (a random tiny model gets some)."""
    return [text.count("a") / max(len(text), 1) for text in completions]

