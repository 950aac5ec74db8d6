"""readapt.training: knowledge adapters trained on unlabeled text, on a tiny Llama on CPU."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import torch
from tests.tiny import read_all, save_tiny, tiny_tokenizer

from readapt.errors import ReadaptError
from readapt.textdata import pack
from readapt.training import train
from readapt.userfiles import read_texts

FAST = dict(rank=8, alpha=16, lr=2e-2, batch_size=4, max_length=16, quiet=True)


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    """No instruct-model warnings from tests/tiny.py's chat template; one thread (tiny matrices gain
    nothing from more, and lose a lot when other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*looks like an instruct")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pretrained Llama (hidden 32, tokenizer without chat template) and a learnable corpus."""
    root = tmp_path_factory.mktemp("train")
    base = save_tiny(root / "base", "llama", hidden_size=32, intermediate_size=64)
    for f in base.glob("chat_template*"):
        f.unlink()
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    with open(root / "data.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": " ".join(f"w{(i + j) % 12}" for j in range(20))}) + "\n")
            if i % 5 == 0:
                f.write("\n")  # blank lines are skipped
    (root / "heldout.txt").write_text(" ".join(f"w{j % 12}" for j in range(70)))
    return root


def adapter(folder) -> dict[str, torch.Tensor]:
    return read_all(folder)


def test_pack_puts_eos_between_documents_and_drops_the_tail():
    tok = tiny_tokenizer()
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("w1", "w2", "w3", "w4", "</s>")}
    blocks, tail = pack(["w1 w2", "w3", "w4 w1"], tok, 3)
    eos = ids["</s>"]
    assert blocks.tolist() == [[ids["w1"], ids["w2"], eos], [ids["w3"], eos, ids["w4"]]]
    assert tail.tolist() == [ids["w1"], eos]


def _adds(tok, bos: bool, eos: bool = False):
    """`tok` with a post-processor that adds BOS (and EOS) the way Llama/Gemma tokenizers do."""
    from tokenizers import processors

    single = " ".join([*(["<s>"] if bos else []), "$A", *(["</s>"] if eos else [])])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    return tok


def test_pack_adds_bos_where_the_tokenizer_does():
    """BOS doc EOS BOS doc EOS ... cut into blocks that all start with BOS (one inside a document gets BOS +
    max_length - 1 tokens); a tokenizer that ends a document with EOS itself gets no second one."""
    tok = _adds(tiny_tokenizer(), bos=True)
    bos, eos, w = tok.bos_token_id, tok.eos_token_id, {i: tok.convert_tokens_to_ids(f"w{i}") for i in range(5)}
    assert tok("w1 w2")["input_ids"] == [bos, w[1], w[2]]  # what the model is fed at inference
    docs = ["w1 w2 w3 w4 w0", "w3", "w2"]
    blocks, tail = pack(docs, tok, 4)
    assert blocks.tolist() == [[bos, w[1], w[2], w[3]], [bos, w[4], w[0], eos], [bos, w[3], eos, bos]]
    assert tail.tolist() == [bos, w[2], eos]
    both = _adds(tiny_tokenizer(), bos=True, eos=True)
    again = pack(docs, both, 4)
    assert torch.equal(again[0], blocks) and torch.equal(again[1], tail)
    blocks, tail = pack(docs, tok, 3)  # a block boundary right at a document's BOS: no second BOS
    assert blocks.tolist() == [[bos, w[1], w[2]], [bos, w[3], w[4]], [bos, w[0], eos], [bos, w[3], eos],
                               [bos, w[2], eos]] and tail.numel() == 0
    assert pack(docs, tok, 20)[0].shape == (0, 20)
    assert pack(["w1 </s>"], tok, 8)[1].tolist() == [bos, w[1], eos, eos]  # an EOS in the text is the text's


def bos_blocks(ids: list[int], bos: int, n: int) -> list[list[int]]:
    """One document's ids (BOS first) cut into blocks of n that all start with BOS, the last one shorter."""
    out, pos = [ids[:n]], n
    while pos < len(ids):
        out.append([bos, *ids[pos:pos + n - 1]])
        pos += n - 1
    return out


def test_held_out_loss_is_transformers_loss_on_the_text_with_bos(world, tmp_path):
    """The loss `train` reports before training is plain transformers' loss on BOS text EOS, cut into blocks
    that each start with BOS (token-weighted mean over the blocks)."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(world / "base", base)
    tok = _adds(tiny_tokenizer(), bos=True)
    tok.save_pretrained(base)
    text = " ".join(f"w{j % 12}" for j in range(40))
    (tmp_path / "heldout.txt").write_text(text)
    out = train(base, world / "data.jsonl", tmp_path / "k", max_steps=1, eval_data=tmp_path / "heldout.txt", **FAST)
    before = json.loads((out / "training_log.jsonl").read_text().splitlines()[0])
    blocks = bos_blocks(tok(text)["input_ids"] + [tok.eos_token_id], tok.bos_token_id, FAST["max_length"])
    assert [len(b) for b in blocks] == [16, 16, 12]  # BOS + 40 words + EOS: 42 tokens and 2 BOS more
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        losses = [float(model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss) for b in blocks]
    assert before["eval_tokens"] == sum(len(b) - 1 for b in blocks)
    expected = sum(loss * (len(b) - 1) for loss, b in zip(losses, blocks)) / before["eval_tokens"]
    assert before["eval_loss"] == pytest.approx(expected, rel=1e-6)


def test_read_texts_jsonl_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "w1 w2"}\n\n{"text": "", "id": 3}\n{"text": "w3", "x": 1}\n')
    (tmp_path / "b.txt").write_text("w1 w2\n\nw3\n")
    assert read_texts(tmp_path / "a.jsonl") == ["w1 w2", "w3"]
    assert read_texts(tmp_path / "b.txt") == ["w1 w2\n\nw3\n"]


def test_loss_falls_log_card_and_peft_reload(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from readapt.textdata import load_blocks
    from readapt.trainmodel import heldout_loss

    out = train(world / "base", world / "data.jsonl", tmp_path / "k", max_steps=12, dropout=0.0,
                eval_data=world / "heldout.txt", **FAST)
    assert out == tmp_path / "k"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                    "adapter_model.safetensors", "training_log.jsonl"]
    assert not (tmp_path / "k.partial").exists()  # checkpoints are gone after success
    log = [json.loads(l) for l in (out / "training_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["step"] for r in evals] == [0, 12]
    assert all(r["tokens"] == r["step"] * 4 * 16 for r in steps)
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.25, (first, last)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] - 0.25, evals
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert sorted(m.rsplit(".", 1)[-1] for m in cfg["target_modules"]) == sorted(linear * 2)  # not lm_head
    card = (out / "README.md").read_text()
    assert "data.jsonl" in card and "12 optimizer steps of 4 blocks" in card and f"{12 * 4 * 16:,} tokens seen" in card
    assert f"{evals[1]['eval_loss']:.4f}" in card

    # the saved adapter, reloaded by PEFT alone, scores the held-out text exactly as the trained model did
    tok_blocks, tail, _ = load_blocks([world / "heldout.txt"], tiny_tokenizer(), 16)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "base"), out).eval()
    from accelerate import Accelerator

    again = heldout_loss(model, tok_blocks, tail, 4, Accelerator(cpu=True))
    assert again["eval_loss"] == pytest.approx(evals[1]["eval_loss"], abs=1e-6)
    assert again["eval_tokens"] == evals[1]["eval_tokens"] == 4 * 15 + 6  # 70 words + EOS = 4 blocks of 16 + a tail of 7


def test_same_seed_same_adapter_other_seed_other_adapter(world, tmp_path):
    a = adapter(train(world / "base", world / "data.jsonl", tmp_path / "a", max_steps=3, seed=7, **FAST))
    b = adapter(train(world / "base", world / "data.jsonl", tmp_path / "b", max_steps=3, seed=7, **FAST))
    c = adapter(train(world / "base", world / "data.jsonl", tmp_path / "c", max_steps=3, seed=8, **FAST))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_micro_batches_and_gradient_checkpointing_give_the_same_adapter(world, tmp_path):
    kw = dict(FAST, max_steps=3, dropout=0.0, dora=False)
    a = adapter(train(world / "base", world / "data.jsonl", tmp_path / "a", **kw))
    b = adapter(train(world / "base", world / "data.jsonl", tmp_path / "b", micro_batch_size=1, **kw))
    c = adapter(train(world / "base", world / "data.jsonl", tmp_path / "c", gradient_checkpointing=True,
                      **dict(kw, dropout=0.05, dora=True)))
    d = adapter(train(world / "base", world / "data.jsonl", tmp_path / "d", **dict(kw, dropout=0.05, dora=True)))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    for k in c:  # with dropout: the recomputed forward pass replays the same dropout masks
        torch.testing.assert_close(c[k], d[k], atol=1e-5, rtol=1e-4)


def test_resume_equals_uninterrupted(world, tmp_path):
    kw = dict(FAST, max_steps=7, save_every=2, data=world / "data.jsonl", eval_data=world / "heldout.txt")
    full = train(world / "base", out=tmp_path / "full", **kw)

    def stop_at_5(record):
        if record.get("step") == 5 and "loss" in record:
            raise KeyboardInterrupt

    out, partial = tmp_path / "cut", tmp_path / "cut.partial"
    with pytest.raises(KeyboardInterrupt):
        train(world / "base", out=out, callback=stop_at_5, **kw)
    assert not out.exists() and not list(tmp_path.glob(".cut*"))  # no half-written output
    assert [p.name for p in partial.glob("step-*")] == ["step-000004"]
    with pytest.raises(ReadaptError, match="--resume"):
        train(world / "base", out=out, **kw)
    with pytest.raises(ReadaptError, match="lr"):
        train(world / "base", out=out, resume=True, **dict(kw, lr=1e-3))
    train(world / "base", out=out, resume=True, **kw)
    assert not partial.exists()
    a, b = adapter(full), adapter(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_full = [json.loads(l) for l in (full / "training_log.jsonl").read_text().splitlines()]
    log_cut = [json.loads(l) for l in (out / "training_log.jsonl").read_text().splitlines()]
    drop = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}  # noqa: E731
    assert [drop(r) for r in log_cut] == [drop(r) for r in log_full]  # no step twice, same losses


def test_overwrite_with_checkpoints_starts_over(world, tmp_path):
    def stop(record):
        if record.get("step") == 3:
            raise KeyboardInterrupt

    kw = dict(FAST, max_steps=4, save_every=2)
    with pytest.raises(KeyboardInterrupt):  # before the first checkpoint: nothing to resume, nothing left
        train(world / "base", world / "data.jsonl", tmp_path / "o", callback=lambda r: stop(dict(r, step=3)), **kw)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        train(world / "base", world / "data.jsonl", tmp_path / "o", callback=stop, **kw)
    assert [p.name for p in tmp_path.iterdir()] == ["o.partial"]
    out = train(world / "base", world / "data.jsonl", tmp_path / "o", overwrite=True, **kw)
    ref = train(world / "base", world / "data.jsonl", tmp_path / "ref", **kw)
    a, b = adapter(out), adapter(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_instruct_warning(world, tmp_path):
    inst = tmp_path / "tiny-Instruct"
    shutil.copytree(world / "base", inst)
    kw = dict(FAST, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pretrained base: no warning at all from readapt
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        train(world / "base", world / "data.jsonl", tmp_path / "a", **kw)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train(inst, world / "data.jsonl", tmp_path / "b", **kw)
    assert any("instruct" in str(x.message) and "tiny-Instruct" in str(x.message) for x in w)
    chat = save_tiny(tmp_path / "pretrained", "llama")  # tests/tiny.py's tokenizer has a chat template
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train(chat, world / "data.jsonl", tmp_path / "c", **kw)
    assert any("chat template" in str(x.message) for x in w)


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("", "no JSON lines"),
    ('{"text": ""}\n', "contains no text"),
    ('{"text": "w1"}\n{"txt": "w2"}\n', r"bad\.jsonl:2: missing key\(s\) \['text'\]"),
    ('{"text": "w1"}\n\n{"text": "w2"\n', r"bad\.jsonl:3: malformed JSON"),
    ('{"text": ["w1"]}\n', r'bad\.jsonl:1: "text" is a list'),
    ('{"text": "w1 w2 w3"}\n', "fewer tokens than one block of max_length=16"),
])
def test_bad_data(world, tmp_path, content, match):
    bad = tmp_path / "in" / "bad.jsonl"
    bad.parent.mkdir()
    if content is not None:
        bad.write_text(content)
    with pytest.raises(ReadaptError, match=match):
        train(world / "base", bad, tmp_path / "out", max_steps=1, **{k: v for k, v in FAST.items()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written


def test_bad_arguments(world, tmp_path):
    data = world / "data.jsonl"
    (tmp_path / "exists").mkdir()
    (tmp_path / "c.csv").write_text("text\nw1\n")
    cases = [
        (dict(out=tmp_path / "exists"), "already exists"),
        (dict(data=tmp_path / "c.csv"), "unknown data format '.csv'"),
        (dict(max_length=1000), r"max_length=1000 exceeds .*max_position_embeddings=64"),
        (dict(micro_batch_size=3), "micro_batch_size=3 does not divide"),
        (dict(rank=0), "rank=0"),
        (dict(eval_data=tmp_path / "missing.txt"), "missing.txt does not exist"),
        (dict(base=tmp_path / "nowhere"), "does not exist"),
        (dict(out=world, overwrite=True), "overlaps the input"),  # would delete the data with the old output
    ]
    for change, match in cases:
        kw = dict(FAST, base=world / "base", data=data, out=tmp_path / "new", max_steps=1) | change
        with pytest.raises(ReadaptError, match=match):
            train(**kw)
        assert not (tmp_path / "new").exists() and not (tmp_path / "new.partial").exists()
    assert (tmp_path / "exists").is_dir() and not any((tmp_path / "exists").iterdir())


def _snapshot(root) -> dict:
    """Every path under root with its bytes (None for folders): to show that nothing was touched."""
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def test_checkpoint_dir_that_is_not_readapts_is_refused_and_left_alone(world, tmp_path):
    """--checkpoint-dir used to be deleted whatever it held (a folder of notes, the base model, the data)."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    data = tmp_path / "corpus"
    data.mkdir()
    shutil.copy(world / "data.jsonl", data / "data.jsonl")
    (tmp_path / "a-file").write_text("not a folder")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "run.json").write_text('{"step": 3}')  # a run.json, but not readapt's
    cases = [
        (notes, "was not made by readapt train"),
        (fake, "was not made by readapt train"),
        (tmp_path / "a-file", "was not made by readapt train"),
        (world / "base", "overlaps"),  # is an input
        (data, "overlaps"),  # holds an input
        (world / "base" / "ckpt", "overlaps"),  # lies inside an input
        (tmp_path / "out" / "ckpt", "overlaps"),  # lies inside the output
        (tmp_path, "overlaps"),  # holds the output and an input
    ]
    before, base_before = _snapshot(tmp_path), _snapshot(world)
    for folder, match in cases:
        with pytest.raises(ReadaptError, match=match):
            train(world / "base", data / "data.jsonl", tmp_path / "out", checkpoint_dir=folder, overwrite=True,
                  max_steps=2, save_every=1, **FAST)
        assert _snapshot(tmp_path) == before and _snapshot(world) == base_before, folder
    from readapt.cli import main

    assert main(["train", str(world / "base"), "--data", str(data / "data.jsonl"), "-o", str(tmp_path / "out"),
                 "--checkpoint-dir", str(world / "base"), "--max-steps", "1", "--quiet"]) == 2
    assert _snapshot(world) == base_before


def test_checkpoint_dir_removal_spares_what_readapt_did_not_write(world, tmp_path):
    """An empty folder given as --checkpoint-dir is used and kept; files put into readapt's own checkpoint
    folder during training are kept (with the folder); only readapt's files go."""
    mine = tmp_path / "mine"
    mine.mkdir()
    kw = dict(FAST, max_steps=3, save_every=1)
    train(world / "base", world / "data.jsonl", tmp_path / "a", checkpoint_dir=mine, **kw)
    assert mine.is_dir() and not any(mine.iterdir())

    def drop_a_note(record):
        if record.get("step") == 1:
            (tmp_path / "b.partial" / "notes.txt").write_text("mine")

    train(world / "base", world / "data.jsonl", tmp_path / "b", callback=drop_a_note, **kw)
    assert sorted(p.name for p in (tmp_path / "b.partial").iterdir()) == ["notes.txt"]
    assert (tmp_path / "b").is_dir()


@pytest.mark.parametrize("change, flag", [
    (dict(alpha=float("nan")), "--alpha=nan"), (dict(alpha=float("inf")), "--alpha=inf"), (dict(alpha=0), "--alpha=0"),
    (dict(lr=float("inf")), "--lr=inf"), (dict(lr=float("nan")), "--lr=nan"), (dict(lr=2.0), "--lr=2.0"),
    (dict(micro_batch_size=-1), "--micro-batch-size=-1"), (dict(micro_batch_size=0), "--micro-batch-size=0"),
    (dict(dropout=float("nan")), "--dropout=nan"), (dict(dropout=1.0), "--dropout=1.0"),
    (dict(epochs=float("inf"), max_steps=None), "--epochs=inf"), (dict(max_steps=0), "--max-steps=0"),
    (dict(max_steps=1.5), "--max-steps=1.5"), (dict(rank=True), "--rank=True"), (dict(rank=2.0), "--rank=2.0"),
    (dict(batch_size=-4), "--batch-size=-4"), (dict(max_length=1), "--max-length=1"),
    (dict(warmup_steps=-1), "--warmup-steps=-1"), (dict(weight_decay=float("nan")), "--weight-decay=nan"),
    (dict(max_grad_norm=-1.0), "--max-grad-norm=-1.0"), (dict(max_grad_norm=float("inf")), "--max-grad-norm=inf"),
    (dict(save_every=-1), "--save-every=-1"), (dict(seed=-1), "--seed=-1"), (dict(seed=2**32), "--seed=4294967296"),
])
def test_numeric_settings_are_checked_up_front(world, tmp_path, change, flag):
    with pytest.raises(ReadaptError, match=f"^{re.escape(flag)}: must be"):
        train(world / "base", world / "data.jsonl", tmp_path / "out", **dict(FAST, max_steps=2) | change)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_non_finite_flags(world, tmp_path, capfd):
    from readapt.cli import main

    head = ["train", str(world / "base"), "--data", str(world / "data.jsonl"), "-o", str(tmp_path / "k"),
            "--max-steps", "1", "--batch-size", "4", "--max-length", "16", "--quiet"]
    for flags in (["--alpha", "nan"], ["--alpha", "inf"], ["--lr", "inf"], ["--micro-batch-size", "-1"]):
        capfd.readouterr()
        assert main(head + flags) == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and f"error: {flags[0]}={flags[1]}" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_diverged_adapter_is_not_written(world, tmp_path):
    """alpha 1e300 is a finite number, but s = alpha/r is infinite in float32: the factors turn NaN."""
    with pytest.raises(ReadaptError, match="training diverged: .*lora_.* has NaN/Inf values.*nothing was written"):
        train(world / "base", world / "data.jsonl", tmp_path / "nan", **dict(FAST, alpha=1e300, max_steps=3, dora=False))
    assert list(tmp_path.iterdir()) == []


def test_cli(world, tmp_path, capfd):
    """--quiet: no transformers 'Loading weights' bar."""
    from readapt.cli import main

    args = ["train", str(world / "base"), "--data", str(world / "data.jsonl"), "--data", str(world / "heldout.txt"),
            "-o", str(tmp_path / "k"), "--rank", "2", "--alpha", "4", "--no-dora", "--max-steps", "2",
            "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "16", "--lr", "1e-3", "--quiet"]
    capfd.readouterr()
    assert main(args) == 0
    assert "Loading weights" not in capfd.readouterr().err
    cfg = json.loads((tmp_path / "k" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["use_dora"] is False
    assert "heldout.txt" in (tmp_path / "k" / "README.md").read_text()
    assert main(args) == 2
    assert "already exists" in capfd.readouterr().err


def test_two_processes_train_what_one_does(world, tmp_path):
    """DDP through accelerate (2 CPU processes, gloo, as `accelerate launch` would start them): the global
    batch is split over the processes, so the adapter equals the single-process one."""
    import os
    import subprocess
    import sys

    kw = dict(rank=4, alpha=8, dropout=0.0, dora=False, lr=2e-2, max_steps=3, batch_size=4, max_length=16)
    one = adapter(train(world / "base", world / "data.jsonl", tmp_path / "one", quiet=True, **kw))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items() if k != "dora"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "readapt",
         "train", str(world / "base"), "--data", str(world / "data.jsonl"), "-o", str(tmp_path / "two"),
         "--no-dora", "--micro-batch-size=1", "--save-every=2", *flags],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es) x 2 micro-batch(es) of 1" in run.stderr
    two = adapter(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4)


def test_lora_model_has_no_deprecation_chatter(world):
    """peft 0.21 reads transformers 5's deprecated model.is_gradient_checkpointing; lora_model hides that
    one FutureWarning (it showed once per adapter in the demo's output)."""
    from readapt.trainmodel import lora_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_model(world / "base", rank=2, alpha=4, dora=False, progress_bar=False)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
