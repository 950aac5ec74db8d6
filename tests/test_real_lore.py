"""Real checkpoints: a LoRE adapter is one model however it is loaded, and base + 1.0·Δ is the
tuned model bit for bit, on SmolLM2-135M-Instruct and Gemma-3-270m (both tie lm_head to the embeddings).

Runs on the cache that benchmarks/real_models.py builds ($READAPT_REAL_CACHE, default ~/.cache/readapt/real)
and is skipped, saying so, where a model is not built. Select it with `pytest -m real`.
"""

import json
import warnings

import pytest
import torch

pytestmark = pytest.mark.real

PAIRS = {"smollm2": ("smollm2-135m-instruct", "smollm2-135m-tuned"), "gemma3": ("gemma-3-270m", "gemma-3-270m-tuned")}
TEXT = "Permission is hereby granted, free of charge, to any person obtaining a copy"


@pytest.fixture(scope="module", params=sorted(PAIRS))
def real(request, real_models):
    """(name, base folder, tuned folder, input ids of a short real text)."""
    from transformers import AutoTokenizer

    base, tuned = (real_models[name] for name in PAIRS[request.param])
    ids = AutoTokenizer.from_pretrained(base)(TEXT, return_tensors="pt").input_ids
    return request.param, base, tuned, ids


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("rule", [{"tau": 0.5}, {"rank": 16}], ids=["tau0.5", "rank16"])
def test_lore_adapter_is_one_model_unmerged_merged_and_through_readapt(real, rule, tmp_path, capsys):
    """Unmerged PEFT, PEFT's merge_and_unload and readapt's merge give the same logits within float32 rounding
    (before the fix the embedding LoRA of these tied models made unmerged PEFT differ by 0.7-1.0 logits)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from readapt.lowrank import extract_lowrank
    from readapt.merging import load_merged

    name, base, tuned, ids = real
    out = tmp_path / "lore"
    extract_lowrank(base, tuned, out, **rule)  # default: the tied embedding as trainable tokens
    ours = _logits(load_merged(base, [(out, 1.0)], dtype="float32")[0], ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)
    unmerged = _logits(pm, ids)
    merged = _logits(pm.merge_and_unload(), ids)
    scale = float(ours.abs().max())
    gaps = float((unmerged - ours).abs().max()), float((merged - ours).abs().max())
    with capsys.disabled():
        print(f"\n{name} {rule}: max |logit| {scale:.1f}; unmerged vs readapt "
              f"{gaps[0]:.2e}, merge_and_unload vs readapt {gaps[1]:.2e}")
    # float32 rounding: measured ≤ 5e-6·max|logit| (unmerged PEFT sums x·Aᵀ·Bᵀ apart); the bug was ~1 logit
    assert max(gaps) <= 5e-5 * max(scale, 1.0)


def test_delta_round_trip_is_bit_exact(real, tmp_path, capsys):
    """base + 1.0·Δ gives every tensor of the tuned model bit for bit, including the elements whose difference
    float32 cannot hold (recorded by extract with their tuned values)."""
    from readapt import extract, merge
    from readapt.checkpoint import Checkpoint

    name, base, tuned, _ = real
    delta = extract(base, tuned, tmp_path / "delta")
    out = merge(base, tmp_path / "merged", [(delta, 1.0)])
    got, want = Checkpoint.open(out), Checkpoint.open(tuned)
    assert got.names == want.names or sorted(got.names) == sorted(want.names)
    for n in want.names:
        a, b = got.read(n), want.read(n)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), n
    exact = json.loads((delta / "readapt_delta.json").read_text())["exact"]
    with capsys.disabled():
        print(f"\n{name}: {exact['elements']} of {exact['of']:,} elements kept as tuned values (float32 cannot hold "
              f"their difference)")
