"""Checkpoint I/O: the streamed shard writer, the lazy reader, atomic output folders."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rehead.checkpoint import CheckpointReader, ShardWriter
from rehead.errors import ReheadError
from rehead.files import atomic_output


def sample_tensors():
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(33, 7),
        "b.bf16": torch.randn(5, 3).to(torch.bfloat16),
        "c.half": torch.randn(4).half(),
        "d.ids": torch.arange(10),
        "e.scalar": torch.tensor(3.5),
        "f.mask": torch.tensor([True, False]),
        "g.strided": torch.randn(6, 4).T,  # not contiguous
    }


def test_single_shard_round_trips_every_dtype(tmp_path):
    writer = ShardWriter(tmp_path)
    tensors = sample_tensors()
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    assert writer.finish() == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_shards_split_by_size_and_index_maps_every_tensor(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=1000)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(7)}  # 400 bytes each
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    names = writer.finish()
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 7 * 400
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / shard)[name], tensors[name])


def test_header_room_opens_a_new_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(ShardWriter, "HEADER_ROOM", 400)
    writer = ShardWriter(tmp_path)
    for i in range(12):
        writer.add(f"a_long_tensor_name_{i}", torch.zeros(2))
    names = writer.finish()
    assert len(names) > 1
    merged = {}
    for name in names:
        merged.update(load_file(tmp_path / name))
    assert len(merged) == 12


def test_a_tensor_written_twice_is_a_bug(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add("x", torch.zeros(1))
    with pytest.raises(ValueError, match="written twice"):
        writer.add("x", torch.zeros(1))


def test_reader_reads_one_shard_at_a_time(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    reader = CheckpointReader(tmp_path)
    assert reader.shapes() == {"a": (2,), "b": (3,)}
    assert torch.equal(reader.get("b"), torch.zeros(3)) and reader._open_name == "s2.safetensors"
    assert torch.equal(reader.get("a"), torch.ones(2)) and reader._open_name == "s1.safetensors"


def test_reader_refuses_an_index_with_missing_shards(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(ReheadError, match="missing: gone.safetensors"):
        CheckpointReader(tmp_path)


def test_reader_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(ReheadError, match="no model.safetensors"):
        CheckpointReader(tmp_path)


def test_atomic_output_keeps_the_old_folder_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_output_refuses_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ReheadError, match="--overwrite"):
        with atomic_output(tmp_path / "out"):
            pass


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_stored_tensors_are_copied_byte_for_byte(tmp_path, monkeypatch, kernel_copy):
    tensors = sample_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "src.safetensors")
    if not kernel_copy:
        def unsupported(*args):
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr("os.copy_file_range", unsupported)
    from rehead.checkpoint import _ShardFile

    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out)
    writer.add("first", torch.ones(3))
    for name in tensors:
        writer.add_stored(name, _ShardFile.locate_in(tmp_path / "src.safetensors", name))
    writer.add("last", torch.zeros(2))
    writer.finish()
    loaded = load_file(out / "model.safetensors")
    assert torch.equal(loaded["first"], torch.ones(3)) and torch.equal(loaded["last"], torch.zeros(2))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def test_hub_cache_blobs_are_named_by_their_hash(tmp_path):
    from rehead.checkpoint import sha256_file

    (tmp_path / "blobs").mkdir()
    name = "ab" * 32  # the Hub cache's name for an LFS blob is its sha256: it is trusted, not recomputed
    (tmp_path / "blobs" / name).write_bytes(b"weights")
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "blobs" / name)
    assert sha256_file(tmp_path / "model.safetensors") == name
    (tmp_path / "plain.bin").write_bytes(b"weights")
    assert sha256_file(tmp_path / "plain.bin") == "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"


def test_orphaned_partial_folders_of_dead_runs_are_removed(tmp_path):
    dead = tmp_path / ".out.partial-99999999-abc"  # no such process
    alive = tmp_path / f".out.partial-{__import__('os').getpid()}-def"  # a run still going
    dead.mkdir()
    alive.mkdir()
    with atomic_output(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not dead.exists() and alive.exists() and (tmp_path / "out" / "x").exists()
