"""merge --as-lora (issue 15): Φ + Σ sᵢΨᵢ folded into one PEFT LoRA, exact or compressed, with its report and
functional fidelity; loaded by PEFT alone and compared with readapt's dense merge."""

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import readapt
from readapt.cards import fidelity_line
from readapt.errors import ReadaptError
from readapt.folding import fold
from tests.tiny import perturb, read_all, save_tiny

P = "base_model.model."


def _lora(base, out, seed, **cfg):
    """A PEFT LoRA/DoRA adapter on `base` with random nonzero factors, saved to `out`."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**cfg))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "magnitude" in n else 0.0) * p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


def _peft(base, adapter):
    """The adapter as PEFT alone loads it (no readapt involved), on a float32 base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)


def _peft_merged(base, adapter) -> dict:
    return _peft(base, adapter).merge_and_unload().state_dict()


_PEFT_ONLY = """
import sys, torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
save_file({k: v.contiguous() for k, v in model.merge_and_unload().state_dict().items()}, out)
assert not [m for m in sys.modules if m.split(".")[0] == "readapt"]
"""


def _peft_only_merged(base, adapter, tmp_path) -> dict:
    """merge_and_unload of the adapter in a fresh process that never imports readapt."""
    out = tmp_path / "peft_only.safetensors"
    subprocess.run([sys.executable, "-c", _PEFT_ONLY, str(base), str(adapter), str(out)], check=True,
                   capture_output=True)
    return load_file(out)


def _max_diff(got: dict, want: dict) -> tuple[float, float]:
    """(max abs difference, the largest |weight|) over the tensors of `want`."""
    return (max(float((got[n].float() - want[n].float()).abs().max()) for n in want),
            max(float(want[n].float().abs().max()) for n in want))


def _digest(*folders) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.iterdir())
            if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny float32 Llama, two LoRAs on it (different ranks and targets, one rsLoRA with a rank_pattern and
    an alpha_pattern, one on the embeddings and lm_head), a DoRA adapter and an instruct model."""
    root = tmp_path_factory.mktemp("fold")
    base = save_tiny(root / "base", "llama")
    a = _lora(base, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens",
                                                                      "lm_head"])
    b = _lora(base, root / "b", 2, r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"],
              rank_pattern={"model.layers.1.self_attn.q_proj": 3}, alpha_pattern={"up_proj": 5})
    dora = _lora(base, root / "dora", 3, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])
    tuned = perturb(base, root / "tuned", scale=0.02)
    return root, base, a, b, dora, tuned


ADDS = [(0.5, "a"), (-0.7, "b")]


def _adds(world, spec=ADDS):
    root = world[0]
    return [(root / name, s) for s, name in spec]


# --- exact mode --------------------------------------------------------------------------------------


def test_exact_fold_of_two_loras_is_the_dense_merge(world, tmp_path, capsys):
    root, base, a, b, _, _ = world
    before = _digest(base, a, b)
    report = fold(base, tmp_path / "f", _adds(world))
    want = read_all(readapt.merge(base, tmp_path / "m", _adds(world)))
    got = _peft_only_merged(base, tmp_path / "f", tmp_path)  # PEFT alone: from_pretrained + merge_and_unload
    diff, scale = _max_diff(got, want)
    with capsys.disabled():
        print(f"\nexact fold vs dense merge (PEFT merge_and_unload): max abs diff {diff:.3g} (max |W| {scale:.3g})")
    assert diff <= 1e-6 * scale  # float32 rounding: one matmul of the stacked factors instead of one per LoRA
    changed = [n for n in want if not torch.equal(want[n], read_all(base)[n])]
    assert len(changed) == 12  # a: q, v, down in 2 layers + embed_tokens + lm_head; b adds k and up in 2 layers
    cfg = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    # the union of the modules, each at the sum of its ranks, scale 1: layer 1's q_proj has b's rank_pattern 3
    assert cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert cfg["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 4 + 2
    assert cfg["rank_pattern"]["model.layers.1.self_attn.q_proj"] == 4 + 3
    assert cfg["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 2
    assert cfg["rank_pattern"]["model.embed_tokens"] == 4 and not cfg["use_rslora"]
    assert f"{P}model.embed_tokens.lora_embedding_A" in load_file(tmp_path / "f" / "adapter_model.safetensors")
    assert report["mode"] == "exact" and report["exact"] and report["rule"] == {"exact": True}
    assert all(t["relative_error"] == 0 and t["from_factors"] for t in report["tensors"])
    assert json.loads((tmp_path / "f" / "fold_report.json").read_text())["mode"] == "exact"
    assert "exact" in (tmp_path / "f" / "README.md").read_text()
    assert _digest(base, a, b) == before  # inputs untouched
    # unmerged (what a multi-LoRA server computes) = the dense merge's logits, to float32 rounding
    ids = torch.tensor([[5, 9, 13, 20, 40, 2, 7]])
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)(ids).logits
        served = _peft(base, tmp_path / "f")(ids).logits
    torch.testing.assert_close(served, dense, atol=1e-5, rtol=0)


def test_exact_mode_names_the_addend_that_is_not_a_lora(world, tmp_path):
    root, base, a, _, dora, tuned = world
    delta = readapt.extract(base, tuned, tmp_path / "delta")
    for addend, why in ((delta, "dense delta folder"), (tuned, "full checkpoint"), (dora, "DoRA")):
        with pytest.raises(ReadaptError, match=f"{addend}.*{why}.*--rank R or --tau T"):
            fold(base, tmp_path / "f", [(a, 0.5), (addend, 0.5)])
        assert not (tmp_path / "f").exists()


# --- compressed mode ---------------------------------------------------------------------------------


def test_compressed_fold_at_full_rank_reproduces_the_dense_merge(world, tmp_path, capsys):
    root, base, a, b, dora, tuned = world
    adds = [(a, 0.5), (b, 0.25), (dora, 0.5), (tuned, 0.5)]  # LoRA, rsLoRA, DoRA and a checkpoint together
    with pytest.warns(UserWarning, match="clamped"):
        report = fold(base, tmp_path / "f", adds, rank=64)
    want = read_all(readapt.merge(base, tmp_path / "m", adds))
    diff, scale = _max_diff(_peft_merged(base, tmp_path / "f"), want)
    with capsys.disabled():
        print(f"\ncompressed fold at full rank vs dense merge: max abs diff {diff:.3g} (max |W| {scale:.3g})")
    assert diff <= 2e-6 * scale
    assert report["mode"] == "compressed" and not report["exact"]
    kinds = {t["kind"]: t["policy"] for t in report["tensors"]}
    assert kinds == {"embedding": "lowrank", "linear": "lowrank", "lm_head": "lowrank", "vector": "dense"}


def test_at_rank_r_each_module_is_at_the_eckart_young_floor(world, tmp_path):
    """A module with LoRA terms only is factored from its factors, one with a delta from the dense sum; both
    are the best rank-r approximation of Σ sᵢΨᵢ (checked against torch.linalg.svd of the dense sum)."""
    root, base, a, b, _, tuned = world
    delta = readapt.extract(base, tuned, tmp_path / "delta")
    adds = [(a, 0.5), (b, -0.7), (delta, 0.3)]
    out = fold(base, tmp_path / "lora_only", _adds(world), rank=2)
    both = fold(base, tmp_path / "with_delta", adds, rank=2, svd="exact")
    B = read_all(base)
    for report, folder, adds_, name, path in (
            (out, "lora_only", _adds(world), "model.layers.0.self_attn.q_proj.weight", True),
            (both, "with_delta", adds, "model.layers.1.mlp.down_proj.weight", False)):
        D = (read_all(readapt.merge(base, tmp_path / f"m_{folder}", adds_, dtype="float64"))[name].double()
             - B[name].double())
        sigma = torch.linalg.svdvals(D)
        floor = float(sigma[2:].square().sum().sqrt() / D.norm())
        got = _peft_merged(base, tmp_path / folder)[name].double() - B[name].double()
        err = float((got - D).norm() / D.norm())
        t = next(t for t in report["tensors"] if t["name"] == name)
        assert t["rank"] == 2 and t["from_factors"] is path
        assert err == pytest.approx(floor, rel=1e-4, abs=1e-6)
        assert t["relative_error"] == pytest.approx(floor, rel=1e-4, abs=1e-6)


def test_fold_report_gives_each_module_its_rank_kept_energy_and_error_and_the_sizes(world, tmp_path):
    """fold_report.json: per module the rank, the energy of Σ sᵢΨᵢ and the part kept, the relative error
    ‖Ω − Ω̂‖/‖Ω − Φ‖ (for best rank-k factors, √(1 − kept/energy)); totals: the adapter's parameters and bytes
    against the dense model's."""
    root, base, *_ = world
    fold(base, tmp_path / "f", _adds(world), rank=2)
    report = json.loads((tmp_path / "f" / "fold_report.json").read_text())
    low = [t for t in report["tensors"] if t["policy"] == "lowrank"]
    assert len(low) == 12 and all(t["rank"] == 2 and 0 < t["kept"] <= t["energy"] * (1 + 1e-6) for t in low)
    assert sum(t["kept"] < 0.999 * t["energy"] for t in low) == 8  # not k_proj, up_proj: b's rank 2 alone
    for t in low:
        assert t["retained"] == pytest.approx(t["kept"] / t["energy"])
        assert t["relative_error"] == pytest.approx(max(1 - t["retained"], 0) ** 0.5, abs=1e-3)
    tot, B = report["totals"], read_all(base)
    assert tot["adapter_params"] == sum(2 * sum(t["shape"]) for t in low)
    assert tot["adapter_bytes"] == 4 * tot["adapter_params"]  # float32 factors
    assert tot["model_params"] == sum(v.numel() for v in B.values())
    assert tot["model_bytes"] == sum(v.numel() * v.element_size() for v in B.values())
    assert tot["not_carried"] == []
    card = (tmp_path / "f" / "README.md").read_text()  # the same per module, as a table in the model card
    for t in low:
        assert f"| {t['name']} | 2 | {100 * t['retained']:.2f}% | {t['relative_error']:.3g} |" in card


@pytest.mark.parametrize("svd", ["gram", "randomized"])
def test_small_errors_are_measured_not_cancelled(svd):
    """The reported error of a gram/randomized factorization is ‖Δ − BA‖² measured: energy − kept, both summed
    from float32 factors, is off by 25–300% (even negative; by how much depends on the machine's float32
    rounding) at a relative error of 2.5e-4 (a real SmolLM2 fold at rank 16 reported 0.00102 for 0.00095)."""
    from readapt.factorize import factorize
    from tests.test_lowrank import matrix

    D = matrix(300, 200, [1.0] * 8 + [1e-4] * 50)
    f = factorize(D, rank=8, svd=svd)
    true = float((D.double() - f.B.double() @ f.A.double()).square().sum())
    assert f.residual == pytest.approx(true, rel=1e-4)
    off = abs((f.energy - f.kept) - true)  # why the difference is not used: far worse than the measurement
    assert off > 0.1 * true and off > 100 * abs(f.residual - true)


def test_lora_only_fold_never_reads_a_linear_weight(world, tmp_path, monkeypatch):
    """From the factors: the base's matrices are not read (no d×k matrix is formed), only what is carried
    as values."""
    from readapt.checkpoint import Checkpoint

    root, base, *_ = world
    read = []
    orig = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, n: read.append((self.path, n)) or orig(self, n))
    fold(base, tmp_path / "f", _adds(world), rank=3)
    assert not [n for p, n in read if p == base]


def test_dora_addend_is_its_weight_space_difference_not_peft_add_weighted_adapter(world, tmp_path, capsys):
    """DoRA enters as W′ − W (merge's Ψ), so the fold reproduces merge's DoRA result up to the truncation;
    PEFT's add_weighted_adapter combines the DoRA factors without the magnitudes and lands elsewhere."""
    root, base, a, _, dora, _ = world
    adds = [(dora, 0.5), (a, 0.5)]
    with pytest.warns(UserWarning, match="clamped"):
        fold(base, tmp_path / "f", adds, rank=64)
    want = read_all(readapt.merge(base, tmp_path / "m", adds))
    ours, scale = _max_diff(_peft_merged(base, tmp_path / "f"), want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dora, adapter_name="dora")
        pm.load_adapter(a, adapter_name="a")
        pm.add_weighted_adapter(["dora", "a"], [0.5, 0.5], "cat", combination_type="cat")  # exact for LoRA factors
        pm.set_adapter("cat")
        theirs = _max_diff(pm.merge_and_unload(adapter_names=["cat"]).state_dict(), want)[0]
    with capsys.disabled():
        print(f"\nDoRA + LoRA vs dense merge: fold max abs diff {ours:.3g}, PEFT add_weighted_adapter {theirs:.3g}")
    assert ours <= 2e-6 * scale
    assert theirs > 1e4 * ours


# --- a fresh command: the plan from the adapters, the written adapter checked on its header ------------------


_FOLD_ONLY = """
import sys
from readapt.folding import fold
base, out, *adds = sys.argv[1:]
fold(base, out, [(a, 0.5) for a in adds], rank=4)
print(sorted({m.split(".")[0] for m in sys.modules} & {"transformers", "peft"}))
"""


def test_fold_of_linear_loras_imports_neither_transformers_nor_peft(world, tmp_path):
    """A fresh `merge --as-lora` of LoRAs on Linear layers plans from the adapters and checks the written header,
    so it pays neither import (~3 CPU-s, more than the fold of two rank-64 LoRAs at 168M); PEFT alone loads the
    output, and its merge is the dense merge (rank 4 holds every module's sum)."""
    root, base, *_ = world
    c = _lora(base, tmp_path / "c", 5, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    d = _lora(base, tmp_path / "d", 6, r=2, lora_alpha=2, target_modules=["q_proj", "gate_proj"])
    run = subprocess.run([sys.executable, "-c", _FOLD_ONLY, str(base), str(tmp_path / "f"), str(c), str(d)],
                         check=True, capture_output=True, text=True)
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout
    report = json.loads((tmp_path / "f" / "fold_report.json").read_text())
    assert {t["kind"] for t in report["tensors"]} == {"linear"} and len(report["tensors"]) == 8
    got = _peft_only_merged(base, tmp_path / "f", tmp_path)
    want = read_all(readapt.merge(base, tmp_path / "m", [(c, 0.5), (d, 0.5)]))
    diff, scale = _max_diff(got, want)
    assert diff <= 2e-6 * scale  # rank 4: every module's sum has rank ≤ 2 + 2, so its best rank-4 factors are it
    assert {t["rank"] for t in report["tensors"] if "q_proj" in t["name"]} == {4}


def test_plan_from_the_adapters_is_the_model_class_plan(world, tmp_path, monkeypatch):
    """Linear LoRAs only: the plan read off the adapters equals loreplan.classify's on the model class; an
    embedding or lm_head LoRA (a's) takes the model class's plan."""
    import readapt.folding as folding
    from readapt.checkpoint import ReadOptions
    from readapt.loreplan import Policy, classify
    from readapt.merging import open_inputs

    root, base, a, b, *_ = world
    c = _lora(base, tmp_path / "c", 5, r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"])
    calls = []
    monkeypatch.setattr(folding, "classify", lambda *args: calls.append(1) or classify(*args))
    for adds, classified in (([(c, 0.5), (b, 0.5)], 0), ([(c, 0.5), (a, 0.5)], 1)):
        base_ckpt, addends = open_inputs(base, adds, False, ReadOptions())
        source = folding.FromMerge(base_ckpt, addends)
        got = folding.plan(source, Policy())
        want = classify(source.config, source.names, base_ckpt.shape, source.floating)
        Policy().apply(want)
        assert got == want and len(got) == 14 + 2 * classified
        assert len(calls) == classified
        calls.clear()
    source = folding.FromMerge(*open_inputs(base, [(c, 0.5)], False, ReadOptions()))
    source.config = {**source.config, "architectures": ["LlavaForConditionalGeneration"]}  # may store more tensors
    folding.plan(source, Policy())  # than its causal-LM class has: the model class says what each is
    assert len(calls) == 1


def _corrupt_rank(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"]["model.layers.1.self_attn.q_proj"] += 1
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("bad, message", [
    ("lora_B.bias", "q_proj.lora_B.bias .*planned None"),  # mergekit's: PEFT drops it without lora_bias
    ("rank", "layers.1.self_attn.q_proj: rank_pattern 8, alpha_pattern 7"),
])
def test_a_bad_fold_is_refused_and_nothing_written(world, tmp_path, monkeypatch, bad, message):
    import readapt.lowrank as lowrank

    root, base, *_ = world
    save = lowrank.save_lora

    def broken(folder, factors, *, extra_tensors, **kw):
        extra = [(f"{P}model.layers.0.self_attn.q_proj.lora_B.bias", torch.ones(16))] if bad == "lora_B.bias" else []
        out = save(folder, factors, extra_tensors=[*extra_tensors, *extra], **kw)
        if bad == "rank":
            _corrupt_rank(folder)
        return out

    monkeypatch.setattr(lowrank, "save_lora", broken)
    with pytest.raises(ReadaptError, match=message):
        fold(base, tmp_path / "f", _adds(world))
    assert not (tmp_path / "f").exists()


def test_adapter_config_fields_are_peft_loraconfig_fields(world, tmp_path):
    """save_lora writes adapter_config.json itself (importing PEFT to build a LoraConfig costs more than a fold);
    every field it writes is a LoraConfig field that PEFT reads back unchanged."""
    root, base, a, *_ = world
    with pytest.warns(UserWarning, match="clamped"):
        fold(base, tmp_path / "f", [(a, 0.5), (world[5], 0.5)], rank=64)  # LoRA + checkpoint: norms dense too
    written = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    peft = LoraConfig.from_pretrained(str(tmp_path / "f")).to_dict()
    assert set(written) <= set(peft)
    assert {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft.items() if k in written} == written
    assert written["modules_to_save"] and written["rank_pattern"]


# --- fidelity ----------------------------------------------------------------------------------------


def _text(path, n_words, suffix=".jsonl"):
    words = " ".join(f"w{(7 * i) % 60}" for i in range(n_words))
    path.write_text(json.dumps({"text": words}) + "\n" if suffix == ".jsonl" else words)
    return path


def test_calibration_reports_kl_and_top1_agreement(world, tmp_path):
    root, base, a, b, _, tuned = world
    text = _text(tmp_path / "cal.jsonl", 40)
    exact = fold(base, tmp_path / "exact", _adds(world), calibration=text)["fidelity"]
    # exact: KL at the float32 rounding of the log-probabilities (≤ 1e-7 measured), every top-1 the same
    assert exact["tokens"] == 40 and exact["top1_agreement"] == 1.0 and abs(exact["mean_kl"]) < 1e-6
    low = fold(base, tmp_path / "low", _adds(world), rank=1, calibration=text)["fidelity"]
    assert low["mean_kl"] > 1e-4
    assert "functional fidelity on 40 tokens" in (tmp_path / "low" / "README.md").read_text()
    # a document longer than the model's context (64 tokens) is truncated to it, and the report says so
    long = _text(tmp_path / "long.txt", 100, suffix=".txt")
    with pytest.warns(UserWarning, match="longer than the model's context"):
        f = readapt.extract_lowrank(base, tuned, tmp_path / "lore", rank=2, calibration=long)["fidelity"]
    assert f["tokens"] == 64 and "truncated" in f["notes"][0] and 0 < f["mean_kl"]
    assert json.loads((tmp_path / "lore" / "lore_report.json").read_text())["fidelity"]["tokens"] == 64
    delta = readapt.extract(base, tuned, tmp_path / "delta")
    g = readapt.compress(delta, tmp_path / "c", rank=2, calibration=long)["fidelity"]
    assert g["mean_kl"] == pytest.approx(f["mean_kl"], rel=1e-3)  # the same adapter against the same model


def test_calibration_on_a_tied_model(tmp_path):
    """Trainable tokens (the tied embedding carried as rows) come off with PEFT's unload between the two runs."""
    base = save_tiny(tmp_path / "base", "gemma2")
    a = _lora(base, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    f = fold(base, tmp_path / "f", [(a, 0.7)], calibration=_text(tmp_path / "c.jsonl", 30))
    assert "trainable_token_indices" in json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert f["exact"] and f["fidelity"]["top1_agreement"] == 1.0 and abs(f["fidelity"]["mean_kl"]) < 1e-6


# --- bad input and the command line ------------------------------------------------------------------


class _Result:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


def _cli(*args):
    from readapt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        try:
            code = main([str(x) for x in args])
        except SystemExit as e:  # argparse refuses a flag's value
            code = e.code
    return _Result(code, out.getvalue(), err.getvalue())


def test_cli_fold_and_bad_input(world, tmp_path):
    root, base, a, b, dora, tuned = world
    before = _digest(base, a, b, dora)
    r = _cli("merge", base, "-o", tmp_path / "f", "--add", f"{a}:0.5", "--add", f"{b}:-0.7", "--as-lora")
    assert r.returncode == 0, r.stderr
    assert "exact: each module's LoRA factors concatenated" in r.stdout
    r = _cli("merge", base, "-o", tmp_path / "bf16", "--add", a, "--as-lora", "--rank", "2", "--dtype", "bfloat16")
    assert r.returncode == 0 and "compressed" in r.stdout, r.stderr
    assert load_file(tmp_path / "bf16" / "adapter_model.safetensors")[
        f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.bfloat16  # --dtype: the factors'
    (tmp_path / "empty.txt").write_text("  \n")
    other = save_tiny(tmp_path / "other", "llama", hidden_size=32)
    bad = [
        (["--add", f"{dora}:0.5", "--as-lora"], "DoRA adapter.*--rank R or --tau T"),  # dense addend, no rule
        (["--add", f"{a}:0.5", "--as-lora", "--rank", "2", "--tau", "0.5"], "exactly one of --tau"),
        (["--add", f"{a}:0.5", "--as-lora", "--dtype", "int8"], "int8"),  # an integer dtype
        (["--add", f"{a}:0.5", "--as-lora", "--calibration", tmp_path / "empty.txt"], "contains no text"),
        (["--add", f"{a}:0.5", "--rank", "2"], "--rank applies to a merge written as one LoRA: add --as-lora"),
        (["--add", f"{a}:0.5", "--calibration", tmp_path / "empty.txt"], "--calibration applies"),
    ]
    for args, message in bad:
        r = _cli("merge", base, "-o", tmp_path / "out", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert __import__("re").search(message, r.stderr), (message, r.stderr)
        assert not (tmp_path / "out").exists()
    r = _cli("merge", other, "-o", tmp_path / "out", "--add", a, "--as-lora")  # made for another base
    assert r.returncode == 2 and "different base" in r.stderr and not (tmp_path / "out").exists()
    r = _cli("extract", base, tuned, "-o", tmp_path / "out", "--calibration", tmp_path / "empty.txt")
    assert r.returncode == 2 and "--tau or --rank" in r.stderr
    assert _digest(base, a, b, dora) == before


# --- a real model -------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_smollm2_lora_plus_tuned_delta(real_models, tmp_path, capsys):
    """SmolLM2-135M: a LoRA and the tuned model's delta folded at rank 16; PEFT loads the folder and its merged
    weights are the dense merge up to the reported truncation error."""
    base, tuned = real_models["smollm2-135m-instruct"], real_models["smollm2-135m-tuned"]
    lora = _lora(base, tmp_path / "lora", 4, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    adds = [(lora, 0.5), (tuned, 0.5)]
    text = tmp_path / "cal.txt"
    text.write_text("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
                    "and associated documentation files (the \"Software\"), to deal in the Software without "
                    "restriction, including without limitation the rights to use, copy, modify, merge, publish, "
                    "distribute, sublicense, and/or sell copies of the Software.")
    report = fold(base, tmp_path / "f", adds, rank=16, calibration=text)
    got = _peft_merged(base, tmp_path / "f")
    want = read_all(readapt.merge(base, tmp_path / "m", adds, dtype="float32"))
    B = read_all(base)
    name = "model.layers.3.self_attn.q_proj.weight"
    D = want[name].double() - B[name].double()
    err = float((got[name].double() - want[name].double()).norm() / D.norm())
    t = next(t for t in report["tensors"] if t["name"] == name)
    with capsys.disabled():
        print(f"\nSmolLM2 fold LoRA + tuned at rank 16: {name} relative error {err:.6f} (reported "
              f"{t['relative_error']:.6f}); overall {report['relative_error']:.4f}; adapter "
              f"{report['totals']['adapter_bytes'] / 1e6:.1f} MB; {fidelity_line(report['fidelity'])}")
    assert err == pytest.approx(t["relative_error"], rel=1e-2, abs=1e-5)
    assert report["fidelity"]["tokens"] > 40 and report["fidelity"]["top1_agreement"] > 0.5
    emb = "model.embed_tokens.weight"
    assert torch.equal(got[emb].to(want[emb].dtype), read_all(readapt.merge(base, tmp_path / "m16", adds))[emb])
