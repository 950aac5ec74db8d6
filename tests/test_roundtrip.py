"""The round-trip exceptions of a float32 delta (readapt.roundtrip): stored beside Δ in a safetensors file,
streamed both ways, so their number does not grow the manifest or the memory; old manifests still read."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import readapt
from readapt.checkpoint import Checkpoint
from readapt.cli import main
from readapt.errors import ReadaptError
from tests.tiny import read_all, save_tiny


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _near_zero(base, dst, factor=1e-6):
    """A "tuned" model whose every float is base·factor: fp32(Θ) − fp32(Φ) is inexact almost everywhere."""
    dst.mkdir()
    for f in base.iterdir():
        if f.suffix == ".safetensors":
            save_file({n: (t.float() * factor).to(t.dtype) for n, t in load_file(f).items()}, dst / f.name,
                      metadata={"format": "pt"})
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture
def adversarial(tmp_path, monkeypatch):
    """Every element an exception, and blocks of 7 elements so that each tensor spans many of them."""
    import readapt.checkpoint.reader as reader

    monkeypatch.setattr(reader, "BLOCK", 7)
    base = save_tiny(tmp_path / "base", "llama", dtype=torch.bfloat16)
    tuned = _near_zero(base, tmp_path / "tuned")
    return base, tuned, readapt.extract(base, tuned, tmp_path / "d")


def test_every_element_an_exception_stays_out_of_the_manifest_and_round_trips(tmp_path, adversarial):
    base, tuned, delta = adversarial
    manifest = json.loads((delta / "readapt_delta.json").read_text())
    want, B = read_all(tuned), read_all(base)
    total = sum(t.numel() for t in want.values())
    assert manifest["exact"]["elements"] > 0.9 * total  # really the adversarial case
    assert manifest["exact"]["file"] == "readapt_exact.safetensors"
    assert (delta / "readapt_delta.json").stat().st_size < 20_000  # counts per tensor, not the values
    side = load_file(delta / "readapt_exact.safetensors")
    assert sum(v.numel() for k, v in side.items() if k.startswith("index:")) == manifest["exact"]["elements"]
    assert set(Checkpoint.open(delta).names) == set(want)  # the side file is not read as part of Δ
    got = read_all(readapt.merge(base, tmp_path / "m1", [(delta, 1.0)]))
    assert all(torch.equal(_bits(got[n]), _bits(want[n])) for n in want)
    half = read_all(readapt.merge(base, tmp_path / "mh", [(delta, 0.5)]))
    for n in want:
        assert torch.equal(half[n], torch.lerp(B[n].float(), want[n].float(), 0.5).to(half[n].dtype)), n
    readapt.compress(delta, tmp_path / "c", rank=1)
    norm = load_file(tmp_path / "c" / "adapter_model.safetensors")["base_model.model.model.norm.weight"]
    assert torch.equal(_bits(norm), _bits(want["model.norm.weight"]))


def test_manifest_lists_of_older_delta_folders_still_round_trip(tmp_path, adversarial):
    base, tuned, delta = adversarial
    manifest = json.loads((delta / "readapt_delta.json").read_text())
    side = load_file(delta / "readapt_exact.safetensors")
    manifest["exact"]["tensors"] = {n: {"index": side[f"index:{n}"].tolist(), "tuned": side[f"tuned:{n}"].tolist()}
                                    for n in manifest["exact"]["tensors"]}
    del manifest["exact"]["file"]
    (delta / "readapt_delta.json").write_text(json.dumps(manifest))
    (delta / "readapt_exact.safetensors").unlink()
    got, want = read_all(readapt.merge(base, tmp_path / "m", [(delta, 1.0)])), read_all(tuned)
    assert all(torch.equal(_bits(got[n]), _bits(want[n])) for n in want)


@pytest.mark.parametrize("fault", ["unsorted", "out_of_range", "int32", "missing"])
def test_a_corrupt_side_file_is_one_line_and_nothing_is_written(tmp_path, adversarial, capsys, fault):
    base, _, delta = adversarial
    side_path = delta / "readapt_exact.safetensors"
    side = load_file(side_path)
    key = next(k for k in side if k.startswith("index:"))
    if fault == "unsorted":
        side[key] = side[key].flip(0)
    elif fault == "out_of_range":
        side[key] = side[key] + 10**9
    elif fault == "int32":
        side[key] = side[key].to(torch.int32)
    if fault == "missing":
        side_path.unlink()
    else:
        save_file(side, side_path)
    with pytest.raises(ReadaptError, match="readapt_exact.safetensors"):
        readapt.merge(base, tmp_path / "m", [(delta, 1.0)])
    assert main(["merge", str(base), "--add", f"{delta}:1", "-o", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "readapt_exact.safetensors" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "m").exists() and not (tmp_path / "m2").exists()
