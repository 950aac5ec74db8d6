"""LoRE-Adapt: optimal factors, the τ rule, PEFT loading/merging exactness, policies, bad input, reports."""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.tiny import perturb, read_all, save_tiny

from readapt.cli import main
from readapt.errors import ReadaptError
from readapt.cards import lore_summary
from readapt.factorize import explained, factorize, rank_at
from readapt.loreplan import Policy
from readapt.lowrank import compress, extract_lowrank, verify_peft
from readapt.spectra import spectrum


def matrix(m, n, sigma, seed=0):
    """An m×n float32 matrix with the given singular values (orthonormal factors from QR)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigma)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    return ((U * torch.tensor(sigma, dtype=torch.float64)) @ V.T).float()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lore")
    base = save_tiny(root / "base", "llama")
    tuned = perturb(base, root / "tuned", scale=0.01)
    return root, base, tuned


# -- the factorization --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("k", [1, 5, 24])
def test_exact_factors_are_the_optimal_rank_k_approximation(shape, k):
    D = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
    f = factorize(D, rank=k, svd="exact")
    sigma = torch.linalg.svdvals(D.double())
    optimum = sigma[k:].square().sum().sqrt()  # Eckart–Young: sqrt(Σ_{i>k} σᵢ²)
    err = (D.double() - f.B.double() @ f.A.double()).norm()
    assert f.B.shape == (shape[0], k) and f.A.shape == (k, shape[1]) and f.rank == k
    assert abs(float(err - optimum)) <= 1e-6 * float(D.double().norm())  # float32 precision
    # B = U_k S_k, A = V_kᵀ: A has orthonormal rows and B's column norms are the singular values
    torch.testing.assert_close(f.A @ f.A.T, torch.eye(k), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.B.double().norm(dim=0), sigma[:k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("svd", ["gram", "randomized"])
@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_fast_paths_are_within_1_percent_of_the_optimum(svd, shape):
    g = torch.Generator().manual_seed(1)
    D = torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g) + 0.3 * torch.randn(*shape, generator=g)
    k = 12
    optimum = float(torch.linalg.svdvals(D.double())[k:].square().sum().sqrt())
    f = factorize(D, rank=k, svd=svd)
    err = float((D.double() - f.B.double() @ f.A.double()).norm())
    assert f.rank == k and optimum <= err * (1 + 1e-6) and err <= 1.01 * optimum
    # the reported kept energy is ‖BA‖², so the report's error is the true error
    assert math.isclose(f.energy - f.kept, err ** 2, rel_tol=1e-4)


def test_rank_rule_takes_the_smallest_k_reaching_tau():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0])  # energies 16, 9, 4, 1 of 30
    assert explained(sigma).tolist() == pytest.approx([16 / 30, 25 / 30, 29 / 30, 1.0])
    assert rank_at(sigma, 0.5) == 1
    assert rank_at(sigma, 16 / 30) == 1  # v_k = τ exactly counts
    assert rank_at(sigma, 0.54) == 2
    assert rank_at(sigma, 25 / 30) == 2
    assert rank_at(sigma, 0.9) == 3
    assert rank_at(sigma, 1.0) == 4
    assert rank_at(torch.zeros(3), 0.5) == 0
    D = matrix(30, 20, [4.0, 3.0, 2.0, 1.0])
    for svd in ("exact", "gram"):
        assert factorize(D, tau=0.5, svd=svd).rank == 1
        assert factorize(D, tau=0.9, svd=svd).rank == 3


def test_all_zero_matrix_has_rank_zero_and_no_factors():
    for svd, kw in (("exact", {"tau": 0.5}), ("gram", {"tau": 1.0}), ("randomized", {"rank": 3})):
        f = factorize(torch.zeros(6, 4), svd=svd, **kw)
        assert f.rank == 0 and f.B is None and f.A is None and f.energy == 0.0


@pytest.mark.parametrize("kw", [{"tau": 0.0}, {"tau": 1.5}, {"tau": -0.2}, {"tau": float("nan")}, {"rank": 0},
                                {"rank": -3}, {"rank": True}, {"rank": 2.5}, {}, {"tau": 0.5, "rank": 4}])
def test_bad_rule_is_refused(kw):
    with pytest.raises(ReadaptError, match="tau|rank"):
        factorize(torch.randn(4, 4), **kw)


def test_cuda_device(pair, tmp_path):
    root, base, tuned = pair
    if not torch.cuda.is_available():
        with pytest.raises(ReadaptError, match="no CUDA GPU"):
            extract_lowrank(base, tuned, tmp_path / "gpu", rank=2, device="cuda")
        return
    D = torch.randn(300, 120, generator=torch.Generator().manual_seed(0))
    for svd in ("exact", "gram", "randomized"):
        f = factorize(D.cuda(), rank=7, svd=svd)
        optimum = float(torch.linalg.svdvals(D.double())[7:].square().sum().sqrt())
        assert float((D.double() - (f.B @ f.A).double().cpu()).norm()) <= 1.01 * optimum
    extract_lowrank(base, tuned, tmp_path / "gpu", tau=0.5, device="cuda")


def test_randomized_needs_a_fixed_rank():
    with pytest.raises(ReadaptError, match="randomized needs a fixed --rank"):
        factorize(torch.randn(4, 4), tau=0.5, svd="randomized")


# -- the adapter, through PEFT ------------------------------------------------------------------------


def _peft_merged(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, adapter)
    return pm, pm.merge_and_unload()


def test_peft_merge_and_unload_reproduces_base_plus_BA_exactly(pair):
    root, base, tuned = pair
    out = root / "lore_tau"
    report = extract_lowrank(base, tuned, out, tau=0.5)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] and "model.layers.1.self_attn.q_proj" in cfg["rank_pattern"]
    ad, B, T = load_file(out / "adapter_model.safetensors"), read_all(base), read_all(tuned)
    p = "base_model.model."
    # the model input embedding sits in lora_embedding_A/B, lm_head in lora_A/B, norms in modules_to_save
    assert {p + "model.embed_tokens.lora_embedding_A", p + "lm_head.lora_A.weight", p + "model.norm.weight"} <= set(ad)
    _, merged = _peft_merged(base, out)
    sd = merged.state_dict()
    ranks = {t["name"]: t["rank"] for t in report["tensors"]}
    for name, W in B.items():
        mod = name.rsplit(".", 1)[0]
        if p + mod + ".lora_A.weight" in ad:
            BA = ad[p + mod + ".lora_B.weight"] @ ad[p + mod + ".lora_A.weight"]
            assert ad[p + mod + ".lora_A.weight"].shape[0] == ranks[name] == cfg["rank_pattern"][mod]
            assert torch.equal(sd[name], W + BA), name  # max abs error 0 in float32
        elif p + mod + ".lora_embedding_A" in ad:
            BA = (ad[p + mod + ".lora_embedding_B"] @ ad[p + mod + ".lora_embedding_A"]).T
            assert torch.equal(sd[name], W + BA), name
        else:  # norms carried dense
            assert torch.equal(sd[name], T[name]), name
    # and BA is the optimal rank-k(τ) approximation of each layer's delta
    name = "model.layers.0.mlp.down_proj.weight"
    D = (T[name] - B[name]).double()
    sigma = torch.linalg.svdvals(D)
    k = ranks[name]
    assert k == rank_at(sigma, 0.5)
    err = (sd[name].double() - T[name].double()).norm()
    assert abs(float(err - sigma[k:].square().sum().sqrt())) <= 1e-5 * float(D.norm())


def test_readapt_merge_applies_the_adapter_like_peft(pair):
    from readapt.merging import merge

    root, base, tuned = pair
    out = root / "lore_rank"
    extract_lowrank(base, tuned, out, rank=3, svd="exact")
    _, merged = _peft_merged(base, out)
    merge(base, root / "merged_rank", [(out, 1.0)])
    ours = read_all(root / "merged_rank")
    for name, W in merged.state_dict().items():
        if name in ours:
            torch.testing.assert_close(ours[name], W, atol=1e-7, rtol=0)


def test_qwen2_bias_deltas_are_carried_so_peft_applies_them(tmp_path):
    base = save_tiny(tmp_path / "base", "qwen2")
    tuned = perturb(base, tmp_path / "tuned", scale=0.01)
    out = tmp_path / "lore"
    extract_lowrank(base, tuned, out, rank=2)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["bias"] == "lora_only"
    T = read_all(tuned)
    pm, merged = _peft_merged(base, out)
    ids = torch.tensor([[5, 9, 13, 20]])
    with torch.no_grad():
        before = pm(ids).logits
    sd = merged.state_dict()
    for name in T:
        if name.endswith("proj.bias"):
            assert torch.equal(sd[name], T[name]), name  # the tuned bias, exactly
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, before, atol=1e-5, rtol=0)
    # readapt merge reads the same file and applies the biases too
    from readapt.merging import merge

    merge(base, tmp_path / "m", [(out, 1.0)])
    assert torch.equal(read_all(tmp_path / "m")["model.layers.0.self_attn.q_proj.bias"],
                       T["model.layers.0.self_attn.q_proj.bias"])


def test_tied_embeddings_are_counted_and_applied_once(tmp_path):
    base = save_tiny(tmp_path / "base", "gemma2")
    tuned = perturb(base, tmp_path / "tuned", scale=0.01)
    B = read_all(base)
    # a checkpoint that also stores the tied lm_head copy must not get a second factor for it
    files = sorted(tuned.glob("*.safetensors"))
    sd = load_file(files[0])
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, files[0], metadata={"format": "pt"})
    sb = load_file(sorted(base.glob("*.safetensors"))[0])
    sb["lm_head.weight"] = sb["model.embed_tokens.weight"].clone()
    save_file(sb, sorted(base.glob("*.safetensors"))[0], metadata={"format": "pt"})
    out = tmp_path / "lore"
    report = extract_lowrank(base, tuned, out, rank=2)
    ad = load_file(out / "adapter_model.safetensors")
    assert not any("lm_head" in k for k in ad)
    assert [t["kind"] for t in report["tensors"] if t["name"] == "lm_head.weight"] == ["tied"]
    assert report["by_kind"]["tied"]["params"] == 0  # not counted in the delta's parameters
    _, merged = _peft_merged(base, out)
    E = merged.state_dict()["model.embed_tokens.weight"]
    # the tied matrix is carried dense (its changed rows, as trainable tokens) and applied once
    assert torch.equal(E, read_all(tuned)["model.embed_tokens.weight"])
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def _logits(model, ids=torch.tensor([[5, 9, 13, 20, 40, 2, 7]])):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("embeddings", ["auto", "dense", "skip"])
def test_tied_adapter_is_one_model_unmerged_merged_and_through_readapt_merge(tmp_path, embeddings):
    """Issue 11: PEFT's unmerged forward, merge_and_unload and readapt merge give the same logits on a tied model
    (the embedding LoRA used to adapt only the input side unmerged: 0.66 logits off here, 0.7-1.0 on SmolLM2)."""
    from transformers import AutoModelForCausalLM

    from readapt.merging import merge

    base = save_tiny(tmp_path / "base", "gemma2")
    tuned = perturb(base, tmp_path / "tuned", scale=0.05)
    out = tmp_path / "lore"
    report = extract_lowrank(base, tuned, out, rank=8, policy=Policy(embeddings=embeddings))
    pm = _peft_merged(base, out)[0]
    unmerged = _logits(pm)
    merged = _logits(pm.merge_and_unload())
    merge(base, tmp_path / "m", [(out, 1.0)])
    ours = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32))
    torch.testing.assert_close(unmerged, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, ours, atol=1e-5, rtol=0)
    emb = next(t for t in report["tensors"] if t["name"] == "model.embed_tokens.weight")
    if embeddings != "skip":  # the tied matrix is the tuned one, on both sides
        assert torch.equal(read_all(tmp_path / "m")["model.embed_tokens.weight"],
                           read_all(tuned)["model.embed_tokens.weight"])
        assert emb["policy"] == "dense" and emb["rows"] == 64 and "trainable" in emb["note"]
        assert report["by_kind"]["embedding"]["params_kept"] == 64 * 16
        from readapt.delta import extract  # compress writes the same adapter from a delta folder

        compress(extract(base, tuned, tmp_path / "delta"), tmp_path / "c", rank=8, policy=Policy(embeddings=embeddings))
        fa, fc = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "c" / "adapter_model.safetensors")
        key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
        assert torch.equal(fa[key], fc[key])
        # the spectrum counts the tied matrix as extract carries it
        spec = spectrum(base, tuned, tmp_path / "s", policy=Policy(embeddings=embeddings))
        assert spec["by_kind"]["embedding"]["params_kept"] == 64 * 16


def test_lowrank_tied_embeddings_are_refused(tmp_path):
    base = save_tiny(tmp_path / "base", "gemma2")
    tuned = perturb(base, tmp_path / "tuned", scale=0.01)
    with pytest.raises(ReadaptError, match="--embeddings lowrank: model.embed_tokens is tied to lm_head.*"
                                           "--embeddings dense"):
        extract_lowrank(base, tuned, tmp_path / "lore", rank=2, policy=Policy(embeddings="lowrank"))
    assert not (tmp_path / "lore").exists()
    # only the rows that changed are carried
    f = sorted(tuned.glob("*.safetensors"))[0]
    sd = load_file(f)
    E = read_all(base)["model.embed_tokens.weight"].clone()
    E[[4, 17]] += 0.5
    sd["model.embed_tokens.weight"] = E
    save_file(sd, f, metadata={"format": "pt"})
    extract_lowrank(base, tuned, tmp_path / "lore", rank=2)
    cfg = json.loads((tmp_path / "lore" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {"model.embed_tokens": [4, 17]}
    ad = load_file(tmp_path / "lore" / "adapter_model.safetensors")
    assert torch.equal(ad["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"], E[[4, 17]])


def test_readapt_merge_applies_a_peft_tied_lora_once(tmp_path):
    """A LoRA trained by PEFT with ensure_weight_tying=True saves a copy of the embedding factors on lm_head;
    unmerged, PEFT applies that one delta to the shared matrix's both sides: readapt merge builds that model
    (it used to refuse the adapter: lm_head.weight is not in a tied checkpoint)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from readapt.merging import merge

    base = save_tiny(tmp_path / "base", "gemma2")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False,
                                              ensure_weight_tying=True))
    pm.save_pretrained(tmp_path / "ad")
    assert "base_model.model.lm_head.lora_A.weight" in load_file(tmp_path / "ad" / "adapter_model.safetensors")
    unmerged = _logits(pm)
    merge(base, tmp_path / "m", [(tmp_path / "ad", 1.0)])
    ours = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32))
    torch.testing.assert_close(ours, unmerged, atol=1e-5, rtol=1e-5)  # float32 rounding (logits ~6)


def test_policies_skip_and_dense(pair):
    root, base, tuned = pair
    out = root / "lore_skip"
    report = extract_lowrank(base, tuned, out, rank=2, policy=Policy(embeddings="skip", lm_head="dense", norms="skip"))
    ad = load_file(out / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not any("embed_tokens" in k or "norm" in k for k in ad)
    assert cfg["modules_to_save"] == ["lm_head"]
    assert torch.equal(ad["base_model.model.lm_head.weight"], read_all(tuned)["lm_head.weight"])
    kinds = report["by_kind"]
    assert kinds["embedding"]["params_kept"] == 0 and kinds["embedding"]["energy"] > 0  # the loss is visible
    assert kinds["lm_head"]["params_kept"] == kinds["lm_head"]["params"]
    _, merged = _peft_merged(base, out)
    assert torch.equal(merged.state_dict()["model.embed_tokens.weight"], read_all(base)["model.embed_tokens.weight"])
    with pytest.raises(ReadaptError, match="--norms"):
        extract_lowrank(base, tuned, root / "x", rank=2, policy=Policy(norms="lowrank"))


def test_compress_from_a_delta_folder_matches_extract(pair):
    from readapt.delta import extract

    root, base, tuned = pair
    delta = extract(base, tuned, root / "delta")
    a = extract_lowrank(base, tuned, root / "e", tau=0.7, svd="exact")
    b = compress(delta, root / "c", tau=0.7, svd="exact")
    assert [t["rank"] for t in a["tensors"]] == [t["rank"] for t in b["tensors"]]
    fa, fb = load_file(root / "e" / "adapter_model.safetensors"), load_file(root / "c" / "adapter_model.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    # without the base, dense tensors cannot be written; skipping them needs no base
    compress(delta, root / "c2", tau=0.7, base=None, policy=Policy(norms="skip"))
    with pytest.raises(ReadaptError, match="not a delta folder"):
        compress(base, root / "c3", tau=0.5)


def test_all_zero_layer_is_skipped_and_reported(pair, tmp_path):
    root, base, tuned = pair
    t2 = perturb(base, tmp_path / "t2", scale=0.01)
    f = sorted(t2.glob("*.safetensors"))[0]
    sd = load_file(f)
    sd["model.layers.0.self_attn.k_proj.weight"] = read_all(base)["model.layers.0.self_attn.k_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    report = extract_lowrank(base, t2, tmp_path / "lore", tau=0.5)
    entry = next(t for t in report["tensors"] if t["name"] == "model.layers.0.self_attn.k_proj.weight")
    assert entry["rank"] == 0 and "all zero" in entry["note"]
    assert "rank-0 (all-zero) tensors skipped: 1" in lore_summary(report)
    cfg = json.loads((tmp_path / "lore" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.k_proj" not in cfg["rank_pattern"]
    assert not any("layers.0.self_attn.k_proj" in k for k in load_file(tmp_path / "lore" / "adapter_model.safetensors"))


def test_rank_above_layer_size_is_clamped_with_a_warning(pair):
    root, base, tuned = pair
    with pytest.warns(UserWarning, match="clamped"):
        report = extract_lowrank(base, tuned, root / "big", rank=1000, svd="exact")
    lowrank = [t for t in report["tensors"] if t["policy"] == "lowrank"]
    assert lowrank and all(t["rank"] == min(t["shape"]) for t in lowrank)  # random deltas: full rank


def test_non_finite_delta_is_refused_and_nothing_written(pair, tmp_path):
    root, base, tuned = pair
    t2 = perturb(base, tmp_path / "t2", scale=0.01)
    f = sorted(t2.glob("*.safetensors"))[0]
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ReadaptError, match="model.layers.1.mlp.up_proj.weight.*NaN"):
        extract_lowrank(base, t2, tmp_path / "out", rank=2)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["t2"]


def test_verification_refuses_factors_peft_would_ignore(pair, tmp_path):
    """mergekit's failure mode: a lora_B.bias without lora_bias=True is silently dropped by PEFT."""
    import shutil

    root, base, tuned = pair
    extract_lowrank(base, tuned, tmp_path / "ok", rank=2)
    shutil.copytree(tmp_path / "ok", tmp_path / "bad")
    sd = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.ones(16)
    save_file(sd, tmp_path / "bad" / "adapter_model.safetensors")
    config = json.loads((base / "config.json").read_text())
    verify_peft(tmp_path / "ok", config)
    with pytest.raises(ReadaptError, match="PEFT would ignore 1 tensors"):
        verify_peft(tmp_path / "bad", config)


def test_recorded_base_is_absolute_so_the_adapter_loads_from_any_folder(tmp_path, monkeypatch):
    """extract --tau recorded the base as typed ('base'), so AutoPeftModelForCausalLM failed elsewhere."""
    from peft import AutoPeftModelForCausalLM

    from readapt.delta import extract

    work = tmp_path / "work"
    base = save_tiny(work / "base", "llama")
    perturb(base, work / "tuned", scale=0.01)
    monkeypatch.chdir(work)
    extract_lowrank("base", "tuned", "lore", rank=2)
    extract("base", "tuned", "delta")
    compress("delta", "lore2", rank=2)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for ad in ("lore", "lore2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoPeftModelForCausalLM.from_pretrained(work / ad)
        assert model.peft_config["default"].r == 2
        cfg = json.loads((work / ad / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(base.absolute())
    manifest = json.loads((work / "delta" / "readapt_delta.json").read_text())
    assert manifest["base"]["spec"] == str(base.absolute()) and manifest["tuned"]["spec"] == str(work / "tuned")
    # a model id from the Hugging Face cache is recorded as the id, its revision apart (as PEFT keeps them)
    from readapt.addends import save_lora

    (tmp_path / "ad").mkdir()
    cfg = save_lora(tmp_path / "ad", [("m.q", torch.ones(2, 1), torch.ones(1, 2))], base_model="org/name@v2")
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == ("org/name", "v2")


# -- spectrum and CLI ---------------------------------------------------------------------------------


def test_spectrum_report(pair):
    root, base, tuned = pair
    out = root / "spec"
    report = spectrum(base, tuned, out, tau=0.5)
    assert {p.name for p in out.iterdir()} == {"spectrum.json", "spectrum.safetensors", "figure2.png", "figure3.png",
                                              "README.md"}
    sig = load_file(out / "spectrum.safetensors")
    T, B = read_all(tuned), read_all(base)
    name = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(sig[name], torch.linalg.svdvals(T[name] - B[name]), atol=1e-5, rtol=1e-4)
    entry = next(t for t in report["tensors"] if t["name"] == name)
    assert entry["rank"] == rank_at(sig[name], 0.5) and entry["retained"] >= 0.5
    shares = [g["params_kept_share"] for g in report["tau_grid"]]
    assert shares == sorted(shares) and report["tau_grid"][-1]["tau"] == 1.0
    # the τ=0.5 point of Figure 3 is what extract --tau 0.5 keeps (same ranks, same share)
    ext = extract_lowrank(base, tuned, root / "lore_tau05", tau=0.5)
    assert ext["params_kept_share"] == pytest.approx(
        next(g["params_kept_share"] for g in report["tau_grid"] if g["tau"] == 0.5))
    assert json.loads((out / "spectrum.json").read_text())["params_kept"] == report["params_kept"]


def test_cli_extract_compress_spectrum(pair, tmp_path, capsys):
    root, base, tuned = pair
    assert main(["extract", str(base), str(tuned), "-o", str(tmp_path / "a"), "--tau", "0.5"]) == 0
    assert "τ=0.5 keeps" in capsys.readouterr().out
    assert main(["extract", str(base), str(tuned), "-o", str(tmp_path / "d")]) == 0  # plain delta unchanged
    assert (tmp_path / "d" / "readapt_delta.json").is_file()
    assert main(["compress", str(tmp_path / "d"), "-o", str(tmp_path / "c"), "--rank", "4", "--norms", "skip"]) == 0
    assert "rank 4 keeps" in capsys.readouterr().out
    assert main(["spectrum", str(tmp_path / "d"), "-o", str(tmp_path / "s")]) == 0
    assert main(["extract", str(base), str(tuned), "-o", str(tmp_path / "e"), "--tau", "1.5"]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    assert main(["extract", str(base), str(tuned), "-o", str(tmp_path / "e"), "--rank", "0"]) == 2
    assert not (tmp_path / "e").exists()


def test_spectrum_layers_must_exist(pair, tmp_path, capsys):
    """--layers 99 on a 2-layer model was accepted (and plotted nothing)."""
    root, base, tuned = pair
    with pytest.raises(ReadaptError, match=r"--layers 99: no such layer; this model's layers are 0 to 1"):
        spectrum(base, tuned, tmp_path / "s", layers=[0, 99])
    assert main(["spectrum", str(base), str(tuned), "-o", str(tmp_path / "s"), "--layers", "1,7"]) == 2
    assert "--layers 7: no such layer" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    spectrum(base, tuned, tmp_path / "ok", layers=[1])
