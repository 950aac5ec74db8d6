"""Real tokenizers: a port carries a vocabulary row only to a token that stands for the same text.

Tiny Llama models (hidden size 8) whose vocabularies are the real Llama-2, Llama-3, Llama-3.1, Gemma-3 and
Qwen3 tokenizers (the real-model cache, `tokenizers/<name>/`). The patch is a LoRA on embed_tokens and
lm_head whose factor rows name their own old row (row i of lm_head's B is [i, 1]), so the ported adapter
shows which old row each new row got. Every carried pair is then decoded by the two tokenizers themselves
(`convert_tokens_to_string`, in mid-sequence; a lone byte completed to a valid character with each
tokenizer's own byte tokens) and must give the same text.

The cache is `$READAPT_REAL_CACHE` or ~/.cache/readapt/real (benchmarks/real_models.py builds it); without
its tokenizers these tests are skipped, saying which (the `real_models` fixture).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tests.tiny import read_all, save_tiny

from readapt.porting import port

ROWS = {"llama2": 32000, "llama3": 128256, "llama3_1": 128256, "gemma3": 262144, "qwen3": 151936}  # the real models'

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def models(tmp_path_factory, real_models):
    """name -> a tiny Llama folder with that real tokenizer (built on first use)."""
    root, made = tmp_path_factory.mktemp("real-vocab"), {}

    def get(name: str) -> Path:
        real = real_models[f"tokenizers/{name}"]  # skips, saying how to build it, when absent
        if name not in made:
            path = save_tiny(root / name, "llama", seed=len(made), vocab_size=ROWS[name], hidden_size=8,
                             intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
            for f in path.iterdir():  # the tiny tokenizer out, the real one in
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    f.unlink()
            for f in real.iterdir():
                shutil.copy(f, path / f.name)
            made[name] = path
        return made[name]

    return get


def _labelled_patch(base: Path, out: Path) -> Path:
    """A PEFT LoRA on embed_tokens and lm_head whose row i (lm_head B row, embed_tokens A column) is [i, 1]."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=2, target_modules=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lm_head.lora_B" in n:  # vocab × r
                p.copy_(torch.stack([torch.arange(p.shape[0]), torch.ones(p.shape[0])], dim=1))
            elif "embed_tokens.lora_embedding_A" in n:  # r × vocab
                p.copy_(torch.stack([torch.arange(p.shape[1]), torch.ones(p.shape[1])], dim=0))
    model.save_pretrained(out)
    return out


def _ported_rows(adapter: Path) -> torch.Tensor:
    """new row -> old row (-1: none), read off the ported factors; embed_tokens and lm_head must agree."""
    t = read_all(adapter)
    B = next(v for k, v in t.items() if k.endswith("lm_head.lora_B.weight"))
    A = next(v for k, v in t.items() if k.endswith("embed_tokens.lora_embedding_A")).T
    assert bool(((B[:, 1] == 0) | (B[:, 1] == 1)).all()) and torch.equal(A, B)
    return torch.where(B[:, 1] == 1, B[:, 0].long(), -1)


def _decoder(tok) -> str:
    return tok.backend_tokenizer.decoder.__getstate__().decode()


def _byte_tokens(tok) -> dict[int, str]:
    """byte -> the token that stands for that one byte, as the tokenizers library decodes it: the GPT-2 byte
    map's character (ByteLevel decoder) or <0xNN> (ByteFallback decoder)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab, dec = tok.get_vocab(), _decoder(tok)
    if '"ByteLevel"' in dec:
        return {b: c for b, c in bytes_to_unicode().items() if c in vocab}
    if '"ByteFallback"' in dec:
        return {b: f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" in vocab}
    return {}


# bytes around a token that complete a lone or partial UTF-8 sequence: a continuation byte after C2, a lead
# byte before 1-3 continuation bytes (E0 needs A0-BF next, F0 needs 90-BF)
CONTEXTS = [([0xC2], []), ([], [0x80]), ([], [0x80, 0x80]), ([], [0x80, 0x80, 0x80]), ([], [0xA0, 0x80]),
            ([], [0x90, 0x80, 0x80])]


def _same_bytes(t_old, a: str, bytes_old: dict, t_new, b: str, bytes_new: dict) -> bool | None:
    """Tokens a and b (whose text alone is no valid UTF-8) stand for the same bytes: in every context where
    either tokenizer decodes to valid text, both do, to the same text (True); None: no context made either
    valid (the libraries' lossy decodings differ in detail: SentencePiece byte fallback gives one U+FFFD per
    byte of an invalid group, byte-level one per maximal invalid part)."""
    seen = False
    for pre, post in CONTEXTS:
        x = t_old.convert_tokens_to_string(["a", *[bytes_old[c] for c in pre], a, *[bytes_old[c] for c in post], "a"])
        y = t_new.convert_tokens_to_string(["a", *[bytes_new[c] for c in pre], b, *[bytes_new[c] for c in post], "a"])
        if "\ufffd" not in x or "\ufffd" not in y:
            if x != y:
                return False
            seen = True
    return True if seen else None


def _check_texts(t_old, t_new, rows: torch.Tensor) -> dict:
    """Decode every carried pair with both tokenizers and compare; returns the counts. Special tokens: the
    identical string. A pair whose decoding shows U+FFFD (a byte of no valid UTF-8 text on its own): the
    same decodings next to the bytes that complete it (_same_bytes), or, for bytes no UTF-8 text holds,
    the same byte on both sides (single-byte tokens: <0xNN>, or a GPT-2 byte-map character)."""
    old_tok, new_tok = t_old.convert_ids_to_tokens(range(len(t_old))), t_new.convert_ids_to_tokens(range(len(t_new)))
    specials = {t.content for t in list(t_old.added_tokens_decoder.values()) + list(t_new.added_tokens_decoder.values())
                if t.special}
    bytes_old, bytes_new = _byte_tokens(t_old), _byte_tokens(t_new)
    inv_old, inv_new = {t: b for b, t in bytes_old.items()}, {t: b for b, t in bytes_new.items()}
    counts = {"decoded_equal": 0, "special_same_string": 0, "bytes_equal_in_contexts": 0, "byte_in_no_utf8": 0,
              "lossy_text_equal": 0}
    bad = []
    for j, i in enumerate(rows.tolist()):
        if i < 0:
            continue
        a, b = old_tok[i], new_tok[j]
        if a in specials or b in specials:
            counts["special_same_string"] += 1
            bad += [(a, b)] * (a != b)
            continue
        x, y = t_old.convert_tokens_to_string(["a", a, "a"]), t_new.convert_tokens_to_string(["a", b, "a"])
        if "\ufffd" not in x + y:
            counts["decoded_equal"] += x == y
            bad += [(a, b)] * (x != y)
            continue
        byte = inv_old.get(a), inv_new.get(b)  # single-byte tokens: <0xNN> or a GPT-2 byte-map character
        same = _same_bytes(t_old, a, bytes_old, t_new, b, bytes_new)
        if same:
            counts["bytes_equal_in_contexts"] += 1
        elif same is None and byte[0] is not None and byte[0] == byte[1]:
            counts["byte_in_no_utf8"] += 1  # C0, C1, F5-FF
        elif same is None and x == y and byte == (None, None):
            counts["lossy_text_equal"] += 1  # U+FFFD itself ('�', 'ï¿½'), or one string of bytes that never complete
        else:
            bad.append((a, b))
    assert not bad, f"{len(bad)} carried rows stand for other text, e.g. {bad[:5]}"
    return counts


def _port(models, old: str, new: str, tmp_path: Path):
    from transformers import AutoTokenizer

    ad = _labelled_patch(models(old), tmp_path / f"{old}-patch")
    report = port(ad, models(new), tmp_path / f"{old}-to-{new}")
    rows = _ported_rows(tmp_path / f"{old}-to-{new}")
    t_old, t_new = AutoTokenizer.from_pretrained(models(old)), AutoTokenizer.from_pretrained(models(new))
    return report, rows, t_old, t_new


def test_llama2_to_llama3_carries_rows_by_text(models, tmp_path, capsys):
    report, rows, t2, t3 = _port(models, "llama2", "llama3", tmp_path)
    v = report["vocabulary"]
    counts = _check_texts(t2, t3, rows)
    with capsys.disabled():
        print(f"\nLlama-2 -> Llama-3: {v['matched_by_string']} rows by identical string, {v['matched_by_text']} by "
              f"text, {v['same_string_other_text']} same-string pairs of other text not matched as such, "
              f"{v['same_text_not_paired']} left unpaired; decoded check: {counts}")
    ids2, ids3 = t2.get_vocab(), t3.get_vocab()
    assert rows[ids3["Ġwith"]] == ids2["▁with"] and rows[ids3["Ġthe"]] == ids2["▁the"]
    assert rows[ids3["ä"]] == ids2["<0xE4>"] and rows[ids3["Ã¤"]] == ids2["ä"]  # byte E4; character ä
    assert rows[ids3["<|begin_of_text|>"]] == -1  # special tokens only by identical string
    assert (v["matched_by_string"], v["matched_by_text"], v["same_string_other_text"]) == (10472, 18638, 134)
    assert v["shared_tokens"] == 29110 == int((rows >= 0).sum()) and not v["same_convention"]
    assert sum(counts.values()) == 29110 and counts["bytes_equal_in_contexts"] > 0 and counts["lossy_text_equal"] <= 1


def test_llama3_to_llama2_carries_rows_by_text(models, tmp_path):
    report, rows, t3, t2 = _port(models, "llama3", "llama2", tmp_path)
    _check_texts(t3, t2, rows)
    ids2, ids3 = t2.get_vocab(), t3.get_vocab()
    assert rows[ids2["▁with"]] == ids3["Ġwith"] and rows[ids2["<0xE4>"]] == ids3["ä"]
    assert report["vocabulary"]["shared_tokens"] == 29110


def test_llama3_to_llama3_1_keeps_every_row(models, tmp_path):
    """One family: the same 128256 tokens at the same ids, carried as they are."""
    report, rows, _, _ = _port(models, "llama3", "llama3_1", tmp_path)
    assert {m["name"]: m["status"] for m in report["modules"]} == {
        "model.embed_tokens.weight": "carried", "lm_head.weight": "carried"}
    assert torch.equal(rows, torch.arange(ROWS["llama3"]))


@pytest.mark.parametrize("old,new", [("llama2", "gemma3"), ("llama3", "qwen3")])
def test_one_convention_other_vocabulary(models, tmp_path, old, new, capsys):
    """Both SentencePiece-style (Llama-2 -> Gemma-3) or both byte-level (Llama-3 -> Qwen3): rows by string,
    none of them of other text."""
    report, rows, t_old, t_new = _port(models, old, new, tmp_path)
    v = report["vocabulary"]
    counts = _check_texts(t_old, t_new, rows)
    with capsys.disabled():
        print(f"\n{old} -> {new}: {v['matched_by_string']} by string, {v['matched_by_text']} by text, "
              f"{v['same_text_not_paired']} unpaired; decoded check: {counts}")
    assert v["same_convention"] and v["matched_by_text"] == 0 and v["same_string_other_text"] == 0
    assert v["shared_tokens"] == int((rows >= 0).sum()) > 0
