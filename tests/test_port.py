"""readapt port (PortLLM): a patch made on version 1 carried to version 2, checked tensor by tensor."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from tests.tiny import VOCAB, config_of, perturb, read_all, save_tiny

import readapt.checkpoint.reader as reader
from readapt.cli import main
from readapt.delta import extract
from readapt.errors import ReadaptError
from readapt.cards import port_summary
from readapt.merging import merge
from readapt.porting import port

EXTRA = ["<|im_start|>", "<|im_end|>", "x0", "x1", "x2", "x3"]


def tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def grown(path, seed=5):
    """A "version 2" with 6 more tokens inserted after the special tokens: every old word moves to id + 6."""
    vocab = VOCAB[:4] + EXTRA + VOCAB[4:]
    save_tiny(path, "llama", seed=seed, vocab_size=len(vocab))
    tokenizer(vocab).save_pretrained(path)
    return path, {w: i for i, w in enumerate(vocab)}


def lora(base, out, targets, dora=False, seed=0, **kw):
    """A PEFT LoRA/DoRA adapter on `base` with random (nonzero) B and, for DoRA, moved magnitudes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, **kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_()
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.rand_like(p))
            if "modules_to_save" in n:
                p.add_(0.1)
    model.save_pretrained(out)
    return out


def factors(adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (B, A) as stored in the adapter file (embeddings: lora_embedding_B, lora_embedding_A)."""
    t = read_all(adapter)
    out = {}
    for k in t:
        for a, b in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            if k.endswith(a):
                mod = k[len("base_model.model."):-len(a) - 1]
                out[mod] = (t[k[: -len(a)] + b], t[k])
    return out


def peft_merged(base, adapter) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def statuses(report) -> dict[str, str]:
    return {m["name"]: m["status"] for m in report["modules"]}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    d = tmp_path_factory.mktemp("versions")
    v1 = save_tiny(d / "v1", "llama")
    v2 = perturb(v1, d / "v2", scale=0.05, seed=2)
    ad = lora(v1, d / "lora", "all-linear")
    return v1, v2, ad


def test_merged_port_is_new_base_plus_sBA_exactly_and_equals_peft(versions, tmp_path):
    v1, v2, ad = versions
    report = port(ad, v2, tmp_path / "merged", merge=True)
    assert report["counts"] == {"carried": 14, "adjusted": 0, "skipped": 0}
    got, new = read_all(tmp_path / "merged"), read_all(v2)
    F = factors(ad)
    assert len(F) == 14 and set(got) == set(new)
    for name, W in new.items():
        mod = name.removesuffix(".weight")
        ref = W + (F[mod][0] @ F[mod][1]) * 2.0 if mod in F else W  # s = alpha / r = 8 / 4
        assert (got[name] - ref).abs().max().item() == 0, name
    assert json.loads((tmp_path / "merged" / "port_report.json").read_text())["counts"]["carried"] == 14
    assert config_of(tmp_path / "merged") == config_of(v2)

    port(ad, v2, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(v2.absolute())
    peft = peft_merged(v2, tmp_path / "adapter")
    assert all((peft[k] - got[k]).abs().max().item() == 0 for k in got)


@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_drift_statistics_match_a_direct_computation(versions, chunk, monkeypatch):
    """Patched tensors are compared whole, unpatched ones in blocks read from disk: both give the direct
    float64 computation (chunk=7 runs every tensor through several partial blocks)."""
    monkeypatch.setattr(reader, "BLOCK", chunk)
    v1, v2, ad = versions
    report = port(ad, v2, None, from_=v1)  # report only
    W1, W2, F = read_all(v1), read_all(v2), factors(ad)
    name = "model.layers.1.self_attn.q_proj.weight"
    D = (W2[name] - W1[name]).double()
    P = ((F[name[:-7]][0] @ F[name[:-7]][1]) * 2.0).double()
    row = report["drift"]["tensors"][name]
    assert row["drift"] == pytest.approx(float(D.norm() / W1[name].double().norm()), rel=1e-6)
    assert row["patch_to_drift"] == pytest.approx(float(P.norm() / D.norm()), rel=1e-6)
    assert row["cos_patch_drift"] == pytest.approx(float((P * D).sum() / (P.norm() * D.norm())), rel=1e-6, abs=1e-9)
    assert "patch_to_drift" not in report["drift"]["tensors"]["model.norm.weight"]  # no patch there
    layer = [n for n in W1 if ".layers.0." in n]
    d2 = sum(float((W2[n] - W1[n]).double().square().sum()) for n in layer)
    w2 = sum(float(W1[n].double().square().sum()) for n in layer)
    assert report["drift"]["layers"]["layer 0"]["drift"] == pytest.approx(math.sqrt(d2 / w2), rel=1e-6)
    n = "model.norm.weight"
    assert report["drift"]["tensors"][n]["drift"] == pytest.approx(float((W2[n] - W1[n]).double().norm()
                                                                         / W1[n].double().norm()), rel=1e-6)
    assert "layer 1" in port_summary(report)


def test_grown_vocabulary_rows_follow_token_strings(tmp_path):
    v1 = save_tiny(tmp_path / "v1", "llama")
    v2, ids2 = grown(tmp_path / "v2")
    ad = lora(v1, tmp_path / "ad", ["q_proj", "embed_tokens", "lm_head"])
    assert any("base_layer" in k for k in read_all(ad))  # PEFT saved copies of v1's embeddings
    report = port(ad, v2, tmp_path / "merged", merge=True)
    st = statuses(report)
    assert st["model.embed_tokens.weight"] == st["lm_head.weight"] == "adjusted"
    assert report["vocabulary"]["shared_tokens"] == 64 and report["vocabulary"]["new_tokens"] == 6
    assert report["vocabulary"]["moved_tokens"] == 60  # every word moved up by 6; the 4 special tokens stayed
    assert "60 of them moved to another id" in port_summary(report)
    got, new, F = read_all(tmp_path / "merged"), read_all(v2), factors(ad)
    head = (F["lm_head"][0] @ F["lm_head"][1]) * 2.0  # 64×16 on v1's ids
    emb = (F["model.embed_tokens"][0] @ F["model.embed_tokens"][1]).T * 2.0
    for i, w in enumerate(VOCAB):  # old id i, new id j: the same token string
        j = ids2[w]
        assert (got["lm_head.weight"][j] - (new["lm_head.weight"][j] + head[i])).abs().max().item() == 0
        E = "model.embed_tokens.weight"
        assert (got[E][j] - (new[E][j] + emb[i])).abs().max().item() == 0
    for w in EXTRA:  # new tokens: no patch
        assert torch.equal(got["lm_head.weight"][ids2[w]], new["lm_head.weight"][ids2[w]])
        assert torch.equal(got["model.embed_tokens.weight"][ids2[w]], new["model.embed_tokens.weight"][ids2[w]])

    port(ad, v2, tmp_path / "adapter")
    assert not any("base_layer" in k for k in read_all(tmp_path / "adapter"))
    rows = torch.tensor([ids2[w] for w in VOCAB])  # drift of a vocabulary tensor: over the shared tokens
    W1 = read_all(v1)["lm_head.weight"]
    d = port(ad, v2, None, from_=v1)["drift"]["tensors"]["lm_head.weight"]
    D = (new["lm_head.weight"][rows] - W1).double()
    assert d["drift"] == pytest.approx(float(D.norm() / W1.double().norm()), rel=1e-6)
    assert d["cos_patch_drift"] == pytest.approx(float((head.double() * D).sum() / (head.double().norm() * D.norm())),
                                                 rel=1e-5, abs=1e-9)
    peft = peft_merged(v2, tmp_path / "adapter")
    assert all((peft[k] - got[k]).abs().max().item() == 0 for k in got)


def test_missing_tokenizer_skips_vocabulary_rows_and_strict_refuses(tmp_path):
    v1 = save_tiny(tmp_path / "v1", "llama")
    v2, _ = grown(tmp_path / "v2")
    (v2 / "tokenizer.json").unlink()
    ad = lora(v1, tmp_path / "ad", ["v_proj", "lm_head"])
    report = port(ad, v2, tmp_path / "out", merge=True)
    st = statuses(report)
    assert st["lm_head.weight"] == "skipped" and st["model.layers.0.self_attn.v_proj.weight"] == "carried"
    assert "tokenizer is missing" in next(m["why"] for m in report["modules"] if m["name"] == "lm_head.weight")
    assert torch.equal(read_all(tmp_path / "out")["lm_head.weight"], read_all(v2)["lm_head.weight"])
    with pytest.raises(ReadaptError, match="--strict"):
        port(ad, v2, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_chat_vector_delta_port_equals_merging_the_ported_delta(tmp_path):
    v1 = save_tiny(tmp_path / "v1", "llama")
    inst = perturb(v1, tmp_path / "inst", scale=0.02, seed=3)
    delta = extract(v1, inst, tmp_path / "delta")
    v2, ids2 = grown(tmp_path / "v2")
    report = port(delta, v2, tmp_path / "ported")
    assert report["counts"]["adjusted"] == 2 and report["counts"]["skipped"] == 0
    assert report["old_base"]["source"].startswith("the base recorded")
    port(delta, v2, tmp_path / "merged", merge=True)
    merge(v2, tmp_path / "merged2", [(tmp_path / "ported", 1.0)])  # the ported delta is an ordinary delta folder
    got, got2, new = read_all(tmp_path / "merged"), read_all(tmp_path / "merged2"), read_all(v2)
    D = read_all(delta)
    assert all(torch.equal(got[k], got2[k]) for k in got)
    for name, W in new.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            rows = torch.tensor([ids2[w] for w in VOCAB])
            assert (got[name][rows] - (W[rows] + D[name])).abs().max().item() == 0
        else:
            assert (got[name] - (W + D[name])).abs().max().item() == 0, name


def test_dora_magnitude_is_rescaled_to_the_new_row_norms(versions, tmp_path):
    v1, v2, _ = versions
    ad = lora(v1, tmp_path / "dora", ["q_proj", "v_proj"], dora=True, modules_to_save=["norm"])
    report = port(ad, v2, tmp_path / "adapter", from_=v1)
    st = statuses(report)
    assert st["model.layers.0.self_attn.q_proj.weight"] == "adjusted" and st["model.norm.weight"] == "adjusted"
    W1, W2, old, new = read_all(v1), read_all(v2), read_all(ad), read_all(tmp_path / "adapter")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    W = "model.layers.1.self_attn.v_proj.weight"
    ref = old[key] * (torch.linalg.norm(W2[W], dim=1) / torch.linalg.norm(W1[W], dim=1))
    assert torch.equal(new[key], ref)
    norm = "base_model.model.model.norm.weight"  # modules_to_save copy: new + (copy - old)
    assert torch.equal(new[norm], W2["model.norm.weight"] + (old[norm] - W1["model.norm.weight"]))
    port(ad, v2, tmp_path / "merged", from_=v1, merge=True)
    got, peft = read_all(tmp_path / "merged"), peft_merged(v2, tmp_path / "adapter")
    assert max((peft[k] - got[k]).abs().max().item() for k in got) < 1e-6

    same = port(ad, v1, tmp_path / "same", from_=v1)  # onto its own base: m unchanged
    assert torch.equal(read_all(tmp_path / "same")[key], old[key]) and same["counts"]["skipped"] == 0

    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")  # old base unknown: m verbatim, copies skipped
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    blind = port(ad, v2, tmp_path / "blind")
    assert torch.equal(read_all(tmp_path / "blind")[key], old[key])
    assert any("DoRA magnitudes carried verbatim" in w for w in blind["warnings"])
    assert statuses(blind)["model.norm.weight"] == "skipped"


def test_renamed_modules_are_rekeyed(versions, tmp_path):
    v1, v2, ad = versions
    src = tmp_path / "renamed"
    src.mkdir()
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some/multimodal-v1"  # not available: names alone must match
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file({k.replace("model.model.layers.", "model.model.language_model.layers."): v
               for k, v in read_all(ad).items()}, src / "adapter_model.safetensors")
    report = port(src, v2, tmp_path / "adapter")
    assert report["counts"]["carried"] == 14
    assert all("re-keyed from model.language_model.layers" in m["why"] for m in report["modules"])
    out = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert out["target_modules"].startswith("^(") and "model\\.layers\\.0\\.self_attn\\.q_proj" in out["target_modules"]
    assert set(read_all(tmp_path / "adapter")) == set(read_all(ad))
    port(src, v2, tmp_path / "merged", merge=True)
    got, peft = read_all(tmp_path / "merged"), peft_merged(v2, tmp_path / "adapter")
    assert all((peft[k] - got[k]).abs().max().item() == 0 for k in got)
    assert all(torch.equal(got[k], read_all(tmp_path / "merged")[k]) for k in got)


def test_refusals_leave_no_output(versions, tmp_path):
    v1, v2, ad = versions
    gemma = save_tiny(tmp_path / "gemma", "gemma2")
    with pytest.raises(ReadaptError, match="gemma2"):
        port(ad, gemma, tmp_path / "o1", merge=True)
    wide = save_tiny(tmp_path / "wide", "llama", hidden_size=32, intermediate_size=64)
    with pytest.raises(ReadaptError, match="nothing in .* can be carried") as err:
        port(ad, wide, tmp_path / "o2")
    assert err.value.report["counts"]["skipped"] == 14 and "skipped" in str(err.value)
    bad = tmp_path / "bad"
    shutil.copytree(ad, bad)
    from safetensors.torch import save_file

    save_file({k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qq_proj"): v
               for k, v in read_all(ad).items()}, bad / "adapter_model.safetensors")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ReadaptError, match="match no module.*qq_proj"):
        port(bad, v2, tmp_path / "o3")
    with pytest.raises(ReadaptError, match="LlamaForCausalLM but .* Gemma2ForCausalLM"):  # old base unknown
        port(bad, gemma, tmp_path / "o3")
    with pytest.raises(ReadaptError, match="does not fit the old base"):
        port(ad, v2, tmp_path / "o4", from_=wide)
    with pytest.raises(ReadaptError, match="readapt extract"):
        port(v1, v2, tmp_path / "o5")
    with pytest.raises(ReadaptError, match="overlaps the input"):  # never over an input, even with overwrite
        port(ad, v2, v1, merge=True, overwrite=True)
    assert (v1 / "model.safetensors").is_file()
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
    assert not [p for p in tmp_path.iterdir() if ".readapt-tmp" in p.name]


def test_config_warnings_tied_embeddings_and_gemma(tmp_path):
    v1 = save_tiny(tmp_path / "v1", "llama")
    inst = perturb(v1, tmp_path / "inst", scale=0.02, seed=3)
    delta = extract(v1, inst, tmp_path / "delta")
    v2 = save_tiny(tmp_path / "v2", "llama", seed=4, tie_word_embeddings=True,
                   rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    report = port(delta, v2, tmp_path / "out", merge=True)
    st = statuses(report)
    assert st["lm_head.weight"] == "skipped"
    assert "ties lm_head" in next(m["why"] for m in report["modules"] if m["name"] == "lm_head.weight")
    assert st["model.embed_tokens.weight"] == "carried"
    text = " ".join(report["warnings"])
    assert "rope_parameters" in text and "tie_word_embeddings" in text
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a loadable model folder

    t1 = save_tiny(tmp_path / "t1", "llama", tie_word_embeddings=True)  # tied v1 -> untied v1 (the other way)
    td = extract(t1, perturb(t1, tmp_path / "ti", scale=0.02, seed=3), tmp_path / "td")
    rep = port(td, v1, tmp_path / "untied", merge=True)
    assert any("the new lm_head gets no patch" in w for w in rep["warnings"])
    assert torch.equal(read_all(tmp_path / "untied")["lm_head.weight"], read_all(v1)["lm_head.weight"])

    g1 = save_tiny(tmp_path / "g1", "gemma2")
    g2 = perturb(g1, tmp_path / "g2", scale=0.05, seed=6)
    gi = perturb(g1, tmp_path / "gi", scale=0.02, seed=7)
    gd = extract(g1, gi, tmp_path / "gd")
    rep = port(gd, g2, tmp_path / "gout", merge=True)
    assert rep["counts"]["skipped"] == 0 and rep["warnings"] == []
    got, W, D = read_all(tmp_path / "gout"), read_all(g2), read_all(gd)
    assert "lm_head.weight" not in got  # tied: one matrix
    E = "model.embed_tokens.weight"
    assert (got[E] - (W[E] + D[E])).abs().max().item() == 0


def test_cli(versions, tmp_path, capsys):
    v1, v2, ad = versions
    assert main(["port", str(ad), "--to", str(v2), "--from", str(v1), "-o", str(tmp_path / "m"), "--merge"]) == 0
    out = capsys.readouterr().out
    assert "14 carried" in out and "drift" in out and (tmp_path / "m" / "port_report.json").is_file()
    assert main(["port", str(ad), "--to", str(v2), "--dry-run"]) == 0
    assert "dry run: nothing written" in capsys.readouterr().out
    assert main(["port", str(ad), "--to", str(v2), "-o", str(tmp_path / "m")]) == 2  # exists
    assert main(["port", str(ad), "--to", str(v2)]) == 2  # no -o
    assert "-o OUTPUT" in capsys.readouterr().err


def test_other_shape_changes_are_skipped_and_the_adapter_still_loads(versions, tmp_path):
    v1, _, ad = versions
    v2 = save_tiny(tmp_path / "v2", "llama", seed=8, intermediate_size=48)  # a version with a wider MLP
    report = port(ad, v2, tmp_path / "adapter")
    assert report["counts"] == {"carried": 8, "adjusted": 0, "skipped": 6}
    skipped = [m for m in report["modules"] if m["status"] == "skipped"]
    assert all(".mlp." in m["name"] and "in the patch but" in m["why"] and "48" in m["why"] for m in skipped)
    assert any("intermediate_size" in w for w in report["warnings"])
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "mlp" not in cfg["target_modules"] and len(cfg["rank_pattern"]) == 8
    port(ad, v2, tmp_path / "merged", merge=True)
    got, new, peft = read_all(tmp_path / "merged"), read_all(v2), peft_merged(v2, tmp_path / "adapter")
    assert all((peft[k] - got[k]).abs().max().item() == 0 for k in got)
    assert all(torch.equal(got[k], new[k]) for k in got if ".mlp." in k)
    with pytest.raises(ReadaptError, match="--strict: 6 tensors"):
        port(ad, v2, tmp_path / "strict", merge=True, strict=True)


def test_a_from_of_another_architecture_is_named(versions, tmp_path):
    v1, v2, ad = versions
    qwen = save_tiny(tmp_path / "qwen", "qwen2")
    with pytest.raises(ReadaptError, match="the old base --from .*qwen is a 'qwen2' model"):
        port(ad, v2, tmp_path / "out", from_=qwen)
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_named(versions, tmp_path, capsys):
    """Each path error names its argument; adapters/deltas as --to or --from, --dtype without --merge, an
    output under a file and a NaN in the patch are refused; nothing is written."""
    v1, v2, ad = versions
    delta = extract(v1, v2, tmp_path / "delta")
    for kw, match in (({"to": tmp_path / "nope"}, "--to .*nope"), ({"from_": tmp_path / "nope"}, "--from .*nope"),
                      ({"patch": tmp_path / "nope"}, "PATCH .*nope"), ({"to": delta}, "--to .* is a delta folder"),
                      ({"from_": ad}, "--from .* is a PEFT adapter"), ({"dtype": "bfloat16"}, "only with --merge")):
        args = {"patch": ad, "to": v2, **kw}
        with pytest.raises(ReadaptError, match=match):
            port(args.pop("patch"), args.pop("to"), tmp_path / "o", **args)
    (tmp_path / "file").write_text("x")
    assert main(["port", str(ad), "--to", str(v2), "-o", str(tmp_path / "file" / "o")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    nan = tmp_path / "nan"
    shutil.copytree(ad, nan)
    t = read_all(ad)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(t, nan / "adapter_model.safetensors")
    with pytest.raises(ReadaptError, match="the patch .*nan has NaN/Inf values in .*q_proj.lora_B.*adapter_model"):
        port(nan, v2, tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta", "file", "nan"]


def test_pickled_new_base_needs_allow_pickle(versions, tmp_path):
    v1, v2, ad = versions
    binary = tmp_path / "v2bin"
    binary.mkdir()
    shutil.copy(v2 / "config.json", binary)
    torch.save(read_all(v2), binary / "pytorch_model.bin")
    with pytest.raises(ReadaptError, match="--allow-pickle"):
        port(ad, binary, tmp_path / "o", merge=True)
    port(ad, binary, tmp_path / "o", merge=True, allow_pickle=True)
    port(ad, v2, tmp_path / "ref", merge=True)
    got, ref = read_all(tmp_path / "o"), read_all(tmp_path / "ref")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    pickled = tmp_path / "adbin"  # a PEFT adapter saved with safe_serialization=False
    shutil.copytree(ad, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(read_all(ad), pickled / "adapter_model.bin")
    with pytest.raises(ReadaptError, match="--allow-pickle"):
        port(pickled, v2, tmp_path / "o2", merge=True)
    port(pickled, v2, tmp_path / "o2", merge=True, allow_pickle=True)
    merge(v2, tmp_path / "o3", [(pickled, 1.0)], allow_pickle=True)
    for out in ("o2", "o3"):
        got = read_all(tmp_path / out)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_warnings_a_user_needs(versions, tmp_path):
    """Rows carried by id without tokenizers, a --from that is not the recorded base, the same checkpoint on
    both sides, untied -> tied embeddings; and re-keyed tensors are counted in the summary."""
    v1, v2, ad = versions
    head = lora(v1, tmp_path / "head", ["q_proj", "lm_head"])
    bare = tmp_path / "bare"  # v2 without its tokenizer: same vocabulary size, ids cannot be checked
    shutil.copytree(v2, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    report = port(head, bare, None)
    assert any(w.startswith("lm_head.weight carried row for row by token id") for w in report["warnings"])
    assert not any("by token id" in w for w in port(head, v2, None)["warnings"])
    report = port(ad, v2, None, from_=v2)
    assert any("is not the base recorded in the patch" in w for w in report["warnings"])
    assert any("the same checkpoint" in w for w in report["warnings"])
    assert not any("recorded" in w for w in port(ad, v2, None, from_=v1)["warnings"])
    tied = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    emb = lora(v1, tmp_path / "emb", ["embed_tokens"])
    assert any("now also changes the output layer" in w for w in port(emb, tied, None, from_=v1)["warnings"])
    renamed = tmp_path / "renamed"
    shutil.copytree(v2, renamed)
    from safetensors.torch import save_file

    save_file({k.replace("model.", "model.language_model.", 1): v for k, v in read_all(v2).items()},
              renamed / "model.safetensors", metadata={"format": "pt"})
    assert "re-keyed: 14 tensors" in port_summary(port(ad, renamed, None))


def test_drift_layers_in_numeric_order(tmp_path):
    v1 = save_tiny(tmp_path / "v1", "llama", num_hidden_layers=12)
    v2 = perturb(v1, tmp_path / "v2", scale=0.05, seed=2)
    ad = lora(v1, tmp_path / "ad", ["q_proj"])
    layers = [k for k in port(ad, v2, None, from_=v1)["drift"]["layers"] if k.startswith("layer ")]
    assert layers == [f"layer {i}" for i in range(12)]


# --- vocabularies of two tokenizer conventions ----------------------------------------------------------

# Llama-2-like SentencePiece BPE (▁ = space, characters, byte fallback <0xNN>) and Llama-3-like byte-level
# BPE (GPT-2 byte map: Ġ = space, every character one byte). 'ä' is the character ä (C3 A4) on the left and
# the byte E4 on the right; ▁with and Ġwith are both " with". (18 rows each: no vocabulary size that equals a
# dimension of the tiny model, which port would take for a vocabulary tensor.)
SP_VOCAB = ["<unk>", "<s>", "</s>", "<0x41>", "<0xE4>", "<0x20>", "<0xC3>", "▁", "A", "a", "ä", "▁with", "▁the",
            "with", "x", "é", "▁Öl", "▁x"]
BL_VOCAB = ["<|begin_of_text|>", "<s>", "</s>", "A", "a", "ä", "Ã¤", "Ġwith", "Ġthe", "with", "Ġ", "x", "Ã©", "Ã",
            "!", "ĠÃĸl", "Ġx", "b"]
# new (byte-level) token -> old (SentencePiece) token of the same text; None: no patch
SP_TO_BL = {"<|begin_of_text|>": None, "<s>": "<s>", "</s>": "</s>", "A": "A", "a": "a", "ä": "<0xE4>", "Ã¤": "ä",
            "Ġwith": "▁with", "Ġthe": "▁the", "with": "with", "Ġ": "▁", "x": "x", "Ã©": "é", "Ã": "<0xC3>",
            "!": None, "ĠÃĸl": "▁Öl", "Ġx": "▁x", "b": None}


def sp_tokenizer(vocab):
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE({w: i for i, w in enumerate(vocab)}, [], unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def bl_tokenizer(vocab, decoder=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE({w: i for i, w in enumerate(vocab)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoder or decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="</s>",
                                   additional_special_tokens=["<s>"])


def version(path, vocab, make, seed=0, **kw):
    save_tiny(path, "llama", seed=seed, vocab_size=len(vocab))
    make(vocab, **kw).save_pretrained(path)
    return path


def test_rows_follow_the_text_a_token_stands_for_across_tokenizer_conventions(tmp_path):
    """SentencePiece -> byte-level: rows go by the text each token stands for in its own tokenizer, never by a
    string that stands for other text ('ä'); ▁with gets Ġwith's row. Byte-level -> SentencePiece the other way."""
    v1 = version(tmp_path / "sp", SP_VOCAB, sp_tokenizer)
    v2 = version(tmp_path / "bl", BL_VOCAB, bl_tokenizer, seed=5)
    ad = lora(v1, tmp_path / "ad", ["q_proj", "embed_tokens", "lm_head"])
    report = port(ad, v2, tmp_path / "merged", merge=True)
    got, new, F = read_all(tmp_path / "merged"), read_all(v2), factors(ad)
    head = (F["lm_head"][0] @ F["lm_head"][1]) * 2.0
    emb = (F["model.embed_tokens"][0] @ F["model.embed_tokens"][1]).T * 2.0
    old_id = {w: i for i, w in enumerate(SP_VOCAB)}
    for j, w in enumerate(BL_VOCAB):
        i = old_id[SP_TO_BL[w]] if SP_TO_BL[w] else None
        for name, P in (("lm_head.weight", head), ("model.embed_tokens.weight", emb)):
            want = new[name][j] + P[i] if i is not None else new[name][j]
            assert (got[name][j] - want).abs().max().item() == 0, (w, name)
    v = report["vocabulary"]
    assert (v["matched_by_string"], v["matched_by_text"], v["same_string_other_text"],
            v["other_text_matched_by_text"], v["new_tokens"], v["same_convention"]) == (6, 9, 1, 1, 3, False)
    assert v["old_convention"].startswith("SentencePiece") and v["new_convention"].startswith("byte-level")
    text = port_summary(report)
    assert "15 shared tokens carried" in text and "(6 by identical string, 9 by identical text" in text
    assert "different conventions" in text and "1 tokens with the same string stand for other text" in text

    from transformers import AutoTokenizer  # every carried pair decodes to the same text in its own tokenizer

    t1, t2 = AutoTokenizer.from_pretrained(v1), AutoTokenizer.from_pretrained(v2)
    for w, o in SP_TO_BL.items():
        if o and o not in ("<s>", "</s>"):
            assert t2.convert_tokens_to_string(["a", w, "a"]) == t1.convert_tokens_to_string(["a", o, "a"]), w

    back = port(lora(v2, tmp_path / "ad2", ["lm_head"]), v1, None)["vocabulary"]  # byte-level -> SentencePiece
    assert (back["matched_by_string"], back["matched_by_text"], back["same_text_not_paired"]) == (6, 9, 2)
    # <0x41> ("A": its old row went to A) and <0x20> (" ": Ġ went to ▁, a piece before a byte) get no row


def test_token_text_equals_the_tokenizers_own_decoding():
    """readapt.vocab decodes one token as the `tokenizers` decoders do in mid-sequence, for each convention
    it reads (checked on every token whose text is valid UTF-8; the others are single bytes)."""
    from tokenizers import Tokenizer, decoders, models

    from readapt.vocab import Decoding

    words = ["a", "▁with", "Ġwith", "##ing", "with", "<0xE4>", "<0x41>", "ä", "Ã¤", ".", "'s", "n't", "x</w>", "▁▁",
             "Ċ", "▁", " ", "<0x20>"]
    cases = [decoders.ByteLevel(), decoders.Metaspace(), decoders.WordPiece(cleanup=True),
             decoders.WordPiece(prefix="##", cleanup=False), decoders.BPEDecoder(suffix="</w>"), None,
             decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                decoders.Strip(" ", 1, 0)]),
             decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")]),
             decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0), decoders.Fuse()])]
    for dec in cases:
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
        tok.decoder = dec
        d = Decoding(json.loads(dec.__getstate__()) if dec is not None else None)
        assert d.known, dec
        first, pair = tok.decode([0]), tok.decode([0, 0])
        checked = 0
        for i, w in enumerate(words):
            text, _ = d.text(w)
            try:
                s = text.decode()
            except UnicodeDecodeError:
                assert len(text) == 1 and text[0] >= 0x80  # a lone byte: the library shows U+FFFD
                continue
            assert tok.decode([0, i, 0]) == first + s + pair[len(first):], (dec and dec.__getstate__(), w)
            checked += 1
        assert checked >= len(words) - 3
    bl = Decoding(json.loads(decoders.ByteLevel().__getstate__()))
    assert bl.text("ä") == (b"\xe4", False) and bl.text("Ġwith") == (b" with", False) and bl.text("<|x|>")[0] == b"<|x|>"
    sp = Decoding(json.loads(cases[6].__getstate__()))
    assert sp.text("<0xE4>") == (b"\xe4", True) and sp.text("ä") == ("ä".encode(), False)
    assert not Decoding({"type": "CTC", "pad_token": "<pad>", "word_delimiter_token": "|", "cleanup": True}).known


def test_tokenizers_whose_decoder_is_not_read_are_not_compared(tmp_path):
    """A decoder readapt does not read (CTC) on one side: the vocabulary rows are skipped, with why; the
    same unread decoder on both sides: rows by token string."""
    from tokenizers import decoders

    v1 = version(tmp_path / "sp", SP_VOCAB, sp_tokenizer)
    ctc = version(tmp_path / "ctc", BL_VOCAB, bl_tokenizer, decoder=decoders.CTC())
    ad = lora(v1, tmp_path / "ad", ["q_proj", "lm_head"])
    report = port(ad, ctc, None)
    why = next(m["why"] for m in report["modules"] if m["name"] == "lm_head.weight")
    assert statuses(report)["lm_head.weight"] == "skipped" and "cannot be compared" in why and "CTC" in why
    ctc1 = version(tmp_path / "ctc1", BL_VOCAB[:-1], bl_tokenizer, decoder=decoders.CTC())
    ad1 = lora(ctc1, tmp_path / "ad1", ["lm_head"])
    v = port(ad1, ctc, None)["vocabulary"]
    assert v["matched_by_string"] == v["shared_tokens"] == 17 and v["same_convention"]


def test_lm_head_factors_made_on_a_tied_old_base(tmp_path):
    """mergekit-extract-lora writes lm_head factors for tied models: the old base (--from or recorded) is
    still used, and the lm_head entry is skipped saying why and what to do."""
    tied = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    tied2 = perturb(tied, tmp_path / "tied2", scale=0.05)
    ad = lora(save_tiny(tmp_path / "untied", "llama"), tmp_path / "mk", ["q_proj", "lm_head"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tied)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    for from_ in (tied, None):
        report = port(ad, tied2, None, from_=from_)
        assert report["old_base"]["path"] == str(tied.resolve())
        why = next(m["why"] for m in report["modules"] if m["name"] == "lm_head.weight")
        assert statuses(report)["lm_head.weight"] == "skipped" and "the old base ties lm_head" in why
        assert "--exclude-regex lm_head" in why and report["counts"]["carried"] == 2


def test_port_merge_from_computes_the_patch_in_row_blocks(versions, tmp_path, monkeypatch):
    """port --merge --from: the drift statistics and the merge compute a LoRA patch in blocks of rows (forced:
    BLOCK = 256 elements, so embed_tokens and lm_head, 64 × 16, take 4 blocks, gate_proj 2): no matrix of
    either base that the patch touches is read whole; the merged model is the whole-tensor merge bit for bit
    (and PEFT's), the drift statistics agree with the default block size to rounding."""
    from readapt.checkpoint import Checkpoint

    v1, v2, _ = versions
    ad = lora(v1, tmp_path / "ad", ["gate_proj", "q_proj", "embed_tokens", "lm_head"])
    whole = port(ad, v2, tmp_path / "whole", from_=v1, merge=True, whole_tensors=True)
    monkeypatch.setattr(reader, "BLOCK", 256)
    read, seen = Checkpoint.read, []

    def spy(self, name):
        if self.path in (v1, v2) and len(self.shape(name)) > 1:
            seen.append(name)
        return read(self, name)

    monkeypatch.setattr(Checkpoint, "read", spy)
    rows = port(ad, v2, tmp_path / "rows", from_=v1, merge=True)
    assert seen == []
    got, want = read_all(tmp_path / "rows"), read_all(tmp_path / "whole")
    assert all(torch.equal(got[k], want[k]) for k in want)
    port(ad, v2, tmp_path / "adapter")
    peft = peft_merged(v2, tmp_path / "adapter")
    assert all(torch.equal(got[k], peft[k]) for k in got)
    assert rows["drift"]["tensors"].keys() == whole["drift"]["tensors"].keys()
    for n, row in whole["drift"]["tensors"].items():
        for stat, value in row.items():
            other = rows["drift"]["tensors"][n][stat]
            assert other == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), (n, stat)
