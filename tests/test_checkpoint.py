"""The streaming reader/writer, atomic output folders and model resolution (readapt.checkpoint)."""

import contextlib
import json
import os
import re
import signal
import struct
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

from readapt.checkpoint import (MAX_HEADER, Checkpoint, output_folder, parse_size, read_header, resolve_model,
                                write_file, write_tensors)
from readapt.errors import ReadaptError
from tests.tiny import save_tiny


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
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size(".5KB") == 500
    for bad in ("five", "1.2.3GB", "9" * 400 + "TB", "0", "-5GB", "nanGB", "infGB", "1e3"):
        with pytest.raises(ReadaptError, match="cannot read size"):
            parse_size(bad)


# --- hostile and broken inputs -----------------------------------------------------------------------

@contextlib.contextmanager
def _no_hang(seconds=60):
    """Fail (instead of blocking the suite forever) if the block waits on something that never comes."""
    def stop(*_):
        raise TimeoutError("blocked: the reader waited on a FIFO")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _raw(path, header: bytes | str, data: bytes = b"", pad: bool = True):
    """A safetensors file with exactly this header text and data section."""
    header = header.encode() if isinstance(header, str) else header
    header += b" " * (-len(header) % 8 if pad else 0)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _entry(name, dtype="F32", shape="[2,2]", offsets="[0,16]"):
    return f'"{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}'


def _sharded(path):
    m = save_tiny(path, max_shard_size="10KB")
    index = json.loads((m / "model.safetensors.index.json").read_text())
    return m, index


def test_index_shards_confined_to_the_folder(tmp_path):
    victim = save_tiny(tmp_path / "victim", seed=5)
    m, index = _sharded(tmp_path / "m")
    name = next(iter(index["weight_map"]))
    for bad in ("../victim/model.safetensors", str(victim / "model.safetensors")):
        index["weight_map"][name] = bad
        (m / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ReadaptError, match="lies outside the checkpoint folder"):
            Checkpoint.open(m)
    os.symlink(victim / "model.safetensors", tmp_path / "link.safetensors")
    os.symlink(tmp_path / "link.safetensors", m / "linked.safetensors")  # a link to a link out of the folder
    index["weight_map"][name] = "linked.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ReadaptError, match="lies outside"):
        Checkpoint.open(m)
    single = save_tiny(tmp_path / "single")
    (single / "model.safetensors").unlink()
    os.symlink(victim / "model.safetensors", single / "model.safetensors")
    with pytest.raises(ReadaptError, match="lies outside"):
        Checkpoint.open(single)


def test_hub_snapshot_links_into_blobs_and_guards_them(tmp_path, monkeypatch):
    """A Hugging Face cache snapshot's files link into the repo's blobs/: allowed, and an output equal to
    (or containing) that blobs/ folder is refused although it is not the folder passed."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    src = save_tiny(tmp_path / "src", max_shard_size="10KB")
    snap = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (repo / "blobs" / f.name).write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/{f.name}", snap / f.name)
    ck = Checkpoint.open(snap)
    assert ck.names == Checkpoint.open(src).names and all(ck.read(n).equal(Checkpoint.open(src).read(n)) for n in ck.names)
    for out in (repo / "blobs", repo, repo / "blobs" / "x"):
        with pytest.raises(ReadaptError, match="overlaps the input"):
            with output_folder(out, overwrite=True, inputs=[snap]):
                pass
    assert len(list((repo / "blobs").iterdir())) == len(list(src.iterdir()))


@pytest.mark.parametrize("kind", ["fifo", "folder", "dangling", "fifo-shard", "fifo-config"])
def test_non_regular_weight_files_refused_without_hanging(tmp_path, kind):
    m = save_tiny(tmp_path / "m", max_shard_size="10KB" if kind == "fifo-shard" else "50GB")
    shards = sorted(m.glob("model-*.safetensors"))
    target = shards[0] if kind == "fifo-shard" else m / ("config.json" if kind == "fifo-config" else "model.safetensors")
    target.unlink()
    if kind.startswith("fifo"):
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        os.symlink("gone.bin", target)  # inside the folder, to nothing
    with _no_hang(), pytest.raises(ReadaptError, match=target.name) as err:
        Checkpoint.open(m)
    assert {"fifo": "FIFO", "folder": "folder", "dangling": "broken link"}.get(kind.split("-")[0]) in str(err.value)


def test_header_too_large_is_named_with_its_size_and_the_cap(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", MAX_HEADER + 1) + b"{" + b" " * 64)
    with pytest.raises(ReadaptError, match=f"header too large \\({MAX_HEADER + 1} bytes; the cap is {MAX_HEADER}"):
        read_header(f)


def test_header_parsed_in_memory_proportional_to_it(tmp_path):
    """Peak Python memory while parsing a header of 20k one-element tensors, relative to the header's
    size: the former json.loads-then-convert parser peaked at 12x, member-by-member parsing at under 6x."""
    n = 20_000
    header = "{" + ",".join(_entry(f"t{i:06d}", shape="[1]", offsets=f"[{4 * i},{4 * i + 4}]") for i in range(n)) + "}"
    f = _raw(tmp_path / "model.safetensors", header, b"\0" * (4 * n))
    tracemalloc.start()
    try:
        infos = read_header(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(infos) == n and peak < 8 * len(header), peak / len(header)


# every rule of the safetensors format: (header, data bytes, what readapt says, does safetensors refuse it)
FORMAT_RULES = {
    "negative dims": ("{" + _entry("a", shape="[-1,-4]") + "}", 16, "integers >= 0", True),
    "2**64 dim next to a 0": ("{" + _entry("a", shape=f"[{2**64},0]", offsets="[0,0]") + "}", 0, "integers >= 0", True),
    "dims overflow 64 bits": ("{" + _entry("a", shape=f"[{2**63},{2**63},0]", offsets="[0,0]") + "}", 0, "overflows", True),
    "float dim": ("{" + _entry("a", shape="[2.0,2]") + "}", 16, "integers >= 0", True),
    "bool dim": ("{" + _entry("a", shape="[true,4]") + "}", 16, "integers >= 0", True),
    "negative offset": ("{" + _entry("a", offsets="[-16,0]") + "}", 16, "integers >= 0", True),
    "three offsets": ("{" + _entry("a", offsets="[0,16,16]") + "}", 16, "two offsets", True),
    "span differs from shape": ("{" + _entry("a", offsets="[0,12]") + "}", 12, "spans 12 bytes", True),
    "duplicate tensor": ("{" + _entry("a") + "," + _entry("a", offsets="[16,32]") + "}", 32, "key 'a' appears twice", True),
    "duplicate field": ('{"a":{"dtype":"F16","dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}', 16,
                        "key 'dtype' appears twice", True),
    "gap": ("{" + _entry("a") + "," + _entry("b", offsets="[32,48]") + "}", 48, "gap of 16 bytes", True),
    "not from 0": ("{" + _entry("a", offsets="[4,20]") + "}", 20, "gap of 4 bytes", True),
    "overlap": ("{" + _entry("a") + "," + _entry("b", offsets="[8,24]") + "}", 24, "overlaps", True),
    "empty tensor inside another": ("{" + _entry("a") + "," + _entry("z", shape="[0]", offsets="[8,8]") + "}", 16,
                                    "overlaps", True),
    "trailing bytes": ("{" + _entry("a") + "}", 20, "trailing bytes", True),
    "truncated data": ("{" + _entry("a") + "}", 12, "truncated", True),
    "lone surrogate name": ("{" + _entry("\\ud800") + "}", 16, "not valid Unicode", True),
    "name not UTF-8": (b"{" + _entry("a\xff").encode("latin-1") + b"}", 16, "not UTF-8", True),
    "NaN": ("{" + _entry("a") + ',"b":NaN}', 16, "NaN", True),
    "metadata not strings": ('{"__metadata__":{"x":1},' + _entry("a") + "}", 16, "strings to strings", True),
    "list header": ("[1]", 0, "does not start with '{'", True),
    "entry not an object": ('{"a":[1,2]}', 0, "malformed header entry", True),
    "unknown dtype": ("{" + _entry("a", dtype="X9") + "}", 16, "has dtype 'X9'", True),
    # where readapt is stricter than the safetensors library, and why
    "leading space": (" {" + _entry("a") + "}", 16, "does not start with '{'", False),  # the spec: MUST begin with '{'
    "dtype readapt cannot hold": ("{" + _entry("a", dtype="U16", offsets="[0,8]") + "}", 8, "readapt reads", False),
    "dim torch cannot hold": ("{" + _entry("a", shape=f"[{2**64 - 1},0]", offsets="[0,0]") + "}", 0, "torch cannot", False),
}


@pytest.mark.parametrize("rule", FORMAT_RULES)
def test_safetensors_format_rules(tmp_path, rule):
    from safetensors import safe_open

    header, size, message, safetensors_refuses = FORMAT_RULES[rule]
    f = _raw(tmp_path / "model.safetensors", header, b"\0" * size)
    with pytest.raises(ReadaptError, match=re.escape(message)):
        read_header(f)
    try:
        with safe_open(f, "pt") as s:
            list(s.keys())
        refused = False
    except Exception:  # safetensors raises SafetensorError (and others for other faults)
        refused = True
    assert refused == safetensors_refuses


def test_valid_edge_cases_accepted_like_safetensors(tmp_path):
    from safetensors import safe_open

    header = "{" + ",".join([_entry("empty", shape="[0,3]", offsets="[0,0]"), _entry("scalar", shape="[]", offsets="[0,4]"),
                             _entry("end", shape="[0]", offsets="[4,4]"), '"__metadata__":{"format":"pt"}']) + "}"
    f = _raw(tmp_path / "model.safetensors", header, b"\0" * 4)
    infos = read_header(f)
    with safe_open(f, "pt") as s:
        assert sorted(s.keys()) == sorted(infos)
    assert infos["scalar"].shape == () and infos["empty"].shape == (0, 3)


# --- output folders: leftovers and races -------------------------------------------------------------


def test_stale_temporary_siblings_of_dead_runs_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a PID that has exited
    stale, old, alive = (tmp_path / f".out.readapt-tmp-{dead}", tmp_path / f".out.readapt-old-{dead}",
                         tmp_path / ".out.readapt-tmp-1")  # PID 1 always runs
    for d in (stale, old, alive):
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    with output_folder(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert sorted(os.listdir(tmp_path)) == [alive.name, "out"]


def test_second_interrupt_during_cleanup_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C pressed again while the temporary folder is being removed: ignored until it is gone."""
    import shutil

    import readapt.checkpoint.folders as ck

    real = shutil.rmtree

    def interrupted_rmtree(path, *a, **k):
        if os.path.isdir(path) and os.listdir(path):  # the cleanup of the job's temporary folder
            for f in os.listdir(path):
                os.unlink(os.path.join(path, f))
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, after the files, before the folder
        real(path, *a, **k)

    monkeypatch.setattr(ck.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        with output_folder(tmp_path / "out") as tmp:
            (tmp / "half.safetensors").write_bytes(b"x" * 100)
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored afterwards


def test_parent_folders_created_for_the_output_removed_on_failure(tmp_path):
    with pytest.raises(ReadaptError):
        with output_folder(tmp_path / "a" / "b" / "out"):
            raise ReadaptError("the job failed")
    assert os.listdir(tmp_path) == []
    (tmp_path / "keep").mkdir()
    with pytest.raises(ReadaptError):
        with output_folder(tmp_path / "keep" / "new" / "out"):
            raise ReadaptError("the job failed")
    assert os.listdir(tmp_path) == ["keep"] and os.listdir(tmp_path / "keep") == []
    with output_folder(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "x").write_text("1")
    assert os.listdir(tmp_path / "a" / "b") == ["out"]


def test_two_runs_writing_the_same_output_exclude_each_other(tmp_path):
    out = tmp_path / "out"
    with output_folder(out) as tmp:
        (tmp / "first").write_text("1")
        with pytest.raises(ReadaptError, match="another readapt run is writing"):
            with output_folder(out, overwrite=True):
                pass
    assert os.listdir(out) == ["first"] and sorted(os.listdir(tmp_path)) == ["out"]  # lock file removed
    with pytest.raises(ReadaptError, match="already exists"):  # the second run, started after the first ended
        with output_folder(out):
            pass


def test_longest_output_name_works(tmp_path):
    out = tmp_path / ("n" * 255)  # NAME_MAX on ext4: the temporary sibling's name must still fit
    with output_folder(out) as tmp:
        assert len(tmp.name) <= 255
        (tmp / "a").write_text("1")
    assert os.listdir(out) == ["a"] and os.listdir(tmp_path) == [out.name]
    with pytest.raises(ReadaptError, match="256 bytes long; the file system allows 255"):
        with output_folder(tmp_path / ("n" * 256)):
            pass


def test_os_errors_while_writing_are_one_line(tmp_path):
    import errno

    hints = {errno.ENOSPC: "the disk is full", errno.ENAMETOOLONG: "choose a shorter -o", errno.EACCES: "permission"}
    for code, hint in hints.items():
        with pytest.raises(ReadaptError) as err:
            with output_folder(tmp_path / "out") as tmp:
                raise OSError(code, os.strerror(code), str(tmp / "model.safetensors"))
        message = str(err.value)
        assert "model.safetensors" in message and "nothing was written" in message and hint in message
        assert "\n" not in message and os.listdir(tmp_path) == []


def test_parse_dtype_and_device_refuse_what_readapt_cannot_use():
    from readapt.numerics import parse_device, parse_dtype

    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype(None) is None
    for bad in ("float8_e4m3fn", "float8_e5m2", "int8", "bogus", 5):
        with pytest.raises(ReadaptError, match="use float32, bfloat16, float16 or float64"):
            parse_dtype(bad)
    assert parse_device(None) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ReadaptError, match="no CUDA GPU is visible"):
            parse_device("cuda")
    with pytest.raises(ReadaptError, match="not a torch device"):
        parse_device("gpu0")
