"""The text the built-in tiny model is pre-trained on: counting, in digits and in words.

The demo fine-tune (``data=sample``) teaches the mapping "342 in words ->: three hundred and
forty-two". The pre-training corpus deliberately never pairs a number with its words: one line
counts in digits ("340, 341, 342, ..."), another in words ("three hundred and forty, three
hundred and forty-one, ..."), at unrelated starting points. So the base knows how to spell and
order number words and digits, and the adapter has to learn which words a number is.
"""
from __future__ import annotations

import random

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """British-style words of 0 <= n < 1000: 342 -> 'three hundred and forty-two' (as sample.jsonl)."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words covers 0..999, got {n}")
    hundreds, rest = divmod(n, 100)
    if rest < 20:
        tail = ONES[rest]
    else:
        tens, ones = divmod(rest, 10)
        tail = TENS[tens] + (f"-{ONES[ones]}" if ones else "")
    if not hundreds:
        return tail
    return f"{ONES[hundreds]} hundred" + (f" and {tail}" if rest else "")


def counting_corpus(lines: int, run_length: int, limit: int, seed: int) -> list[str]:
    """``lines`` lines of ``run_length`` consecutive numbers below ``limit``, alternately in digits
    and in words, each line starting at its own random number (so no line pairs digits with words)."""
    rng = random.Random(seed)
    corpus = []
    for i in range(lines):
        start = rng.randrange(0, limit - run_length)
        run = range(start, start + run_length)
        corpus.append(", ".join(str(n) for n in run) if i % 2 == 0 else ", ".join(number_words(n) for n in run))
    return corpus
