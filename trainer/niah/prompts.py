"""Needle-in-a-haystack prompts: a text haystack cut to length, a needle at a depth, the question.

A prompt of ``length`` tokens is::

    <bos> haystack ... The special magic number is: 48213907. ... haystack
    What is the special magic number mentioned in the text? The special magic number is: 48213907

The haystack is tokenized once and repeated as needed; the needle goes in at
``depth`` of the haystack, moved back to the nearest sentence start so it
never splits a word. The number is drawn from a generator seeded by the
cell, so every rank (and every rerun) builds the same prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topology.errors import ConfigError

NEEDLE = " The special magic number is: {number}. "
QUESTION = "\nWhat is the special magic number mentioned in the text? The special magic number is:"
ANSWER = " {number}"


@dataclass
class Prompt:
    """One cell's token ids; the answer is the last ``len(answer)`` of them."""

    ids: list[int]
    number: str
    needle_at: int
    """Token position where the needle sentence starts."""
    answer: list[int]


def load_haystack(directory: str | Path) -> str:
    """All ``.txt`` files under ``directory`` (name order), joined by blank lines."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"niah: haystack {d} is not a directory; give a directory of .txt files")
    texts = [p.read_text(errors="replace").strip() for p in sorted(d.rglob("*.txt"))]
    text = "\n\n".join(t for t in texts if t)
    if not text:
        raise ConfigError(f"niah: haystack directory {d} has no text; put plain-text (.txt) files in it")
    return text


def needle_number(seed: int, length: int, depth: float, digits: int) -> str:
    """The cell's random number: the same for the same cell and seed, on every rank."""
    rng = random.Random(f"{seed}:{length}:{depth}")
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


class PromptBuilder:
    """Turns (length, depth) into token ids: haystack tokens cut to fit, needle at a sentence start."""

    def __init__(self, tokenizer: Any, haystack: str, digits: int = 8, seed: int = 0):
        self.tokenizer, self.digits, self.seed = tokenizer, digits, seed
        self.hay = self._encode(haystack)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        # Tokens after which a sentence starts: the needle goes there, not mid-word.
        self.stops = {t for t in set(self.hay) if tokenizer.decode([t]).rstrip().endswith((".", "!", "?"))}
        self.question = self._encode(QUESTION)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fixed_tokens(self, number: str) -> int:
        """Tokens of a prompt that are not haystack: BOS, needle, question and answer."""
        needle, answer = self._encode(NEEDLE.format(number=number)), self._encode(ANSWER.format(number=number))
        return len(self.bos) + len(needle) + len(self.question) + len(answer)

    def build(self, length: int, depth: float) -> Prompt:
        """The prompt of exactly ``length`` tokens with the needle at ``depth`` (0: first, 1: last before the question)."""
        number = needle_number(self.seed, length, depth, self.digits)
        needle, answer = self._encode(NEEDLE.format(number=number)), self._encode(ANSWER.format(number=number))
        fixed = len(self.bos) + len(needle) + len(self.question) + len(answer)
        budget = length - fixed
        if budget < 0:
            raise ConfigError(f"niah: a {length}-token context cannot hold the needle, question and answer "
                              f"({fixed} tokens); raise --min-len")
        reps = budget // len(self.hay) + 1
        hay = (self.hay * reps)[:budget]
        target = round(depth * budget)
        # Back up to the nearest sentence start within 200 tokens; none there: the exact depth.
        starts = (p for p in range(target, max(0, target - 200) - 1, -1) if p in (0, budget) or hay[p - 1] in self.stops)
        at = next(starts, target)
        return Prompt(self.bos + hay[:at] + needle + hay[at:] + self.question + answer, number, len(self.bos) + at, answer)
