"""A synthetic retrieval corpus: prose-like filler with key-value facts planted at random depths.

Needle-in-a-haystack asks a model to find one number in a long text and
repeat it when asked. A tiny model trained on ordinary prose never learns
that, so an evaluation of it can only print 0%. This corpus teaches the
*shape* of the task without the evaluation's own haystack or needle: each
document is filler made of common words, made-up names and punctuation (not
the NIAH essays), with facts of the needle's form but never its words, such as
``The quiet copper number is: 40718263.``, each asked about one or more times
at random points after it::

    ... Tavelo walks past the harbour, she said: ... The quiet copper number is: 40718263. ...
    What is the quiet copper number mentioned in the text? The quiet copper number is: 40718263

Documents are a pure function of ``(seed, index)``, so every rank and every
rerun builds the same corpus, and ``write_corpus`` is cached by its options.

    python -m trainer.data.synthetic runs/retrieval-corpus.jsonl --documents 4000 --chars 60 230
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

from pydantic import Field, Strict

from topology.errors import ConfigError
from trainer.schema import PositiveInt, Seed, validate

WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem hand "
    "part place case week company system program question work government night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head house service friend father power "
    "hour game line end member law car city community name team minute idea kid body information back parent face others "
    "level office door health person art war history party result change morning reason research girl moment air teacher "
    "force education foot boy age policy process music market sense nation plan college interest death experience effect "
    "class control care field role effort rate heart show leader light voice wife police mind price report decision son "
    "view town road arm value building action model season society paper space ground form event matter center couple "
    "site project star table need court oil situation cost figure street image phone data picture practice piece land "
    "doctor wall worker news test movie love support step baby computer type attention film tree source hair window "
    "evidence truth song river ship lamp bread stone clock ledger harbour island village wind rain sea coast rope boat "
    "bell letter garden bridge tower forest valley was are were be have has had do does did say said go went get got make "
    "made know knew think thought take took see saw come came want look use find give tell call try ask feel become leave "
    "put mean keep let begin seem help talk turn start hear play run move like live believe hold bring happen write sit "
    "stand lose pay meet continue set learn lead understand watch follow stop create speak read allow add spend grow open "
    "walk win offer remember consider appear buy wait serve die send expect build stay fall cut reach remain the the the "
    "the a a a an of of of to to to in in in and and and that it for on with as at by from this but or not all they we "
    "he she you his her their its one some many more most other new old good great small large long little own same few "
    "last early young public bad able very often still also never always again only just even well back then there here "
    "now when where while because after before through over under between during without about against into across"
).split()
"""Common English words: most of the filler."""

SYLLABLES = ("ba be bi bo bu ca ce co da de di do fa fe fi fo ga ge go ha he hi ho ja jo ka ke ki ko la le li lo lu ma me "
             "mi mo mu na ne ni no nu pa pe pi po ra re ri ro ru sa se si so su ta te ti to tu va ve vi wa we wi ya yo za "
             "th sh ch st tr pl gr an en in on er ar or al el il ow ay ee oo ing ed ly").split()
"""Pieces of made-up words and names: the filler holds letters in every order, as real prose does."""

KEY_WORDS = ("amber silver copper cobalt crimson ivory jade olive scarlet violet golden azure hidden secret quiet ancient "
             "lucky final first strange bright hollow frozen distant northern eastern little broken sacred lost winter "
             "summer silent rare old private royal simple early late lonely heavy gentle proud").split()
KEY_NOUNS = KEY_WORDS + "winning personal security master access backup reference serial".split()
"""A fact's key is ``<word> <noun> number``: the needle's shape ("The special magic number is: N."),
never its words (neither "special" nor "magic" is here)."""

QUESTIONS = ("\nWhat is the {key} mentioned in the text? The {key} is:",
             "\nWhat is the {key}? The {key} is:")
"""A question ends where its answer, `` <value>`` (leading space included, as NIAH scores it), begins."""


Documents = Annotated[int, Strict(), Field(ge=1, le=10_000_000)]
"""Documents of a generated corpus: every rank generates all of them, so a few million at most."""
Span = tuple[PositiveInt, PositiveInt]
"""Fewest and most of something per document, as ``[lo, hi]``."""


@dataclass(frozen=True)
class RetrievalCorpus:
    """How the corpus is generated; every field changes the text, so all of it names the cache file."""

    documents: Documents = 4000
    chars: Span = (100, 240)
    """Shortest and longest filler of a document, in characters (= byte-tokenizer tokens); each
    document draws its length uniformly, so facts sit at every distance from their questions."""
    sentences: Span = (2, 6)
    """Fewest and most distinct filler sentences per document, repeated in random order to fill it:
    the only way to predict a repeat is to find its earlier copy, the same skill (an induction
    head) that retrieving a fact needs, rewarded on every line. A large bound means no repeats."""
    facts: Span = (1, 4)
    """Fewest and most facts planted per document, each at a random depth."""
    asks: Span = (1, 3)
    """Fewest and most times each fact is asked, each time at a random point after it: the
    answer is the only thing in the document that predicts the digits, so a question is a
    dense, direct reward for looking the key up, many times per sample."""
    spacing: Literal["after", "uniform"] = "after"
    """Where a fact's questions fall: ``after`` (the fact at a random depth, each question at a random
    point after it: most questions sit close to their fact) or ``uniform`` (each question's distance
    from its fact drawn uniformly over the document, so a lookup across the whole document is as
    common as a short one: what an extension to a longer context has to learn)."""
    digits: Annotated[int, Strict(), Field(ge=1, le=18)] = 8
    seed: Seed = 0
    loss: Literal["all", "answers"] = "all"
    """Which tokens a model learns from: ``all`` (plain language modelling) or ``answers`` (only
    each question's answer, as instruction data masks its prompts): every gradient then goes to
    retrieval, the one skill the corpus is for, instead of to predicting filler."""

    def check(self) -> None:
        """What spans fields (each field's own type and range are in its annotation)."""
        reversed_ = [name for name in ("chars", "sentences", "facts", "asks") if getattr(self, name)[0] > getattr(self, name)[1]]
        if reversed_:
            raise ConfigError(f"data.synthetic.retrieval: {', '.join(f'{n} {list(getattr(self, n))}' for n in reversed_)} "
                              "out of range; give each as [fewest, most]")

    @property
    def learns_part(self) -> bool:
        return self.loss == "answers"

    def segments(self, index: int) -> list[tuple[str, bool]]:
        return retrieval_segments(self, index)


def _word(rng: random.Random) -> str:
    draw = rng.random()
    if draw < 0.6:
        return rng.choice(WORDS)
    made = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
    if draw < 0.75:
        return made.capitalize()  # a name
    if draw < 0.8:
        return made + rng.choice(("'s", "-" + rng.choice(WORDS), "'", "s"))
    return made


def _sentence(rng: random.Random) -> str:
    """Prose-like: real and made-up words, names, commas, colons, quotes, paragraph breaks."""
    words = [_word(rng) for _ in range(rng.randint(4, 18))]
    for _ in range(rng.randint(0, 2)):
        i = rng.randrange(len(words))
        # A colon now and then, as prose has ("she had written: ..."): the model must match
        # the fact's key, not merely copy whatever follows the last ": ".
        words[i] = words[i] + rng.choice((",", ",", ";", ":", " -", ")")) if rng.random() < 0.9 else f'"{words[i]}"'
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice((".", ".", ".", ".", "!", "?", '."', ".\n\n", ".\n"))


def _fact(rng: random.Random, digits: int, used: set[str]) -> tuple[str, str]:
    while True:
        key = f"{rng.choice(KEY_WORDS)} {rng.choice(KEY_NOUNS)} number"
        if key not in used:
            used.add(key)
            return key, str(rng.randrange(10 ** (digits - 1), 10**digits))


def _fact_and_questions(spec: RetrievalCorpus, rng: random.Random, pieces: int) -> tuple[float, Iterable[float]]:
    """Depth of one fact and of each of its questions, as fractions of the ``pieces`` filler pieces.

    ``uniform`` counts in slots between pieces (slot s: before piece s; slot ``pieces``: after the
    last), so a fact can open the document and a question close it, and each gap is uniform over
    them. ``after`` yields its questions lazily: their draws interleave with the caller's choice of
    wording, as they always have, so its corpora stay byte-identical.
    """
    if spec.spacing == "uniform":
        gaps = [rng.randint(0, pieces) for _ in range(rng.randint(*spec.asks))]
        slot = rng.randint(0, pieces - max(gaps))
        return slot / pieces, [(slot + gap) / pieces for gap in gaps]
    depth = rng.random()
    return depth, (rng.uniform(depth, 1.0001) for _ in range(rng.randint(*spec.asks)))


def retrieval_segments(spec: RetrievalCorpus, index: int) -> list[tuple[str, bool]]:
    """Document ``index`` as ``(text, is_answer)`` pieces: filler with facts at random depths, each
    asked about at random points after it; the answers are the pieces marked True."""
    rng = random.Random(f"{spec.seed}:{index}")
    pool, target, filler = [_sentence(rng) for _ in range(rng.randint(*spec.sentences))], rng.randint(*spec.chars), []
    while sum(len(s) + 1 for s in filler) < target:
        filler.append(rng.choice(pool))
    used: set[str] = set()
    inserts: list[tuple[float, list[tuple[str, bool]]]] = []
    for key, value in (_fact(rng, spec.digits, used) for _ in range(rng.randint(*spec.facts))):
        depth, points = _fact_and_questions(spec, rng, len(filler))
        inserts.append((depth, [(f" The {key} is: {value}. ", False)]))
        for at in points:
            inserts.append((at, [(rng.choice(QUESTIONS).format(key=key), False), (f" {value}", True), ("\n", False)]))
    inserts.sort(key=lambda item: item[0])
    out: list[tuple[str, bool]] = []
    for i, sentence in enumerate(filler):
        while inserts and inserts[0][0] <= i / len(filler):
            out += inserts.pop(0)[1]
        out.append(((" " if out and not out[-1][0].endswith("\n") else "") + sentence, False))
    for _, pieces in inserts:
        out += pieces
    out[0] = (out[0][0].lstrip(), out[0][1])
    while out and not out[-1][0].strip():
        out.pop()
    out[-1] = (out[-1][0].rstrip(), out[-1][1])
    return out + [("\n", False)]


def retrieval_document(spec: RetrievalCorpus, index: int) -> str:
    """Document ``index`` as one text (``retrieval_segments`` joined)."""
    return "".join(text for text, _ in retrieval_segments(spec, index))


@dataclass(frozen=True)
class CopyDrills:
    """Short strings of random digits, each with a span repeated later: loss on the repeat only.

    Retrieval is copying: find where the key last appeared and repeat the digits
    after it. A tiny model learns to copy (an induction head) within a few hundred
    steps of short, dense drills, but not within a few thousand steps of long
    documents, where one question's answer is a few tokens among hundreds. A stage
    of drills (packed with ``document_mask``, so each stays a short context)
    before the retrieval corpus gives the later stage the circuit it needs.
    """

    documents: Documents = 20000
    length: Annotated[int, Strict(), Field(ge=2, le=1_000_000)] = 32
    """Digits per drill."""
    span: PositiveInt = 8
    """Digits repeated: copied from the first half into the second."""
    seed: Seed = 0
    loss: Literal["copies", "all"] = "copies"
    """``copies``: learn only the repeat's digits after its first (the first cannot be known); ``all``: every token."""

    def check(self) -> None:
        if 2 * self.span > self.length:
            raise ConfigError(f"data.synthetic.copy: span {self.span} out of range for length {self.length}; "
                              "length >= 2 * span (the span and its copy)")

    @property
    def learns_part(self) -> bool:
        return self.loss == "copies"

    def segments(self, index: int) -> list[tuple[str, bool]]:
        rng = random.Random(f"copy:{self.seed}:{index}")
        digits = [rng.choice("0123456789") for _ in range(self.length)]
        half = self.length // 2
        src, dst = rng.randrange(0, half - self.span + 1), rng.randrange(half, self.length - self.span + 1)
        digits[dst:dst + self.span] = digits[src:src + self.span]
        text = "".join(digits)
        return [(text[:dst + 1], False), (text[dst + 1:dst + self.span], True), (text[dst + self.span:], False)]


GENERATORS = {"retrieval": RetrievalCorpus, "copy": CopyDrills}
"""Generators a recipe's ``data.synthetic`` may name."""


def corpus_spec(raw: dict[str, Any]) -> RetrievalCorpus | CopyDrills:
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
    spec = validate(cls, options, f"data.synthetic.{name}")  # each field's type and range
    spec.check()  # what spans fields
    return spec


def synthetic_documents(raw: dict[str, Any]) -> list[str] | list[list[tuple[str, bool]]]:
    """Every document of the corpus a recipe's ``data.synthetic`` names: texts, or where the loss
    falls on part of each (``loss: answers``, ``loss: copies``) ``(text, learned)`` pieces (``trainer.data.tokenize``)."""
    spec = corpus_spec(raw)
    docs = [spec.segments(i) for i in range(spec.documents)]
    return docs if spec.learns_part else ["".join(text for text, _ in doc) for doc in docs]


def write_corpus(path: str | os.PathLike, spec: RetrievalCorpus | CopyDrills) -> Path:
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
            f.write(json.dumps({"text": "".join(text for text, _ in spec.segments(i))}) + "\n")
    os.replace(tmp, path)
    stamp.write_text(wanted)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.data.synthetic", description="Write the synthetic retrieval corpus.")
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
