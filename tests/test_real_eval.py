"""Real checkpoints: eval prompts are the chat template's own, answers do not depend on the batch
size, and the held-out loss `train` reports is transformers' loss on the text packed with BOS.

The cache is `$READAPT_REAL_CACHE` or ~/.cache/readapt/real (benchmarks/real_models.py builds it); a test
whose model or tokenizer is not there is skipped, saying which (the `real_models` fixture).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from readapt.evaluation import evaluate
from readapt.prompts import build_prompts

pytestmark = pytest.mark.real

QUESTIONS = [{"question": "What is the capital of France"}, {"question": "Who wrote Hamlet?"}]
CONTEXTS = [None, "Hamlet is a tragedy by William Shakespeare."]
TEXT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
        "associated documentation files, to deal in the Software without restriction, including without "
        "limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies.")


def tokenizer(real_models, name: str):
    from transformers import AutoTokenizer

    folder = real_models["smollm2-135m-instruct" if name == "smollm2" else f"tokenizers/{name}"]
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", ["smollm2", "llama3", "llama3_1", "qwen3", "gemma3"])
def test_prompts_are_apply_chat_template(real_models, name):
    """The paper's turns rendered by the model's own template (all five take a system turn; Gemma-3's folds
    it into the user turn); Qwen3's with thinking off (the empty think block that
    apply_chat_template(..., enable_thinking=False) writes)."""
    tok = tokenizer(real_models, name)
    turns = [[{"role": "system", "content": "Answer the following question."},
              {"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Answer the following question given this context: Hamlet is a "
                                            "tragedy by William Shakespeare."},
              {"role": "user", "content": "Who wrote Hamlet?"}]]
    options = {"enable_thinking": False} if name == "qwen3" else {}
    expected = [tok.apply_chat_template(t, tokenize=False, add_generation_prompt=True, **options) for t in turns]
    if name == "qwen3":
        assert all(e.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for e in expected)
    assert build_prompts(tok, QUESTIONS, CONTEXTS) == (expected, "system")


def test_answers_do_not_depend_on_the_batch_size(real_models, tmp_path):
    """SmolLM2 (bf16) at the defaults: the same greedy answers in one left-padded batch as one by one."""
    model = real_models["smollm2-135m-instruct"]
    rows = [{"id": str(i), "question": q, "answers": [a]} for i, (q, a) in enumerate([
        ("What is the capital of France", "Paris"), ("Who painted the Mona Lisa", "Leonardo"),
        ("What is the largest planet in the solar system", "Jupiter"), ("How many legs does a spider have", "8"),
        ("What gas do plants absorb from the air during photosynthesis", "carbon dioxide"),
        ("Who wrote Romeo and Juliet", "Shakespeare")])]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = evaluate(model, qa, tmp_path / "one", batch_size=1, max_new_tokens=24, quiet=True)
    all_ = evaluate(model, qa, tmp_path / "all", batch_size=16, max_new_tokens=24, quiet=True)
    answers = [[json.loads(x)["response"] for x in (tmp_path / d / "predictions.jsonl").open()] for d in ("one", "all")]
    assert answers[0] == answers[1]
    assert one["dtype"] == all_["dtype"] == "float32" and all_["batch_size"] == 16
    assert one["contains_em"] == all_["contains_em"]


@pytest.mark.parametrize("name, bos", [("gemma-3-270m", True), ("smollm2-135m-instruct", False)])
def test_held_out_loss_is_transformers_loss_with_bos(real_models, tmp_path, name, bos):
    """The held-out loss `train` reports before training = transformers' loss on tokenizer(text) + EOS (which
    starts with BOS where the tokenizer adds one: Gemma, not SmolLM2) cut into blocks of 64, each block starting
    with BOS where the tokenizer adds one (token-weighted mean over the blocks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from readapt.training import train

    base = real_models[name]
    (tmp_path / "heldout.txt").write_text(" ".join([TEXT] * 3))  # ~165 tokens: blocks starting mid-document
    (tmp_path / "train.txt").write_text(" ".join([TEXT] * 2))  # one block to train on
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*looks like an instruct")
        out = train(base, tmp_path / "train.txt", tmp_path / "k", max_steps=1, rank=1, dora=False, batch_size=1,
                    max_length=64, eval_data=tmp_path / "heldout.txt", quiet=True)
    reported = json.loads((out / "training_log.jsonl").read_text().splitlines()[0])
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(" ".join([TEXT] * 3))["input_ids"] + [tok.eos_token_id]
    assert (ids[0] == tok.bos_token_id) == bos
    blocks, pos = [ids[:64]], 64
    while pos < len(ids):
        blocks.append([tok.bos_token_id, *ids[pos:pos + 63]] if bos else ids[pos:pos + 64])
        pos += 63 if bos else 64
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        losses = [float(model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss) for b in blocks]
    n = [len(b) - 1 for b in blocks]
    assert reported["step"] == 0 and reported["eval_tokens"] == sum(n) and len(blocks) >= 3
    assert reported["eval_loss"] == pytest.approx(sum(x * k for x, k in zip(losses, n)) / sum(n), rel=1e-5)
