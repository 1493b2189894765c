"""Mixtures of texts: ``data.train`` and ``--calib`` as weighted texts (``self``: the teacher's own samples)."""

import re

import pytest
import torch
from conftest import byte_tokenizer

from rehead import text
from rehead.errors import ReheadError
from rehead.provenance import Provenance
from rehead.text import mixture, pack
from rehead.tune import load, tune
from rehead.tune.data import PackedBlocks, StreamedBlocks

BASE = {"model": "m", "output_dir": "o", "train.max_steps": 3}


@pytest.fixture
def letters(tmp_path):
    """Two texts whose blocks tell where they came from: one all 'a', one all 'b'."""
    (tmp_path / "a.txt").write_text("a" * 400)
    (tmp_path / "b.txt").write_text("b" * 400)
    return str(tmp_path / "a.txt"), str(tmp_path / "b.txt")


def origin(block: torch.Tensor) -> str:
    return byte_tokenizer().decode(block[:1])


def test_the_forms_of_a_mixture():
    assert mixture("shakespeare") == [("shakespeare", 1.0)]
    assert mixture("shakespeare, pydoc") == mixture(["shakespeare", "pydoc"]) == [("shakespeare", 1.0), ("pydoc", 1.0)]
    assert mixture({"shakespeare": 2, "self": 0.5}) == [("shakespeare", 2.0), ("self", 0.5)]


def test_one_syntax_gives_weights_in_a_string_too():
    assert mixture("shakespeare=2, self=0.5") == mixture(["shakespeare=2", "self=0.5"]) == [("shakespeare", 2.0),
                                                                                            ("self", 0.5)]
    assert mixture("shakespeare=2,pydoc") == [("shakespeare", 2.0), ("pydoc", 1.0)]  # no weight: 1
    assert mixture("runs/a=b.txt") == [("runs/a=b.txt", 1.0)]  # what follows '=' is no number: part of the name
    assert load(None, [], {**BASE, "data.train": "shakespeare=3,pydoc"}).data.train == "shakespeare=3,pydoc"


@pytest.mark.parametrize("calib, message", [
    ("shakespeare=-1", "--calib 'shakespeare=-1': the weight of 'shakespeare' is -1; weights must be 0 or more"),
    ("shakespeare=0,pydoc=0", "--calib 'shakespeare=0,pydoc=0': the weights sum to 0"),
    ("=2", "--calib '=2': an entry of '=2' names no text"),
    (" , ", "--calib ' , ': names no text"),
])
def test_a_calibration_mixture_is_checked_as_the_options_are(calib, message):
    from rehead.convert import options_for

    assert options_for({"to": "moh", "calib": "shakespeare=2,pydoc"}).calib == "shakespeare=2,pydoc"
    with pytest.raises(ReheadError, match=re.escape(message)):
        options_for({"to": "moh", "calib": calib})


def test_weights_share_the_calibration_tokens_and_the_training_blocks(letters):
    a, b = letters
    tok = byte_tokenizer()
    ids = text.token_ids(tok, f"{a}=2,{b}", 10)
    assert [tok.decode(i) for i in ids] == ["a"] * 7 + ["b"] * 3  # 6.67 and 3.33: the remainder to the first
    assert torch.equal(text.token_ids(tok, f"{a}=1,{b}=1", 9), text.token_ids(tok, f"{a},{b}", 9))
    assert torch.equal(pack(tok, f"{a}=3,{b}", 8, 10), pack(tok, {a: 3.0, b: 1.0}, 8, 10))
    assert [origin(x) for x in pack(tok, f"{a}=3,{b}", 8, 10)] == ["a"] * 8 + ["b"] * 2


@pytest.mark.parametrize("train, message", [
    ({"shakespeare": 0, "pydoc": 0}, r"data\.train: the weights sum to 0; give at least one positive weight"),
    ({"shakespeare": 1, "pydoc": -1}, r"data\.train: the weight of 'pydoc' is -1; weights must be 0 or more"),
    ({}, r"data\.train: names no text"),
    (["shakespeare,pydoc"], r"data\.train: 'shakespeare,pydoc': give each text of a mixture its own entry"),
])
def test_a_mixture_that_cannot_be_drawn_from_is_refused_with_its_key(train, message):
    with pytest.raises(ReheadError, match=message):
        load(None, [], {**BASE, "data.train": train})


def test_self_needs_a_teacher():
    with pytest.raises(ReheadError, match="data.train: 'self' is text sampled from the teacher; give a teacher"):
        load(None, [], {**BASE, "data.train": {"shakespeare": 1, "self": 1}})
    assert load(None, [], {**BASE, "teacher": "t", "data.train": {"shakespeare": 1, "self": 1}}).teacher == "t"


def test_blocks_are_drawn_in_proportion_to_the_weights(letters):
    a, b = letters
    blocks = pack(byte_tokenizer(), {a: 3.0, b: 1.0}, 8, 10)
    assert [origin(x) for x in blocks] == ["a"] * 8 + ["b"] * 2  # 7.5 and 2.5: the remainder to the first
    assert [origin(x) for x in pack(byte_tokenizer(), {a: 1.0, b: 0.0}, 8, 4)] == ["a"] * 4
    # a text shorter than its share is repeated: 400 bytes + EOS hold 50 blocks of 8
    many = pack(byte_tokenizer(), {a: 1.0, b: 1.0}, 8, 200)
    assert [origin(x) for x in many].count("b") == 100


def test_the_batch_of_a_step_is_a_function_of_seed_and_step(letters):
    a, b = letters
    blocks = pack(byte_tokenizer(), {a: 1.0, b: 1.0}, 8, 16)
    runs = [PackedBlocks(blocks, seed=3, micro_batch=4, grad_accum=1, world=1) for _ in range(2)]
    later = [runs[0].micro_batches(s, 0)[0] for s in range(4)]
    assert torch.equal(runs[1].micro_batches(3, 0)[0], later[3])  # step 3 without steps 0-2
    assert sorted(origin(x) for batch in later for x in batch) == ["a"] * 8 + ["b"] * 8  # one epoch, mixed
    assert {origin(x) for x in later[0]} == {"a", "b"}


def test_a_streamed_mixture_mixes_and_resumes(letters):
    tok = byte_tokenizer()
    a, b = letters

    def stream():
        return StreamedBlocks(tok, {a: 1, b: 3}, 8, seed=1, buffer=4, micro_batch=4, grad_accum=1, world=1)

    whole = stream()
    straight = [whole.micro_batches(s, 0)[0] for s in range(6)]
    resumed = stream()
    assert all(torch.equal(x, y) for x, y in zip(straight[4:], [resumed.micro_batches(s, 0)[0] for s in (4, 5)]))
    drawn = [origin(x) for batch in straight for x in batch]
    assert 2 <= drawn.count("a") <= 10 and drawn.count("a") + drawn.count("b") == 24


def test_tuning_on_a_mixture_with_the_teachers_own_text(tiny, tmp_path, calib_file, monkeypatch):
    monkeypatch.setenv("REHEAD_CACHE", str(tmp_path / "cache"))
    src = tiny("gqa")
    r = load(None, [], {"model": str(src), "teacher": str(src), "data.train": {str(calib_file): 1, "self": 1},
                        "data.eval": str(calib_file), "data.seq_len": 64, "data.eval_tokens": 256,
                        "train.max_steps": 2, "train.micro_batch": 2, "loss.kd": 1.0,
                        "output_dir": str(tmp_path / "run")})
    result = tune(r)
    assert list((tmp_path / "cache" / "sampled").glob("*/batch-00000.json"))  # the teacher was sampled
    assert Provenance.load(result.model).tune.recipe["data"]["train"] == {str(calib_file): 1.0, "self": 1.0}


def test_the_cpu_recipes_tune_on_a_mixture_with_the_teachers_text():
    for layout in ("moh", "dha", "gda"):
        r = load(f"smollm2-135m-{layout}")
        assert dict(mixture(r.data.train)) == {"shakespeare": 1.0, "pydoc": 1.0, "self": 1.0} and r.teacher
