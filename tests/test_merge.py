"""extract (RE-Adapter) and merge (partial adaptation): exactness, PEFT parity, outputs, bad input."""

import hashlib
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import readapt
from readapt.errors import ReadaptError
from tests.tiny import perturb, read_all, save_tiny, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "gemma2"]


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of a bf16/fp16 tensor, in float32."""
    x = x.float().abs()
    info = torch.finfo(x.dtype if x.dtype != torch.float32 else torch.float32)
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x if info else None


def _ulp_of(t: torch.Tensor) -> torch.Tensor:
    nxt = torch.nextafter(t.abs(), torch.full_like(t, float("inf"), dtype=t.dtype))
    return (nxt.float() - t.abs().float())


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_float32_bit_exact(tmp_path, family):
    base = save_tiny(tmp_path / "base", family, max_shard_size="10KB")
    tuned = perturb(base, tmp_path / "tuned", scale=0.02, max_shard_size="10KB")
    before = _digest(base), _digest(tuned)
    delta = readapt.extract(base, tuned, tmp_path / "delta", max_shard_size="10KB")
    out = readapt.merge(base, tmp_path / "out", [(delta, 1.0)], max_shard_size="10KB")
    want, got = read_all(tuned), read_all(out)
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n
    assert (_digest(base), _digest(tuned)) == before  # inputs untouched
    # the delta folder: shards + index + manifest + card, nothing else
    files = sorted(os.listdir(delta))
    assert "readapt_delta.json" in files and "README.md" in files and "model.safetensors.index.json" in files
    assert all(f.endswith(".safetensors") for f in files if f not in
               ("readapt_delta.json", "README.md", "model.safetensors.index.json"))
    manifest = json.loads((delta / "readapt_delta.json").read_text())
    assert manifest["tensor_count"] == len(want) and manifest["delta_dtype"] == "float32"
    assert manifest["base"]["dtypes"] == ["float32"] and manifest["readapt_version"] == readapt.__version__
    # the merged folder is a complete model: config, generation config, tokenizer, chat template, card
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
              "model.safetensors.index.json", "chat_template.jinja"):
        assert (out / f).exists(), f
    assert "delta" in (out / "README.md").read_text()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roundtrip_16bit(tmp_path, dtype, capsys):
    base = save_tiny(tmp_path / "base", "llama", dtype=dtype)
    tuned = perturb(base, tmp_path / "tuned", scale=0.02)
    want = read_all(tuned)
    # default: float32 delta -> exact
    out = readapt.merge(base, tmp_path / "out", [(readapt.extract(base, tuned, tmp_path / "d32"), 1.0)])
    got = read_all(out)
    assert all(got[n].dtype == dtype and torch.equal(got[n], want[n]) for n in want)
    # compact delta stored in the checkpoint's dtype: within one ulp of max(|tuned|, |delta|)
    d16 = readapt.extract(base, tuned, tmp_path / "d16", dtype=dtype)
    got = read_all(readapt.merge(base, tmp_path / "out16", [(d16, 1.0)]))
    delta = read_all(d16)
    exact = total = 0
    for n in want:
        err = (got[n].float() - want[n].float()).abs()
        bound = _ulp_of(torch.maximum(want[n].float().abs(), delta[n].float().abs()).to(dtype))
        assert bool((err <= bound).all()), n
        exact += int((err == 0).sum())
        total += err.numel()
    with capsys.disabled():
        print(f"\n{dtype} delta stored in {dtype}: {100 * exact / total:.2f}% of elements exact")
    assert exact > 0.5 * total


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_roundtrip_is_bit_exact_where_float32_cannot_hold_the_difference(tmp_path, dtype):
    """Weights tuned to nearly zero (|Θ| < 2^-16·|Φ|) have a difference float32 cannot hold, so
    Φ + Δ ≠ Θ there (2 of 134.5M elements on a real SmolLM2 fine-tune). extract records them; merge gives Θ."""
    from safetensors.torch import load_file, save_file

    base = save_tiny(tmp_path / "base", "llama", dtype=dtype)
    tuned = perturb(base, tmp_path / "tuned", scale=0.02)
    f = sorted(tuned.glob("*.safetensors"))[0]
    sd = load_file(f)
    B = read_all(base)
    name = "model.layers.0.mlp.up_proj.weight"
    W = sd[name]
    tiny = 2.0 ** (-20 if dtype == torch.bfloat16 else -40)
    W.view(-1)[:40] = (B[name].view(-1)[:40].float() * tiny).to(dtype)  # tuned to nearly zero
    W.view(-1)[40] = -0.0  # a signed zero is a bit pattern too
    sd["model.norm.weight"][3] = B["model.norm.weight"][3] * tiny
    save_file(sd, f, metadata={"format": "pt"})
    want = read_all(tuned)
    delta = readapt.extract(base, tuned, tmp_path / "d")
    d = read_all(delta)[name].view(-1)
    naive = (B[name].view(-1).float() + d).to(dtype)
    planted = int((_bits(naive[:41]) != _bits(want[name].view(-1)[:41])).sum())
    assert planted >= 30  # these really are elements float32 cannot round-trip
    got = read_all(readapt.merge(base, tmp_path / "m1", [(delta, 1.0)]))
    for n in want:
        assert torch.equal(_bits(got[n]), _bits(want[n])), n
    manifest = json.loads((delta / "readapt_delta.json").read_text())
    assert manifest["exact"]["elements"] >= planted + 1
    assert set(manifest["exact"]["tensors"]) == {name, "model.norm.weight"}
    got = read_all(readapt.merge(base, tmp_path / "m0", [(delta, 0.0)]))
    assert all(torch.equal(_bits(got[n]), _bits(B[n])) for n in B)
    half = read_all(readapt.merge(base, tmp_path / "mh", [(delta, 0.5)]))[name].view(-1)
    lerp = torch.lerp(B[name].view(-1)[:41].float(), want[name].view(-1)[:41].float(), 0.5).to(dtype)
    assert torch.equal(half[:41], lerp)
    assert "bit for bit" in (delta / "README.md").read_text()
    # compress carries norms as tuned values: Θ, not Φ + Δ
    from safetensors.torch import load_file as load

    readapt.compress(delta, tmp_path / "c", rank=1)
    assert torch.equal(load(tmp_path / "c" / "adapter_model.safetensors")["base_model.model.model.norm.weight"],
                       want["model.norm.weight"])


def test_float32_tuned_over_bfloat16_base_warns_and_dtype_keeps_it(tmp_path):
    """A float32 fine-tune of a bfloat16 base was extracted and merged back into bfloat16 silently."""
    base = save_tiny(tmp_path / "base", "llama", dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 1e-4)  # below bf16's resolution for most weights
    model.save_pretrained(tmp_path / "tuned")
    with pytest.warns(UserWarning, match="float32 over the base's bfloat16.*merge --dtype float32"):
        delta = readapt.extract(base, tmp_path / "tuned", tmp_path / "d")
    for addend in (delta, tmp_path / "tuned"):
        with pytest.warns(UserWarning, match="carries float32 weights but the merged model is written in the "
                                             "base's bfloat16.*--dtype float32"):
            readapt.merge(base, tmp_path / f"m{len(os.listdir(tmp_path))}", [(addend, 1.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = read_all(readapt.merge(base, tmp_path / "m32", [(delta, 1.0)], dtype="float32"))
    want = read_all(tmp_path / "tuned")
    assert all(got[n].dtype == torch.float32 and torch.equal(got[n], want[n]) for n in want)


def test_full_checkpoint_addend_and_load(tmp_path):
    base = save_tiny(tmp_path / "base", "qwen2")
    inst = perturb(base, tmp_path / "inst", scale=0.05)
    out = readapt.merge(base, tmp_path / "out", [(inst, 0.5)])
    b, i, o = read_all(base), read_all(inst), read_all(out)
    for n in b:
        assert torch.equal(o[n], torch.lerp(b[n], i[n], 0.5)), n
    model = AutoModelForCausalLM.from_pretrained(out)  # strict load through transformers, no readapt
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in b.values())
    # negative scale subtracts; two addends sum
    out2 = readapt.merge(base, tmp_path / "out2", [(inst, 1.0), (inst, -1.0)])
    assert all(torch.equal(read_all(out2)[n], b[n]) for n in b)


def test_load_merged_matches_written_merge(tmp_path):
    base = save_tiny(tmp_path / "base", "gemma2")
    inst = perturb(base, tmp_path / "inst", scale=0.05)
    written = AutoModelForCausalLM.from_pretrained(readapt.merge(base, tmp_path / "out", [(inst, 0.75)]))
    model, tok = readapt.load_merged(base, [(inst, 0.75)])
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, written(ids).logits)
    assert tok is not None and tok.chat_template


def _lora(tmp_path, family="llama", **cfg):
    base = save_tiny(tmp_path / "base", family)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**cfg))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "magnitude" in n else 0.0) * p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter"


def _peft_merged(base, adapter) -> dict:
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return {k: v for k, v in m.merge_and_unload().state_dict().items()}


LORA_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora+patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3}),
    "embeddings": dict(r=4, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "k_proj"]),
    "bias": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"], lora_bias=True),
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_merge_equals_peft_merge_and_unload(tmp_path, case, capsys):
    family = "qwen2" if case == "bias" else "llama"
    base, adapter = _lora(tmp_path, family, **LORA_CASES[case])
    want = _peft_merged(base, adapter)
    got = read_all(readapt.merge(base, tmp_path / "out", [(adapter, 1.0)]))
    err = max((got[n] - want[n]).abs().max().item() for n in got)
    with capsys.disabled():
        print(f"\nLoRA[{case}] vs PEFT merge_and_unload: max abs error {err}")
    assert err == 0.0
    assert any(not torch.equal(got[n], read_all(base)[n]) for n in got)


def test_dora_partial_adaptation(tmp_path, capsys):
    base, adapter = _lora(tmp_path, "llama", r=4, lora_alpha=8, use_dora=True,
                          target_modules=["q_proj", "down_proj", "embed_tokens"])
    b = read_all(base)
    full = read_all(readapt.merge(base, tmp_path / "a1", [(adapter, 1.0)]))
    want = _peft_merged(base, adapter)
    err = max((full[n] - want[n]).abs().max().item() for n in full)
    with capsys.disabled():
        print(f"\nDoRA α=1 vs PEFT merge_and_unload: max abs error {err}")
    assert err == 0.0
    zero = read_all(readapt.merge(base, tmp_path / "a0", [(adapter, 0.0)]))
    assert all(torch.equal(zero[n], b[n]) for n in b)  # α=0 gives W₀ exactly (scaling s would not)
    half = read_all(readapt.merge(base, tmp_path / "a05", [(adapter, 0.5)]))
    for n in b:  # α=0.5: W₀ + 0.5·(W′ − W₀) with W′ PEFT's own merged weight
        assert torch.allclose(half[n], b[n] + 0.5 * (want[n] - b[n]), rtol=0, atol=1e-6), n
    # two adapters on one layer: the sum of their weight-space differences
    two = read_all(readapt.merge(base, tmp_path / "two", [(adapter, 0.5), (adapter, 0.25)]))
    for n in b:
        assert torch.allclose(two[n], b[n] + 0.75 * (want[n] - b[n]), rtol=0, atol=1e-6), n


# --- bad input ------------------------------------------------------------------------------------


def test_shape_and_config_mismatch(tmp_path):
    base = save_tiny(tmp_path / "base", "llama")
    wide = save_tiny(tmp_path / "wide", "llama", intermediate_size=48)
    with pytest.raises(ReadaptError, match="intermediate_size"):
        readapt.extract(base, wide, tmp_path / "d")
    other = save_tiny(tmp_path / "rope", "llama", rope_theta=5e5)
    with pytest.warns(UserWarning, match="rope"):
        readapt.extract(base, other, tmp_path / "d2")
    assert not (tmp_path / "d").exists()


def test_shape_mismatch_names_tensor_without_configs(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file({"w": torch.zeros(2, 3), "v": torch.zeros(2)}, tmp_path / "a" / "model.safetensors")
    save_file({"w": torch.zeros(3, 3), "v": torch.zeros(2)}, tmp_path / "b" / "model.safetensors")
    with pytest.raises(ReadaptError, match=r"tensor 'w' has shape \[2, 3\] in the base but \[3, 3\]"):
        readapt.extract(tmp_path / "a", tmp_path / "b", tmp_path / "d")


def test_one_sided_tensors_listed_and_skippable(tmp_path):
    from safetensors.torch import save_file

    for side, names in (("a", ["w", "only_a"]), ("b", ["w", "only_b"])):
        (tmp_path / side).mkdir()
        save_file({n: torch.ones(2) * (side == "b") for n in names}, tmp_path / side / "model.safetensors")
    with pytest.raises(ReadaptError, match="only in the base \\(only_a\\).*only in the tuned model \\(only_b\\)"):
        readapt.extract(tmp_path / "a", tmp_path / "b", tmp_path / "d")
    d = readapt.extract(tmp_path / "a", tmp_path / "b", tmp_path / "d", skip_missing=True)
    assert list(read_all(d)) == ["w"]
    assert json.loads((d / "readapt_delta.json").read_text())["skipped"] == ["only_a", "only_b"]


def test_adapter_for_another_architecture_or_version(tmp_path):
    """Shapes can agree by chance (a Llama LoRA fits a Qwen2 of the same sizes): refused by class; a patch
    made on another checkpoint of the same architecture only warns, pointing to `readapt port`."""
    base, adapter = _lora(tmp_path, "llama", r=2, lora_alpha=2, target_modules=["q_proj"])
    qwen = save_tiny(tmp_path / "qwen", "qwen2")
    with pytest.raises(ReadaptError, match="trained on a LlamaForCausalLM but the base is a Qwen2ForCausalLM"):
        readapt.merge(qwen, tmp_path / "out", [(adapter, 1.0)])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    v2 = perturb(base, tmp_path / "v2")
    with pytest.warns(UserWarning, match="readapt port"):
        readapt.merge(v2, tmp_path / "out", [(adapter, 1.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        readapt.merge(base, tmp_path / "out2", [(adapter, 1.0)])  # its own base: no warning
    assert (tmp_path / "out").exists()


def test_cli_bad_scale(tmp_path, capsys):
    from readapt.cli import main

    base = save_tiny(tmp_path / "base")
    with pytest.raises(SystemExit):
        main(["merge", str(base), "-o", str(tmp_path / "o"), "--add", f"{base}:abc"])
    assert "the scale 'abc'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_adapter_for_a_different_base(tmp_path):
    base, adapter = _lora(tmp_path, "llama", r=2, lora_alpha=2, target_modules=["q_proj"])
    other = save_tiny(tmp_path / "other", "llama", hidden_size=32, num_attention_heads=4)
    with pytest.raises(ReadaptError, match="different base.*q_proj.weight"):
        readapt.merge(other, tmp_path / "out", [(adapter, 1.0)])
    d = readapt.extract(base, perturb(base, tmp_path / "t"), tmp_path / "d")
    with pytest.raises(ReadaptError, match="hidden_size"):
        readapt.merge(other, tmp_path / "out", [(d, 1.0)])
    assert not (tmp_path / "out").exists()


def test_lm_head_factors_on_a_tied_base_are_named_as_such(tmp_path):
    """mergekit-extract-lora writes lm_head factors even when the base ties lm_head to embed_tokens (no
    lm_head.weight in the checkpoint): the refusal says so and what to do, not "a different base"."""
    tied = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    untied = save_tiny(tmp_path / "untied", "llama")  # same shapes, so PEFT writes lm_head factors
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(untied),
                           LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "lm_head"], lora_dropout=0.0))
    model.save_pretrained(tmp_path / "mk")
    cfg = json.loads((tmp_path / "mk" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tied)  # as mergekit records it
    (tmp_path / "mk" / "adapter_config.json").write_text(json.dumps(cfg))
    assert "lm_head.weight" not in read_all(tied)
    with pytest.raises(ReadaptError, match=r"changes lm_head.weight, but the base ties lm_head to embed_tokens "
                                           r"\(tie_word_embeddings.*--exclude-regex lm_head.*readapt extract") as err:
        readapt.merge(tied, tmp_path / "out", [(tmp_path / "mk", 1.0)])
    assert "different base" not in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_nan_found_or_produced(tmp_path):
    base = save_tiny(tmp_path / "base")
    tuned = perturb(base, tmp_path / "tuned")
    with pytest.raises(ReadaptError, match="finite real number"):
        readapt.merge(base, tmp_path / "out", [(tuned, float("inf"))])
    with pytest.raises(ReadaptError, match="finite real number"):  # finite in Python, inf in float32
        readapt.merge(base, tmp_path / "out", [(tuned, 1e300)])
    from safetensors.torch import load_file, save_file

    delta = readapt.extract(base, tuned, tmp_path / "d")
    sd = load_file(delta / "model.safetensors")
    sd["model.norm.weight"][0] = 3e38
    save_file(sd, delta / "model.safetensors")
    with pytest.raises(ReadaptError, match="'model.norm.weight' has NaN/Inf after adding"):
        readapt.merge(base, tmp_path / "out", [(delta, 2.0)])
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_not_an_adapter(tmp_path):
    base = save_tiny(tmp_path / "base")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ReadaptError, match="not an adapter"):
        readapt.merge(base, tmp_path / "out", [(tmp_path / "junk", 1.0)])


# --- CLI -------------------------------------------------------------------------------------------


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(*args):
    """Run the `readapt` command in-process (the same main() the console script calls)."""
    import contextlib
    import io

    from readapt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        code = main([str(a) for a in args])
    return _Result(code, out.getvalue(), err.getvalue())


def test_cli_extract_merge_and_errors(tmp_path):
    base = save_tiny(tmp_path / "base", "mistral", max_shard_size="10KB")
    tuned = perturb(base, tmp_path / "tuned", max_shard_size="10KB")
    base2, adapter = _lora(tmp_path / "x", "mistral", r=2, lora_alpha=4, target_modules=["o_proj"])
    r = _cli("extract", base, tuned, "-o", tmp_path / "delta")
    assert r.returncode == 0, r.stderr
    r = _cli("merge", base, "-o", tmp_path / "out", "--add", f"{tmp_path / 'delta'}:0.5", "--add", f"{adapter}:0.5")
    assert r.returncode == 0, r.stderr
    b, t, d = read_all(base), read_all(tuned), read_all(tmp_path / "delta")
    o = read_all(tmp_path / "out")
    assert not torch.equal(o["model.layers.0.self_attn.o_proj.weight"], b["model.layers.0.self_attn.o_proj.weight"] + 0.5 * d["model.layers.0.self_attn.o_proj.weight"])
    assert torch.equal(o["model.norm.weight"], b["model.norm.weight"].add(d["model.norm.weight"], alpha=0.5))
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # errors: one line, exit 2, nothing left behind
    r = _cli("merge", base, "-o", tmp_path / "out", "--add", tmp_path / "delta")
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    r = _cli("extract", base, tmp_path / "nope", "-o", tmp_path / "d2")
    assert r.returncode == 2 and "nope" in r.stderr and not (tmp_path / "d2").exists()
    r = _cli("merge", base, "-o", tmp_path / "o3")
    assert r.returncode == 2 and "--add" in r.stderr
    assert t  # tuned read


def test_cli_interrupt_leaves_nothing(tmp_path):
    """SIGINT in the middle of writing: exit 130, no output folder, no temporary sibling."""
    import signal
    import time

    base = save_tiny(tmp_path / "base", "llama", hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    tuned = perturb(base, tmp_path / "tuned")
    code = ("import time, readapt.checkpoint as c\n"
            "orig = c.write_tensors\n"
            "def slow(folder, plan, tensors, **kw):\n"
            "    def gen():\n"
            "        for x in tensors:\n"
            "            open(str(folder) + '/../started', 'w').close(); time.sleep(0.2); yield x\n"
            "    return orig(folder, plan, gen(), **kw)\n"
            "import readapt.delta; readapt.delta.write_tensors = slow\n"
            "from readapt.cli import main; raise SystemExit(main())\n")
    p = subprocess.Popen([sys.executable, "-c", code, "extract", str(base), str(tuned), "-o", str(tmp_path / "d")],
                         stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if (tmp_path / "started").exists():
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert sorted(os.listdir(tmp_path)) == ["base", "started", "tuned"]


def test_tiny_model_logits_after_merge(tmp_path):
    """merge at scale 1 of the instruct model's delta gives the instruct model's logits exactly."""
    base = save_tiny(tmp_path / "base", "qwen2")
    tuned = perturb(base, tmp_path / "tuned", scale=0.05)
    out = readapt.merge(base, tmp_path / "out", [(readapt.extract(base, tuned, tmp_path / "d"), 1.0)])
    ids = torch.tensor([[1, 9, 10, 11]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tuned)(ids).logits
    assert torch.equal(a, b)
    assert tiny_model  # helper import used by other tests


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_elementwise_merge_equals_whole_tensor(tmp_path, monkeypatch, dtype):
    """Extract and delta/checkpoint merges run in float32 blocks; block size must not change a single bit."""
    import readapt.checkpoint.reader as ck

    base = save_tiny(tmp_path / "base", "qwen2", dtype=dtype)
    inst = perturb(base, tmp_path / "inst", scale=0.05)
    delta = readapt.extract(base, inst, tmp_path / "d")
    adds = [[(delta, 1.0)], [(inst, 0.5)], [(delta, 0.5), (inst, 0.25)]]
    whole = [read_all(readapt.merge(base, tmp_path / f"w{i}", a)) for i, a in enumerate(adds)]
    half = read_all(readapt.extract(base, inst, tmp_path / "dh", dtype="bfloat16"))
    monkeypatch.setattr(ck, "BLOCK", 7)
    blocks = [read_all(readapt.merge(base, tmp_path / f"b{i}", a)) for i, a in enumerate(adds)]
    for d_whole, d_blocks in ((read_all(delta), read_all(readapt.extract(base, inst, tmp_path / "d7"))),
                              (half, read_all(readapt.extract(base, inst, tmp_path / "dh7", dtype="bfloat16")))):
        assert d_whole.keys() == d_blocks.keys() and all(torch.equal(d_whole[n], d_blocks[n]) for n in d_whole)
    b, d, t = read_all(base), read_all(delta), read_all(inst)
    for w, k in zip(whole, blocks):
        assert all(torch.equal(w[n], k[n]) for n in w)
    for n in b:  # and each equals its formula
        assert torch.equal(whole[0][n], t[n])
        assert torch.equal(whole[1][n], torch.lerp(b[n].float(), t[n].float(), 0.5).to(dtype))
        two = b[n].float().add_(d[n].mul(0.5).add_(t[n].float() - b[n].float(), alpha=0.25))
        assert torch.equal(whole[2][n], two.to(dtype))


def test_untouched_tensors_are_copied_in_blocks(tmp_path, monkeypatch):
    """A LoRA touching two modules: every other tensor is copied byte for byte, block by block, and a
    NaN found in a copied base tensor is still refused."""
    from safetensors.torch import load_file, save_file

    import readapt.checkpoint.reader as ck

    monkeypatch.setattr(ck, "COPY_BLOCK", 24)
    base, adapter = _lora(tmp_path, "llama", r=2, lora_alpha=2, target_modules=["q_proj"])
    got = read_all(readapt.merge(base, tmp_path / "out", [(adapter, 1.0)]))
    want = _peft_merged(base, adapter)
    assert all(torch.equal(got[n], want[n]) for n in got)
    sd = load_file(base / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ReadaptError, match="'model.layers.1.mlp.up_proj.weight' has NaN/Inf"):
        readapt.merge(base, tmp_path / "out2", [(adapter, 1.0)])
    assert not (tmp_path / "out2").exists()


def test_nan_in_a_touched_base_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from readapt.merging import iter_merged

    base = save_tiny(tmp_path / "base")
    delta = readapt.extract(base, perturb(base, tmp_path / "t"), tmp_path / "d")
    sd = load_file(base / "model.safetensors")
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ReadaptError, match="'model.norm.weight' of the base checkpoint .* has NaN/Inf"):
        readapt.merge(base, tmp_path / "out", [(delta, 0.5)])
    sd["model.norm.weight"][0] = 1e5  # overflows float16
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ReadaptError, match="'model.norm.weight' has NaN/Inf after adding"):
        readapt.merge(base, tmp_path / "out", [(delta, 0.0)], dtype="float16")
    with pytest.raises(ReadaptError, match="'model.norm.weight' has NaN/Inf after casting to torch.float16"):
        list(iter_merged(readapt.Checkpoint.open(base), [], torch.float16))
    assert not (tmp_path / "out").exists()


def test_an_adapter_is_not_a_base(tmp_path):
    base, adapter = _lora(tmp_path, "llama", r=2, lora_alpha=2, target_modules=["q_proj"])
    with pytest.raises(ReadaptError, match="is a PEFT adapter, not a model"):
        readapt.load_merged(adapter)
    delta = readapt.extract(base, perturb(base, tmp_path / "t"), tmp_path / "d")
    with pytest.raises(ReadaptError, match="is a delta folder, not a model"):
        readapt.merge(delta, tmp_path / "out", [(adapter, 1.0)])


def _edited_adapter(adapter, folder, drop=(), add=None, config=None):
    """A copy of a PEFT adapter folder with tensors removed/added and adapter_config.json fields changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, folder)
    sd = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if not k.endswith(tuple(drop))}
    save_file(sd | (add or {}), folder / "adapter_model.safetensors")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(cfg | (config or {})))
    return folder


def test_a_half_present_adapter_is_refused_naming_the_module(tmp_path):
    """Half an adapter used to merge silently: a module's lora_B without lora_A was skipped, use_dora without
    magnitudes merged as plain LoRA."""
    base, dora = _lora(tmp_path, "llama", r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj", "embed_tokens"])
    q0, emb = "model.layers.0.self_attn.q_proj", "model.embed_tokens"
    readapt.merge(base, tmp_path / "ok", [(dora, 1.0)])  # the whole adapter merges
    cases = {
        "no_A": (dict(drop=[f"{q0}.lora_A.weight"]), f"module {q0} has lora_B.weight but no lora_A.weight"),
        "no_B": (dict(drop=[f"{q0}.lora_B.weight"]), f"module {q0} has lora_A.weight but no lora_B.weight"),
        "no_emb_B": (dict(drop=[f"{emb}.lora_embedding_B"]), f"module {emb} has lora_embedding_A but no lora_embedding_B"),
        "no_m": (dict(drop=[f"{q0}.lora_magnitude_vector"]), f"module {q0} has no lora_magnitude_vector, but .*use_dora"),
        "no_emb_m": (dict(drop=[f"{emb}.lora_magnitude_vector"]), f"module {emb} has no lora_magnitude_vector"),
        "m_without_dora": (dict(config={"use_dora": False}), "has a lora_magnitude_vector but adapter_config.json does "
                                                             "not say use_dora"),
        "m_alone": (dict(drop=[f"{q0}.lora_A.weight", f"{q0}.lora_B.weight"]),
                    f"module {q0} has a lora_magnitude_vector but no lora_A/lora_B factors"),
        "bias_alone": (dict(add={f"base_model.model.{q0[:-7]}.k_proj.lora_B.bias": torch.ones(8)}),
                       r"k_proj has lora_B.bias but no lora_A/lora_B weights"),
    }
    base_p, plain = _lora(tmp_path / "plain", "llama", r=2, lora_alpha=2, target_modules=["q_proj"])
    readapt.merge(base_p, tmp_path / "ok_plain", [(plain, 1.0)])
    cases["lora_no_A"] = (dict(drop=[f"{q0}.lora_A.weight"]), f"module {q0} has lora_B.weight but no lora_A.weight")
    cases["lora_m"] = (dict(add={f"base_model.model.{q0}.lora_magnitude_vector": torch.ones(16)}),
                       f"module {q0} has a lora_magnitude_vector but adapter_config.json does not say use_dora")
    for name, (edit, match) in cases.items():
        bad = _edited_adapter(plain if name.startswith("lora_") else dora, tmp_path / name, **edit)
        before = _digest(bad)
        with pytest.raises(ReadaptError, match=match):
            readapt.merge(base_p if name.startswith("lora_") else base, tmp_path / "out", [(bad, 1.0)])
        assert not (tmp_path / "out").exists() and _digest(bad) == before, name


def test_extract_refuses_an_adapter_as_base_or_tuned(tmp_path):
    """extract used to accept a delta folder (or a PEFT adapter) as BASE and write TUNED - DELTA."""
    from readapt.lowrank import extract_lowrank
    from readapt.spectra import spectrum

    base, adapter = _lora(tmp_path, "llama", r=2, lora_alpha=2, target_modules=["q_proj"])
    tuned = perturb(base, tmp_path / "t")
    delta = readapt.extract(base, tuned, tmp_path / "d")
    for b, t, what in ((delta, tuned, "a delta folder"), (adapter, tuned, "a PEFT adapter"),
                       (base, delta, "a delta folder"), (base, adapter, "a PEFT adapter")):
        for job in (lambda: readapt.extract(b, t, tmp_path / "out"), lambda: extract_lowrank(b, t, tmp_path / "out", rank=1),
                    lambda: spectrum(b, t, tmp_path / "out")):
            with pytest.raises(ReadaptError, match=f"is {what}, not a model: BASE and TUNED must both be model "
                                                   f"checkpoints; .*readapt merge MODEL --add ADAPTER"):
                job()
            assert not (tmp_path / "out").exists()
    r = _cli("extract", delta, tuned, "-o", tmp_path / "out")
    assert r.returncode == 2 and "is a delta folder, not a model" in r.stderr and r.stderr.count("\n") == 1


def _ulps(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """(share of bit-identical elements, largest distance in units in the last place) of two float32 tensors."""
    def ordered(t):
        i = t.contiguous().view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    d = (ordered(a) - ordered(b)).abs()
    return float((d == 0).double().mean()), int(d.max())


ROW_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "down_proj", "embed_tokens", "lm_head"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True,
                 target_modules=["q_proj", "gate_proj", "down_proj", "embed_tokens", "lm_head"]),
    "tokens+saved": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                         trainable_token_indices={"embed_tokens": [4, 17, 40, 63]}),
}


@pytest.mark.parametrize("case", ROW_CASES)
def test_lora_and_dora_merge_in_row_blocks(tmp_path, monkeypatch, case, capsys):
    """LoRA/DoRA terms are merged in blocks of rows and no touched matrix of the base is read whole (forced
    here: BLOCK = 256 elements, so embed_tokens and lm_head, 64 × 16, merge in 4 blocks, gate_proj in 2).
    LoRA, DoRA on Linear layers (lm_head included: its norm is per output row), trainable tokens and
    modules_to_save: bit for bit PEFT's merge_and_unload. DoRA on an embedding of several blocks: the norm over
    the vocabulary is summed in float64 (PEFT: float32), so a share of elements differs in the last bits
    (measured and bounded here); whole_tensors=True gives PEFT's bits there too."""
    import readapt.checkpoint.reader as ck
    from readapt.checkpoint import Checkpoint, row_spans

    base = save_tiny(tmp_path / "base", "llama")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**ROW_CASES[case]))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("lora_", "trainable_tokens_delta", "modules_to_save")):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "magnitude" in n or "modules_to_save" in n else 0.0) * p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "adapter")
    want = _peft_merged(base, tmp_path / "adapter")
    b = read_all(base)
    monkeypatch.setattr(ck, "BLOCK", 256)
    emb, gate = "model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight"
    assert [len(row_spans(b[n].shape)) for n in (emb, gate)] == [4, 2]
    read, whole = Checkpoint.read, []

    def spy(self, name):
        if self.path == base and len(self.shape(name)) > 1:
            whole.append(name)
        return read(self, name)

    monkeypatch.setattr(Checkpoint, "read", spy)
    got = read_all(readapt.merge(base, tmp_path / "out", [(tmp_path / "adapter", 1.0)]))
    assert whole == []  # every touched matrix in row blocks
    changed = [n for n in got if not torch.equal(got[n], b[n])]
    assert emb in changed and "lm_head.weight" in changed
    for n in got:
        if case == "dora" and n == emb:
            share, ulp = _ulps(got[n], want[n])
            with capsys.disabled():
                print(f"\nDoRA embedding in 4 row blocks vs PEFT: {share:.1%} bit for bit, max {ulp} ulp")
            assert share > 0.5 and ulp <= 4
        else:
            assert torch.equal(got[n], want[n]), n
    if case == "dora":
        exact = read_all(readapt.merge(base, tmp_path / "whole", [(tmp_path / "adapter", 1.0)], whole_tensors=True))
        assert all(torch.equal(exact[n], want[n]) for n in want)
    if case == "lora":  # beside a full checkpoint on the same tensors: its rows are read beside the base's
        inst = perturb(base, tmp_path / "inst", scale=0.05)
        adds = [(tmp_path / "adapter", 0.5), (inst, 0.25)]
        rows = read_all(readapt.merge(base, tmp_path / "mixed", adds))
        assert whole == []
        monkeypatch.setattr(Checkpoint, "read", read)
        whole_merge = read_all(readapt.merge(base, tmp_path / "mixed_whole", adds, whole_tensors=True))
        assert all(torch.equal(rows[n], whole_merge[n]) for n in rows)


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, monkeypatch):
    """The writer sums the plan (tensors and headers) and refuses when the file system has less free: one
    line saying how much is needed, nothing written, for extract and merge; the CLI exits 2."""
    import re
    import shutil

    base = save_tiny(tmp_path / "base", "llama")
    inst = perturb(base, tmp_path / "inst")
    tensors = sum(t.numel() * t.element_size() for t in read_all(base).values())  # what a merge writes
    free = {"bytes": tensors}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, free["bytes"]))
    with pytest.raises(ReadaptError, match=rf"^not enough disk space: the output needs [\d.]+ KB but the file "
                                           rf"system of {tmp_path} has {tensors / 1e3:.3g} KB free; free space") as err:
        readapt.merge(base, tmp_path / "m", [(inst, 0.5)])
    need = float(re.search(r"needs ([\d.]+) KB", str(err.value)).group(1)) * 1e3
    assert tensors < need < tensors + 4000  # the tensors and the header
    r = _cli("extract", base, inst, "-o", tmp_path / "d")
    assert r.returncode == 2 and "not enough disk space: the output needs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "inst"]  # nothing written, nothing left
    free["bytes"] = int(need) + 100
    assert read_all(readapt.merge(base, tmp_path / "m", [(inst, 0.5)]))
