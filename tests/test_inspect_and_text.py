"""rehead inspect, text specs, and the perplexity command."""

import json
import signal

import pytest
import torch
from conftest import byte_tokenizer

from rehead import text
from rehead.app.cli import main
from rehead.convert import convert
from rehead.describe import describe
from rehead.errors import ReheadError


def test_inspect_a_gqa_source(tiny, capsys):
    src = tiny("odd")  # 9 heads, 3 KV heads, head_dim 8, 2 layers
    info = describe(src)
    assert info["layout"] == "gqa" and info["query_heads"] == 9 and info["head_dim"] == 8
    assert info["key_heads_per_layer"] == [3, 3] and info["value_heads_per_layer"] == [3, 3]
    assert info["kv_cache_bytes_per_token_bf16"] == 2 * (3 + 3) * 8 * 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    before = signal.getsignal(signal.SIGTERM)
    assert main(["inspect", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == info
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's SIGTERM handler lasts only while it runs


def test_inspect_a_moh_conversion(tiny, tmp_path, capsys):
    out = convert(tiny("odd"), tmp_path / "moh", to="moh", active_heads=7, shared_heads=4, shared="first")
    info = describe(out)
    assert info["layout"] == "moh" and info["architecture"] == "MoHForCausalLM"
    assert info["options"]["active_heads"] == 7 and info["options"]["shared_heads_per_layer"] == [[0, 1, 2, 3]] * 2
    assert info["options"]["active_fraction"] == round(7 / 9, 4)
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layout                moh" in printed and "active heads          7" in printed
    assert "0,1,2,3 | 0,1,2,3" in printed and "KV cache / token      192 bytes (bf16)" in printed


def test_mha_conversion_shows_the_larger_kv_cache(tiny, tmp_path):
    src = tiny("odd")
    out = convert(src, tmp_path / "mha", to="mha")
    assert describe(out)["kv_cache_bytes_per_token_bf16"] == 3 * describe(src)["kv_cache_bytes_per_token_bf16"]


def test_text_files_and_tables(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n{"text": "third"}\n')
    assert list(text.documents(str(tmp_path))) == ["first document", "second", "third"]
    assert list(text.documents(f"{tmp_path / 'a.txt'},{tmp_path / 'a.txt'}")) == ["first document"] * 2


def test_token_blocks_join_documents_with_eos(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("de")
    tok = byte_tokenizer()
    ids = text.token_ids(tok, str(tmp_path), 7)
    assert ids.tolist() == tok("abc").input_ids + [tok.eos_token_id] + tok("de").input_ids + [tok.eos_token_id]
    blocks = text.blocks(tok, str(tmp_path), 7, 3)
    assert blocks.shape == (2, 3) and torch.equal(blocks.flatten(), ids[:6])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope.csvx", "not a built-in text"),
        ("some dataset with spaces", "not a built-in text"),
    ],
)
def test_bad_text_specs(spec, message):
    with pytest.raises(ReheadError, match=message):
        list(text.documents(spec))


def test_unknown_text_suffix(tmp_path):
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(ReheadError, match="unknown kind '.docx'"):
        list(text.documents(str(tmp_path / "x.docx")))


def test_missing_column(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"body": "second"}\n')
    with pytest.raises(ReheadError, match="no column 'text'; its columns are body"):
        list(text.documents(str(tmp_path / "b.jsonl")))


def test_pydoc_text_is_builtin():
    docs = list(text.documents("pydoc"))
    assert len(docs) > 50 and any("lambda" in d for d in docs)


def test_perplexity_command_compares_models(tiny, tmp_path, calib_file, capsys):
    src = tiny("gqa")
    mha = convert(src, tmp_path / "mha", to="mha")
    code = main(["perplexity", str(src), str(mha), "--text", str(calib_file), "--tokens", "256", "--seq-len", "64"])
    out = capsys.readouterr().out
    assert code == 0
    values = [float(line.split()[1]) for line in out.splitlines()[2:]]
    assert len(values) == 2 and values[0] == pytest.approx(values[1], rel=1e-5) and values[0] > 1


def test_perplexity_reports_every_heldout_kind_by_default(tiny, tmp_path, capsys):
    src = tiny("gqa")
    other = tiny("gqa", seed=1)
    assert main(["perplexity", str(src), str(other), "--tokens", "128", "--seq-len", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == list(text.HELDOUT_TEXTS)
    first, second = (line.split()[1:] for line in lines[2:4])
    assert len(first) == len(second) == 2 * len(text.HELDOUT_TEXTS)
    assert first[1::2] == ["×1.000"] * 3  # the first model is the reference of every column
    ratios = [float(second[2 * i]) / float(first[2 * i]) for i in range(3)]
    assert [r.removeprefix("×") for r in second[1::2]] == [f"{r:.3f}" for r in ratios]
    assert len(set(first[0::2])) == 3  # three texts, three different perplexities


def test_heldout_texts_are_disjoint_from_their_calibration_parts():
    from pydoc_data.topics import topics

    for name in ("shakespeare", "pydoc"):
        calibration, heldout = set(text.documents(name)), set(text.documents(f"{name}-heldout"))
        assert calibration and heldout and not calibration & heldout
    pydoc, pydoc_heldout = list(text.documents("pydoc")), list(text.documents("pydoc-heldout"))
    assert pydoc_heldout == [topics[k] for k in sorted(topics) if text.pydoc_heldout(k)]
    assert 0.1 < len(pydoc_heldout) / len(topics) < 0.4 and sum(map(len, pydoc)) > 3 * sum(map(len, pydoc_heldout))

    def paragraphs(docs):
        return {" ".join(p.split()) for doc in docs for p in doc.split("\n\n") if p.strip()}

    # topics repeat each other (compound holds for and class): the parts share no paragraph all the same
    assert paragraphs(topics.values()) == paragraphs(pydoc) | paragraphs(pydoc_heldout)
    assert not paragraphs(pydoc) & paragraphs(pydoc_heldout)
    source = text.python_source()
    assert source == text.python_source() and list(text.documents("python-source-heldout")) == source
    assert len(source) > 500 and sum("def " in piece for piece in source) > len(source) / 2
    assert all(len(piece) < text.SOURCE_PIECE + 2000 for piece in source)
    # pydoc_data (the pydoc text itself, as Python literals) is left out
    assert not any("Autogenerated by Sphinx" in piece for piece in source)


def test_self_text_needs_a_model():
    with pytest.raises(ReheadError, match="text 'self' is text sampled from the source model"):
        list(text.documents("self"))


def test_several_texts_share_the_token_budget(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 50)
    (tmp_path / "b.txt").write_text("b" * 50)
    tok = byte_tokenizer()
    ids = text.token_ids(tok, f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", 9)
    a, b = tok("a").input_ids[0], tok("b").input_ids[0]
    assert ids.tolist() == [a] * 5 + [b] * 4
