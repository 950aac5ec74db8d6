"""merge's interference diagnostic (readapt.interference): per layer, cos(sᵢΨᵢ, sⱼΨⱼ) and ‖sᵢΨᵢ‖/‖Φ‖,
checked against the same figures computed directly from single-addend merges; it changes no merged bit."""

import json
import math
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import readapt
from readapt.cli import main
from readapt.interference import layer_of
from readapt.checkpoint import Blocks
from readapt.merging import iter_merged, load_merged, open_inputs
from tests.tiny import perturb, read_all, save_tiny


def _lora(base, out):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


def _whole(t):
    return torch.cat([b.clone() for b in t.blocks]).view(t.shape).to(t.dtype) if isinstance(t, Blocks) else t


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("interference")
    base = save_tiny(root / "base", "llama")
    inst = perturb(base, root / "inst", scale=0.05)
    delta = readapt.extract(base, inst, root / "delta")
    return root, base, delta, _lora(base, root / "lora")


def _direct(root, base, adds) -> dict:
    """The figures from the definition: sᵢΨᵢ = merge(Φ, only addend i at sᵢ) − Φ, summed per layer."""
    B = read_all(base)
    diffs = [{n: t - B[n] for n, t in read_all(readapt.merge(base, root / f"one{i}", [a])).items()}
             for i, a in enumerate(adds)]
    out = {}
    for n in B:
        touched = [d[n] for d in diffs if d[n].abs().max() > 0]
        if not touched:
            continue
        g = out.setdefault(layer_of(n), {"base": 0.0, "dot": torch.zeros(len(adds), len(adds), dtype=torch.float64)})
        g["base"] += float((B[n].double() ** 2).sum())
        for i in range(len(adds)):
            for j in range(len(adds)):
                g["dot"][i, j] += float((diffs[i][n].double() * diffs[j][n].double()).sum())
    return out


@pytest.mark.parametrize("scales", [(0.5, 0.5), (1.0, -0.7)])
def test_figures_equal_the_definition_and_no_bit_changes(tmp_path, world, scales):
    root, base, delta, lora = world
    adds = [(delta, scales[0]), (lora, scales[1])]
    out = readapt.merge(base, tmp_path / "m", adds)
    got = json.loads((out / "readapt_interference.json").read_text())
    want = _direct(tmp_path, base, adds)
    assert set(got["layers"]) == set(want) and len(want) >= 3
    for key, w in want.items():
        G = w["dot"]
        rel = [math.sqrt(G[i, i]) / math.sqrt(w["base"]) for i in range(2)]
        assert got["layers"][key]["rel"] == pytest.approx(rel, rel=1e-4), key
        if G[0, 0] > 0 and G[1, 1] > 0:
            cos = float(G[0, 1] / math.sqrt(G[0, 0] * G[1, 1]))
            assert got["layers"][key]["cos"]["1,2"] == pytest.approx(cos, rel=1e-3, abs=1e-6), key
        else:
            assert got["layers"][key]["cos"]["1,2"] is None
    assert any(v["cos"]["1,2"] is not None and abs(v["cos"]["1,2"]) > 1e-4 for v in got["layers"].values())
    # the diagnostic changes no bit: Ω computed without it is the same
    b, opened = open_inputs(base, adds)
    plain = {n: _whole(t) for n, t in iter_merged(b, opened)}
    assert all(torch.equal(plain[n], t) for n, t in read_all(out).items())
    assert "How the addends meet" in (out / "README.md").read_text()


def test_same_and_opposite_directions_give_plus_and_minus_one(tmp_path, world):
    root, base, delta, _ = world
    got = json.loads((readapt.merge(base, tmp_path / "m", [(delta, 0.3), (delta, -0.6)])
                      / "readapt_interference.json").read_text())
    assert got["overall"]["cos"]["1,2"] == pytest.approx(-1.0, abs=1e-5)
    assert got["overall"]["rel"][1] == pytest.approx(2 * got["overall"]["rel"][0], rel=1e-5)
    same = json.loads((readapt.merge(base, tmp_path / "s", [(delta, 0.3), (delta, 0.6)])
                       / "readapt_interference.json").read_text())
    assert all(v["cos"]["1,2"] == pytest.approx(1.0, abs=1e-5) for v in same["layers"].values())


def test_blocks_and_whole_tensors_agree(tmp_path, world, monkeypatch):
    import readapt.checkpoint.reader as reader

    root, base, delta, lora = world
    inst = root / "inst"
    whole = json.loads((readapt.merge(base, tmp_path / "w", [(delta, 0.5), (inst, 0.25)])
                        / "readapt_interference.json").read_text())
    monkeypatch.setattr(reader, "BLOCK", 7)
    blocks = json.loads((readapt.merge(base, tmp_path / "b", [(delta, 0.5), (inst, 0.25)])
                         / "readapt_interference.json").read_text())
    assert whole["overall"]["cos"]["1,2"] == pytest.approx(1.0, abs=1e-5)  # Δ and Θ − Φ: one direction
    for key in whole["layers"]:
        assert blocks["layers"][key]["rel"] == pytest.approx(whole["layers"][key]["rel"], rel=1e-5)


def test_cli_prints_it_load_merged_returns_it_one_addend_has_none(tmp_path, world, capsys):
    root, base, delta, lora = world
    assert main(["merge", str(base), "--add", f"{delta}:0.5", "--add", f"{lora}:0.5", "-o", str(tmp_path / "m")]) == 0
    printed = capsys.readouterr().out
    assert "cos(Ψ1, Ψ2)" in printed and "‖s·Ψ2‖/‖Φ‖" in printed
    saved = json.loads((tmp_path / "m" / "readapt_interference.json").read_text())
    model, _ = load_merged(base, [(delta, 0.5), (lora, 0.5)])
    assert model.readapt_interference["overall"]["cos"] == pytest.approx(saved["overall"]["cos"], rel=1e-6)
    assert main(["merge", str(base), "--add", f"{delta}:0.5", "-o", str(tmp_path / "one")]) == 0
    assert "cos(" not in capsys.readouterr().out
    assert not (tmp_path / "one" / "readapt_interference.json").exists()
    assert load_merged(base, [(delta, 0.5)])[0].readapt_interference is None
