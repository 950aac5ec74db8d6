"""The streaming reader/writer, atomic output folders and model resolution (readapt.checkpoint)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from readapt.checkpoint import Checkpoint, output_folder, parse_size, resolve_model, write_file, write_tensors
from readapt.errors import ReadaptError
from tiny import save_tiny


def test_reader_matches_safetensors_for_single_and_sharded(tmp_path):
    one = save_tiny(tmp_path / "one", "qwen2", dtype=torch.bfloat16)
    many = save_tiny(tmp_path / "many", "qwen2", dtype=torch.bfloat16, max_shard_size="10KB")
    assert len(list(many.glob("*.safetensors"))) > 1 and (many / "model.safetensors.index.json").exists()
    ref = load_file(one / "model.safetensors")
    for folder in (one, many):
        ck = Checkpoint.open(folder)
        assert sorted(ck.names) == sorted(ref)
        for n in ck.names:
            t = ck.read(n)
            assert t.dtype == torch.bfloat16 and torch.equal(t, ref[n]), n


def test_writer_output_is_plain_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).bfloat16()}
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    files = write_tensors(tmp_path, plan, tensors.items(), max_shard_size=64)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": files[0].name, "b": files[1].name, "c": files[1].name}
    got = {**load_file(files[0]), **load_file(files[1])}
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    write_file(tmp_path / "one.safetensors", tensors.items())
    assert all(torch.equal(load_file(tmp_path / "one.safetensors")[n], t) for n, t in tensors.items())
    assert not list(tmp_path.glob("*.spool"))


def test_writer_refuses_non_finite(tmp_path):
    with pytest.raises(ReadaptError, match="'bad' has NaN/Inf"):
        write_tensors(tmp_path, [("bad", torch.float32, (2,))], [("bad", torch.tensor([1.0, float("inf")]))])


@pytest.mark.parametrize("damage", ["truncate", "garbage-header", "empty"])
def test_corrupt_safetensors_named(tmp_path, damage):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, f)
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage-header": data[:8] + b"{not json" + data[17:],
                   "empty": b""}[damage])
    with pytest.raises(ReadaptError, match="model.safetensors"):
        Checkpoint.open(tmp_path)


def test_index_pointing_to_missing_shard(tmp_path):
    m = save_tiny(tmp_path / "m", max_shard_size="10KB")
    victim = sorted(m.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ReadaptError, match=victim.name):
        Checkpoint.open(m)


def test_pickled_weights_refused_unless_opted_in(tmp_path):
    torch.save({"w": torch.randn(3, 3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ReadaptError, match="--allow-pickle"):
        Checkpoint.open(tmp_path)
    ck = Checkpoint.open(tmp_path, allow_pickle=True)
    assert ck.names == ["w"] and ck.read("w").shape == (3, 3)


def test_pickle_with_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"w": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ReadaptError, match="weights_only=True"):
        Checkpoint.open(tmp_path, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_output_folder_is_atomic(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with output_folder(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    with output_folder(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ReadaptError, match="already exists; pass --overwrite"):
        with output_folder(out):
            pass
    with output_folder(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(out)) == ["b"] and sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(ReadaptError, match="overlaps the input"):
        with output_folder(out / "inner", inputs=[out]):
            pass


def test_resolve_model_from_local_hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / "abc123"
    save_tiny(snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("acme/tiny", cache_dir=cache) == snap
    with pytest.raises(ReadaptError, match="local Hugging Face cache.*hf download acme/other"):
        resolve_model("acme/other", cache_dir=cache)
    with pytest.raises(ReadaptError, match="does not exist"):
        resolve_model("no_such_folder")


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 * 1024**3 and parse_size(123) == 123
    with pytest.raises(ReadaptError, match="five"):
        parse_size("five")
