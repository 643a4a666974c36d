"""Needle in a haystack: the grid, the prompts, the scorer, a real tiny model on one process and on a ring of 2."""

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
import torch

from launcher.cli import main
from trainer.config import ModelConfig
from trainer.model.llama import build_model
from trainer.niah.evaluate import NiahConfig, run_niah, score_answer
from trainer.niah.plot import score_grid
from trainer.niah.prompts import PromptBuilder, load_haystack, needle_number
from trainer.tokenizer import byte_tokenizer

HAYSTACK = Path(__file__).parent / "data" / "haystack"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8}
GRID = ["--min-len", "256", "--max-len", "1024", "--len-interval", "384", "--depth-interval", "0.5",
        "--haystack", str(HAYSTACK)]


def test_default_grid_is_the_recipe_evaluation():
    cfg = NiahConfig()
    assert cfg.lengths()[:3] == [100, 260_100, 520_100] and cfg.lengths()[-2:] == [4_160_100, 4_194_200]
    assert len(cfg.lengths()) == 18
    assert cfg.depths() == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert NiahConfig(depth_interval=0.3).depths() == [0.0, 0.3, 0.6, 0.9, 1.0]
    recipe_like = NiahConfig.from_dict({"max_len": 4096, "haystack": "essays"}, base_dir="/recipes")
    assert recipe_like.haystack == "/recipes/essays" and recipe_like.min_len == 100


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(byte_tokenizer(), load_haystack(HAYSTACK), digits=8, seed=0)


@pytest.mark.parametrize("length", [256, 3000, 12000])  # 12000 bytes repeats the 4.4 KB haystack
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_has_the_length_the_needle_at_its_depth_and_the_answer_last(builder, length, depth):
    prompt = builder.build(length, depth)
    ids, answer, tok = prompt.ids, prompt.answer, builder.tokenizer
    assert len(ids) == length and ids[0] == tok.bos_token_id
    assert len(prompt.number) == 8 and prompt.number == builder.build(length, depth).number
    assert tok.decode(answer) == f" {prompt.number}" and ids[-len(answer):] == answer
    text = tok.decode(ids[prompt.needle_at:])
    assert text.startswith(f" The special magic number is: {prompt.number}.")
    haystack_len = length - builder.fixed_tokens(prompt.number)
    hay_before = prompt.needle_at - 1
    assert depth * haystack_len - 200 <= hay_before <= depth * haystack_len  # backed up to a sentence start
    if 0 < hay_before < haystack_len:
        assert tok.decode(ids[prompt.needle_at - 1:prompt.needle_at]) in ".!?"


def test_numbers_differ_between_cells(builder):
    numbers = {builder.build(n, d).number for n in (256, 640, 1024) for d in (0.0, 0.5, 1.0)}
    assert len(numbers) == 9


def test_scorer_on_logits_known_right_and_known_wrong():
    answer = [5, 9, 2, 7]
    right = torch.nn.functional.one_hot(torch.tensor(answer), 12).float()
    assert score_answer(right, answer) == (True, 4)
    one_off = right.clone()
    one_off[2] = torch.nn.functional.one_hot(torch.tensor(3), 12).float()
    assert score_answer(one_off, answer) == (False, 3)
    assert score_answer(torch.tensor([1, 1, 1, 1]), answer) == (False, 0)
    with pytest.raises(ValueError):
        score_answer(right[:3], answer)


class NeedleOracle(torch.nn.Module):
    """A stand-in LM that reads the next token off its own input: right by construction, except
    in prompts whose needle holds one of ``miss`` (numbers), where every prediction is off by one."""

    def __init__(self, vocab: int, miss: set[str]):
        super().__init__()
        self.vocab, self.miss = vocab, miss
        self.tok = byte_tokenizer()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(_attn_implementation="sdpa")
        self.needle = self.tok(" The special magic number is:", add_special_tokens=False)["input_ids"]

    @property
    def base_model(self):
        return self

    def get_output_embeddings(self):
        return torch.nn.Identity()

    def forward(self, input_ids, position_ids, use_cache=False):
        ids = input_ids[0].tolist()
        at = next(i for i in range(len(ids)) if ids[i:i + len(self.needle)] == self.needle) + len(self.needle)
        shift = 1 if self.tok.decode(ids[at:at + 9]).strip() in self.miss else 0
        nxt = torch.tensor(ids[1:] + [0])
        hidden = torch.nn.functional.one_hot((nxt + shift) % self.vocab, self.vocab).float()
        return SimpleNamespace(last_hidden_state=hidden[None])


def test_scores_follow_known_right_and_wrong_depths(tmp_path):
    tok = byte_tokenizer()
    cfg = NiahConfig(min_len=300, max_len=1100, len_interval=400, depth_interval=0.25, haystack=str(HAYSTACK))
    deep = {needle_number(cfg.seed, n, d, cfg.digits) for n in (300, 700, 1100) for d in (0.75, 1.0)}
    result = run_niah(NeedleOracle(len(tok), miss=deep), tok, cfg, out_dir=tmp_path, model_name="oracle")
    assert [c.length for c in result.cells[::5]] == [300, 700, 1100]
    for c in result.cells:
        answer = tok(f" {c.number}", add_special_tokens=False)["input_ids"]
        assert c.correct == (c.depth <= 0.5) and c.tokens_correct == (9 if c.correct else 0), (c.length, c.depth)
        assert c.predicted == tok.decode(answer if c.correct else [t + 1 for t in answer])
    assert result.average == pytest.approx(9 / 15)
    lengths, depths, grid = score_grid(result.cells)
    assert grid.tolist() == [[1.0] * 3] * 3 + [[0.0] * 3] * 2
    saved = json.loads((tmp_path / "niah.json").read_text())
    assert saved["average"] == pytest.approx(0.6) and len(saved["cells"]) == 15
    assert matplotlib.image.imread(tmp_path / "niah.png").shape[2] in (3, 4)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = byte_tokenizer()
    model = build_model(ModelConfig(tiny=TINY), rope_theta=10_000.0, seq_len=1024, tokenizer=tok, seed=1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.timeout(180)
def test_tiny_model_one_process_and_ring_of_two_score_the_same(tiny_model_dir, tmp_path, capsys):
    assert main(["niah", str(tiny_model_dir), *GRID, "-o", str(tmp_path / "one")]) == 0
    printed = capsys.readouterr().out
    assert main(["niah", str(tiny_model_dir), *GRID, "--ring", "2", "--shard-above", "300", "-o", str(tmp_path / "ring")]) == 0
    one = json.loads((tmp_path / "one" / "niah.json").read_text())
    ring = json.loads((tmp_path / "ring" / "niah.json").read_text())
    assert ring["ring"] == 2 and [c["sharded"] for c in ring["cells"]] == [False] * 3 + [True] * 6
    assert not any(c["sharded"] for c in one["cells"])
    keys = ("length", "depth", "number", "correct", "tokens_correct", "predicted")
    assert [[c[k] for k in keys] for c in one["cells"]] == [[c[k] for k in keys] for c in ring["cells"]]
    assert one["average"] == sum(c["correct"] for c in one["cells"]) / 9 < 0.2  # random weights: near 0, as reported
    assert "average:" in printed and f"{one['average']:.1%}" in printed
    for run in ("one", "ring"):
        assert matplotlib.image.imread(tmp_path / run / "niah.png").ndim == 3


@pytest.mark.parametrize("args, message", [
    (["--haystack", "EMPTY"], "has no text"),
    (["--depth-interval", "1.5"], "outside (0, 1]"),
    (["--depth-interval", "-0.2"], "outside (0, 1]"),
    (["--max-len", "50", "--min-len", "100"], "below min length"),
    (["--min-len", "20", "--max-len", "400", "--haystack", str(HAYSTACK)], "cannot hold the needle"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    assert main(["niah", str(tiny_model_dir), "-o", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ringleader: error: niah:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()
