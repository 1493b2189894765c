"""``self``: text sampled from the source model, seeded, cached, and usable as any text spec."""

from types import SimpleNamespace

import pytest
import torch
from conftest import byte_tokenizer, read_json

from rehead import text
from rehead.convert import convert
from rehead.errors import ReheadError
from rehead.sampled import Sampler


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REHEAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def sampler(src, **kwargs) -> Sampler:
    return Sampler(src, byte_tokenizer(), **{"batch_size": 4, "max_len": 24, **kwargs})


def test_sampling_is_a_function_of_the_seed(tiny, tmp_path, monkeypatch):
    src = tiny("gqa")
    first = sampler(src).batch(0) + sampler(src).batch(1)
    monkeypatch.setenv("REHEAD_CACHE", str(tmp_path / "another-cache"))
    again = sampler(src).batch(0) + sampler(src).batch(1)
    assert first == again and len(first) == 8 and all(first)
    assert first[:4] != first[4:]  # each batch has its own generator
    assert sampler(src, seed=1).batch(0) != first[:4]
    assert sampler(src, temperature=0.5).batch(0) != first[:4]


def test_a_second_call_reads_the_cache(tiny, monkeypatch, cache):
    src = tiny("gqa")
    drawn = sampler(src).batch(0)
    assert (cache / "sampled" / sampler(src).key() / "batch-00000.json").is_file()

    def no_sampling(self, b):
        raise AssertionError("sampled again")

    monkeypatch.setattr(Sampler, "sample", no_sampling)
    assert sampler(src).batch(0) == drawn
    assert sampler(src).key() != sampler(src, max_len=25).key()  # the settings are part of the key
    with pytest.raises(AssertionError, match="sampled again"):
        sampler(src, max_len=25).batch(0)


def test_the_source_weights_are_part_of_the_key(tiny):
    assert sampler(tiny("gqa", seed=0)).key() != sampler(tiny("gqa", seed=1)).key()


def test_samples_start_from_bos_or_else_eos_and_end_at_eos(tiny):
    tok = byte_tokenizer()  # an EOS and no BOS, as GPT-2's tokenizer
    assert sampler(tiny("gqa")).start_and_end() == (tok.eos_token_id, tok.eos_token_id)
    with_bos = SimpleNamespace(bos_token_id=7, eos_token_id=9)
    assert Sampler(tiny("gqa"), with_bos).start_and_end() == (7, 9)
    s = sampler(tiny("gqa"), max_len=400)
    assert all(tok.eos_token_id not in ids for ids in s.sample(0))


def test_a_tokenizer_without_bos_or_eos_is_refused_with_what_to_do(tiny):
    bare = SimpleNamespace(bos_token_id=None, eos_token_id=None)
    with pytest.raises(ReheadError, match="neither a BOS nor an EOS token.*give a text instead"):
        Sampler(tiny("gqa"), bare)


def test_combined_specs_share_the_budget(tiny, calib_file):
    s = sampler(tiny("gqa"))
    tok = byte_tokenizer()
    ids = text.token_ids(tok, f"self,{calib_file}", 101, s)
    assert torch.equal(ids[:51], text.token_ids(tok, "self", 51, s))
    assert torch.equal(ids[51:], text.token_ids(tok, str(calib_file), 50))


def test_convert_calibrates_on_self(tiny, tmp_path, calib_file, cache):
    src = tiny("odd")
    out = convert(src, tmp_path / "dha", to="dha", kv_budget=0.5, calib="self,pydoc", calib_tokens=512,
                  calib_seq_len=128)
    record = read_json(out / "rehead.json")
    assert record["calibration"]["text"] == "self,pydoc" and record["options"]["calib_seed"] == 0
    samples = list((cache / "sampled").glob("*/batch-*.json"))
    assert samples
    again = convert(src, tmp_path / "dha2", to="dha", kv_budget=0.5, calib="self,pydoc", calib_tokens=512,
                    calib_seq_len=128)
    assert read_json(again / "rehead.json")["calibration"]["sha256"] == record["calibration"]["sha256"]
    other = convert(src, tmp_path / "dha3", to="dha", kv_budget=0.5, calib="self,pydoc", calib_tokens=512,
                    calib_seq_len=128, calib_seed=1)
    assert read_json(other / "rehead.json")["calibration"]["sha256"] != record["calibration"]["sha256"]
