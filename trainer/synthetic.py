"""A synthetic retrieval corpus: long filler documents with key-value facts planted at random depths.

Needle-in-a-haystack asks a model to find one number in a long text and
repeat it when asked. A tiny model trained on ordinary prose never learns
that, so an evaluation of it can only print 0%. This corpus teaches the
*shape* of the task without the evaluation's own haystack or needle: each
document is filler made from a small word list (not the NIAH essays), with
facts such as ``The pass code of the amber gate is: 40718263.`` planted at
random depths, and ends with questions whose answers are those values::

    ... the river turns past a field ... The pass code of the amber gate is: 40718263. ...
    What is the pass code of the amber gate? The pass code of the amber gate is: 40718263

Documents are a pure function of ``(seed, index)``, so every rank and every
rerun builds the same corpus, and ``write_corpus`` is cached by its options.

    python -m trainer.synthetic runs/retrieval-corpus.jsonl --documents 4000 --chars 100 900
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from topology.errors import ConfigError

WORDS = (
    "the a river field stone wind old small bright quiet long slow green grey north south east west "
    "road hill house door window garden morning evening winter summer light shadow water bread lamp "
    "walks turns waits falls rises carries holds opens closes sings sleeps runs past under over near "
    "beside across through behind along with and but then while because after before every some many "
    "few other each most village harbour market bridge tower forest valley meadow orchard cart boat "
    "rope basket letter story song clock bell candle kettle table chair blanket coat boot hat"
).split()

KEY_NOUNS = "gate vault locker door safe archive cabinet box drawer chest room hatch".split()
KEY_ADJECTIVES = "amber silver copper cobalt crimson ivory jade olive scarlet violet golden azure".split()
KEY_KINDS = ("pass code", "serial number", "access number", "lock code", "account number", "magic code")


@dataclass(frozen=True)
class RetrievalCorpus:
    """How the corpus is generated; every field changes the text, so all of it names the cache file."""

    documents: int = 4000
    chars: tuple[int, int] = (100, 900)
    """Shortest and longest filler of a document, in characters (= byte-tokenizer tokens); each
    document draws its length uniformly, so facts sit at every distance from their question."""
    sentences: tuple[int, int] = (2, 5)
    """Fewest and most distinct filler sentences per document, each made of random words and
    repeated in random order: the only way to predict a repeat is to find its earlier copy, the
    same skill (an induction head) that retrieving a fact needs, rewarded on every line."""
    facts: tuple[int, int] = (1, 3)
    """Fewest and most facts planted per document; each is asked about once at the end."""
    digits: int = 8
    seed: int = 0

    def check(self) -> None:
        lo, hi = self.chars
        if not (self.documents >= 1 and 1 <= lo <= hi and 1 <= self.facts[0] <= self.facts[1] and 1 <= self.digits <= 18
                and 1 <= self.sentences[0] <= self.sentences[1]):
            raise ConfigError(f"data.synthetic.retrieval: {self} is out of range; documents >= 1, 1 <= chars[0] <= chars[1], "
                              "1 <= facts[0] <= facts[1], 1 <= digits <= 18, 1 <= sentences[0] <= sentences[1]")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
    if rng.random() < 0.15:
        # Some sentences carry a colon, as prose does ("written: ..."): the model must match
        # the fact's key, not merely copy whatever follows the first ": ".
        words[rng.randrange(1, len(words) - 1)] += ":"
    return " ".join(words).capitalize() + "."




def _fact(rng: random.Random, digits: int, used: set[str]) -> tuple[str, str]:
    while True:
        key = f"{rng.choice(KEY_KINDS)} of the {rng.choice(KEY_ADJECTIVES)} {rng.choice(KEY_NOUNS)}"
        if key not in used:
            used.add(key)
            return key, str(rng.randrange(10 ** (digits - 1), 10**digits))


def retrieval_document(spec: RetrievalCorpus, index: int) -> str:
    """Document ``index``: filler with facts at random depths, then one question per fact (shuffled)."""
    rng = random.Random(f"{spec.seed}:{index}")
    pool, chars = [_sentence(rng) for _ in range(rng.randint(*spec.sentences))], rng.randint(*spec.chars)
    filler: list[str] = []
    while sum(len(s) + 1 for s in filler) < chars:
        filler.append(rng.choice(pool))
    used: set[str] = set()
    facts = [_fact(rng, spec.digits, used) for _ in range(rng.randint(*spec.facts))]
    for key, value in facts:
        filler.insert(rng.randint(0, len(filler)), f"The {key} is: {value}.")
    rng.shuffle(facts)
    questions = [f"What is the {key}? The {key} is: {value}" for key, value in facts]
    return " ".join(filler) + "\n" + "\n".join(questions) + "\n"


GENERATORS = {"retrieval": RetrievalCorpus}
"""Generators a recipe's ``data.synthetic`` may name."""


def corpus_spec(raw: dict[str, Any]) -> RetrievalCorpus:
    """``{retrieval: {documents: 3000, chars: [60, 460]}}`` -> the generator's spec; one-line error otherwise."""
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in GENERATORS:
        raise ConfigError(f"data.synthetic is {raw!r}; give one generator as a mapping, e.g. {{retrieval: {{documents: 3000}}}} "
                          f"(known: {', '.join(GENERATORS)})")
    name, options = next(iter(raw.items()))
    cls = GENERATORS[name]
    options = options or {}
    known = {f.name for f in fields(cls)}
    if not isinstance(options, dict) or set(options) - known:
        raise ConfigError(f"data.synthetic.{name}: unknown option(s) {sorted(set(options) - known) if isinstance(options, dict) else options!r}; "
                          f"known: {', '.join(sorted(known))}")
    try:
        spec = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    except TypeError as exc:
        raise ConfigError(f"data.synthetic.{name}: {exc}") from None
    spec.check()
    return spec


def synthetic_documents(raw: dict[str, Any]) -> list[str]:
    """Every document of the corpus a recipe's ``data.synthetic`` names."""
    spec = corpus_spec(raw)
    return [retrieval_document(spec, i) for i in range(spec.documents)]


def write_corpus(path: str | os.PathLike, spec: RetrievalCorpus) -> Path:
    """Write the corpus as JSON lines (``{"text": ...}``) at ``path``; an up-to-date file is kept.

    A sidecar ``<path>.spec.json`` records the options: the file is rewritten only
    when they differ. The write goes to a temporary name first, then is renamed.
    """
    path = Path(path)
    stamp = path.with_name(path.name + ".spec.json")
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if path.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        for i in range(spec.documents):
            f.write(json.dumps({"text": retrieval_document(spec, i)}) + "\n")
    os.replace(tmp, path)
    stamp.write_text(wanted)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.synthetic", description="Write the synthetic retrieval corpus.")
    parser.add_argument("output", help="JSON-lines file to write")
    parser.add_argument("--documents", type=int, default=RetrievalCorpus.documents)
    parser.add_argument("--chars", type=int, nargs=2, default=RetrievalCorpus.chars, metavar=("MIN", "MAX"))
    parser.add_argument("--digits", type=int, default=RetrievalCorpus.digits)
    parser.add_argument("--seed", type=int, default=RetrievalCorpus.seed)
    args = parser.parse_args(argv)
    spec = RetrievalCorpus(documents=args.documents, chars=tuple(args.chars), digits=args.digits, seed=args.seed)
    print(write_corpus(args.output, spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
