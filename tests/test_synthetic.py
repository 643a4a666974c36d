"""The synthetic retrieval corpus: every question answerable from its own document, never the NIAH needle."""

import json
import re

import pytest

from topology.errors import ConfigError
from trainer.config import DataConfig
from trainer.data.synthetic import RetrievalCorpus, corpus_spec, retrieval_document, synthetic_documents, write_corpus

FACT = re.compile(r"(?:^| )The ([a-z ]+ number) is: (\d+)\. ")
QUESTION = re.compile(r"\nWhat is the ([a-z ]+ number)(?: mentioned in the text)?\? The \1 is: (\d+)\n")


@pytest.mark.parametrize("spacing", ["after", "uniform"])
def test_every_question_asks_a_fact_planted_earlier_in_its_document(spacing):
    spec = RetrievalCorpus(documents=200, chars=(40, 600), facts=(1, 3), asks=(1, 2), spacing=spacing)
    for i in range(spec.documents):
        doc = retrieval_document(spec, i)
        facts = {m.group(1): (m.group(2), m.start()) for m in FACT.finditer(doc)}
        assert 1 <= len(facts) <= 3 and len(FACT.findall(doc)) == len(facts)
        asked: dict[str, int] = {}
        for q in QUESTION.finditer(doc + "\n"):
            value, planted = facts[q.group(1)]
            assert q.group(2) == value and q.start() > planted  # asked after it is stated, with its own value
            asked[q.group(1)] = asked.get(q.group(1), 0) + 1
        assert set(asked) == set(facts) and all(1 <= n <= 2 for n in asked.values())
        assert doc.count("What is the") == sum(asked.values())
        assert all(len(v) == spec.digits for v, _ in facts.values())
        assert "special" not in doc and "magic" not in doc  # the evaluation's needle is never trained on


def _question_distances(spec: RetrievalCorpus) -> list[float]:
    """Each question's distance from its fact, as a fraction of its document's length."""
    out = []
    for i in range(spec.documents):
        doc = retrieval_document(spec, i)
        facts = {m.group(1): m.end() for m in FACT.finditer(doc)}
        out += [(q.start() - facts[q.group(1)]) / len(doc) for q in QUESTION.finditer(doc + "\n")]
    return out


def test_uniform_spacing_asks_across_the_whole_document_as_often_as_close_by():
    """``spacing: uniform`` draws each question's distance from its fact uniformly (in filler pieces): over a tenth of
    them span more than three quarters of the document (fact and questions take room too), where ``after`` (a random
    depth, then a random point after it) puts under 2% there."""
    after = _question_distances(RetrievalCorpus(documents=400, chars=(300, 600), facts=(1, 1), asks=(1, 2)))
    uniform = _question_distances(RetrievalCorpus(documents=400, chars=(300, 600), facts=(1, 1), asks=(1, 2), spacing="uniform"))
    far = lambda d: sum(x > 0.75 for x in d) / len(d)  # noqa: E731
    assert far(after) < 0.02 and 0.1 < far(uniform) < 0.25
    assert all(x >= 0 for x in uniform)  # every question still comes after its fact
    with pytest.raises(ConfigError, match="spacing is 'far'; input should be 'after' or 'uniform'"):
        corpus_spec({"retrieval": {"spacing": "far"}})


def test_documents_are_a_pure_function_of_seed_and_index():
    spec = RetrievalCorpus(documents=5)
    assert [retrieval_document(spec, i) for i in range(5)] == synthetic_documents({"retrieval": {"documents": 5}})
    assert retrieval_document(spec, 0) != retrieval_document(RetrievalCorpus(seed=1), 0)
    filler = [len(re.sub(r"The [a-z ]+ is: \d+\.?|What is the [^?]+\?", "", retrieval_document(RetrievalCorpus(chars=(100, 100)), i)))
              for i in range(20)]
    assert min(filler) >= 100


def test_write_corpus_is_cached_and_atomic(tmp_path):
    path = tmp_path / "corpus.jsonl"
    spec = RetrievalCorpus(documents=3)
    write_corpus(path, spec)
    first = path.stat().st_mtime_ns
    write_corpus(path, spec)
    assert path.stat().st_mtime_ns == first  # same options: kept
    write_corpus(path, RetrievalCorpus(documents=4))
    assert len(path.read_text().splitlines()) == 4
    assert json.loads(path.read_text().splitlines()[0])["text"] == retrieval_document(RetrievalCorpus(documents=4), 0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("raw, words", [
    ({"retrieval": {"documents": 0}}, "documents is 0; input should be greater than or equal to 1"),
    ({"retrieval": {"documents": 10**30}}, "less than or equal to 10000000"),
    ({"retrieval": {"asks": "x"}}, "asks is 'x'"),
    ({"retrieval": {"facts": [1, None]}}, r"facts\[1\]: input should be a valid integer"),
    ({"copy": {"span": [1]}}, r"span is \[1\]"),
    ({"retrieval": {"chars": [500, 100]}}, "out of range"),
    ({"retrieval": {"colour": 1}}, "unknown option"),
    ({"haystack": {}}, "known: retrieval"),
    ("retrieval", "give one generator"),
])
def test_bad_synthetic_options_are_one_line(raw, words):
    with pytest.raises(ConfigError, match=words) as info:
        corpus_spec(raw)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        DataConfig(synthetic=raw)


def test_data_takes_a_path_or_a_generated_corpus_not_both():
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        DataConfig(path="x", synthetic={"retrieval": {}})
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        DataConfig()


def test_answer_only_loss_learns_each_answer_and_nothing_else():
    from trainer.data import build_dataset
    from trainer.tokenizer import byte_tokenizer

    raw = {"retrieval": {"documents": 40, "chars": [20, 200], "facts": [1, 2], "asks": [1, 2], "loss": "answers"}}
    cfg = DataConfig(synthetic=raw, upsample_long=False)
    ds = build_dataset(cfg, byte_tokenizer(), seq_len=256)
    tok = byte_tokenizer()
    texts = "".join(retrieval_document(corpus_spec(raw), i) for i in range(40))
    answers = re.findall(r"\? The [a-z ]+ is:( \d{8})\n", texts)
    learned = 0
    for i in range(len(ds)):
        sample = ds[i]
        ids, labels = sample["input_ids"], sample["labels"]
        keep = labels != -100
        learned += int(keep.sum())
        # Every learned label is a digit or the space before a number; its input ends a question or is the answer so far.
        assert set(tok.decode(labels[keep].tolist())) <= set(" 0123456789")
        for p in keep.nonzero().flatten().tolist():
            assert p == 0 or tok.decode(ids[max(0, p - 2):p + 1].tolist()).endswith("is:") or labels[p - 1] == ids[p]
    assert 0.8 * 9 * len(answers) <= learned <= 9 * len(answers)  # packing drops at most a sample's tail
    full = build_dataset(DataConfig(synthetic={"retrieval": {**raw["retrieval"], "loss": "all"}}, upsample_long=False), tok, seq_len=256)
    assert (full[0]["labels"] != -100).all() and full[0]["input_ids"].tolist() == ds[0]["input_ids"].tolist()


def test_copy_drills_repeat_a_span_and_learn_only_its_predictable_digits():
    from trainer.data.synthetic import CopyDrills

    spec = corpus_spec({"copy": {"documents": 50, "length": 32, "span": 8}})
    assert isinstance(spec, CopyDrills)
    for doc in synthetic_documents({"copy": {"documents": 50, "length": 32, "span": 8}}):
        text = "".join(t for t, _ in doc)
        assert len(text) == 32 and text.isdigit()
        (before, _), (learned, flag), _ = doc
        assert flag and len(learned) == 7
        start = len(before) - 1  # the repeat starts with the last digit of the unlearned prefix
        assert start >= 16 and text[start:start + 8] in text[:16]
    with pytest.raises(ConfigError, match="data.synthetic.copy"):
        corpus_spec({"copy": {"length": 10, "span": 8}})
