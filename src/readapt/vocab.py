"""The text a vocabulary token stands for, and the rows two tokenizers share by that text.

A token's text is what its own tokenizer's decoder makes of it in the middle of a sequence (neither first
nor last), as bytes. The decoder is read from the loaded fast tokenizer (tokenizer.json), never guessed
from the token strings, and interpreted step by step as the `tokenizers` library's decoders do:

    ByteLevel       each character is one byte through GPT-2's bytes_to_unicode map (Ġ = 0x20, ä = 0xE4);
                    a token with a character outside the map is its own UTF-8 (Llama-3, Qwen, GPT-2)
    Replace ▁ → ' ', Metaspace: ▁ = space (SentencePiece-style: Llama-2, Gemma, Mistral); Replace with
                    another string pattern likewise
    ByteFallback    <0xNN> = the one byte NN (SentencePiece byte fallback)
    WordPiece       ##x = x, any other token = ' ' + token (a word after a word), then the cleanup rules
    BPEDecoder      the end-of-word suffix = ' '
    Fuse, Strip     Fuse joins the tokens: a later Strip only trims the ends of the sequence, never a
                    token in the middle; a Strip before Fuse trims every token
    no decoder      the library joins the tokens with spaces: ' ' + token (a plain word-level tokenizer)

Other decoders (CTC, Regex replacements, ...) are not read: two tokenizers with one of them are compared
only when their decoders agree, by token string.

Matching (`match`), new token j ← old token i, one old row per new row and one new row per old row:

    1. identical string and identical text (special tokens: identical string, nothing else; an added
       token with special=True means its string, not a text);
    2. the remaining tokens by identical text: of several tokens with one text on a side, those not
       from byte fallback first, then lower ids, are paired in that order (SentencePiece `A` before
       `<0x41>`); the new tokens of a text left over get no row (counted: `same_text_not_paired`).

Between tokenizers of one convention step 1 is the former match by token string, so a port within one
family (the same tokenizer, or one that appends tokens) keeps its rows.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field

import torch

_FALLBACK = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # tokenizers' WordPiece cleanup


@functools.cache
def _byte_map() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the ByteLevel decoder's CHAR_BYTES)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _flatten(decoder: dict) -> list[dict]:
    if decoder.get("type") == "Sequence":
        return [s for d in decoder["decoders"] for s in _flatten(d)]
    return [decoder]


def _compile(decoder: dict | None) -> tuple | None:
    """The decoder's effect on a token in the middle of a sequence, as a tuple of operations; None when a
    step is not one readapt reads."""
    if decoder is None:
        return (("join", b" "),)
    ops, fused = [], False
    for s in _flatten(decoder):
        kind = s.get("type")
        if kind == "Fuse":
            fused = True
        elif kind == "Strip":
            if not fused:  # after Fuse it trims only the ends of the whole text
                ops.append(("strip", s["content"].encode(), s["start"], s["stop"]))
        elif kind == "Replace" and "String" in s.get("pattern", {}):
            ops.append(("replace", s["pattern"]["String"].encode(), s["content"].encode()))
        elif kind == "Metaspace" and not fused:
            ops.append(("replace", s.get("replacement", "▁").encode(), b" "))
        elif kind == "BPEDecoder" and not fused:
            ops.append(("replace", s.get("suffix", "</w>").encode(), b" "))
        elif kind == "ByteFallback" and not fused:
            ops.append(("fallback",))
        elif kind == "ByteLevel" and not fused:
            ops.append(("bytelevel",))
            fused = True  # it returns one string for the whole sequence
        elif kind == "WordPiece" and not fused:
            ops.append(("wordpiece", s.get("prefix", "##").encode(), bool(s.get("cleanup", True))))
        else:
            return None
    return tuple(ops)


@dataclass
class Decoding:
    """How one tokenizer's decoder turns a token into text (bytes); built from the decoder's JSON."""

    decoder: dict | None
    ops: tuple | None = field(init=False)

    def __post_init__(self):
        self.ops = _compile(self.decoder)

    @property
    def known(self) -> bool:
        return self.ops is not None

    @property
    def key(self):
        """Equal keys: every token string stands for the same text in both tokenizers."""
        return self.ops if self.ops is not None else ("unread", json.dumps(self.decoder, sort_keys=True))

    @property
    def label(self) -> str:
        kinds = {op[0] for op in self.ops or ()}
        if self.ops is None:
            return "decoder " + "+".join(s.get("type", "?") for s in _flatten(self.decoder)) + " (not read)"
        if "bytelevel" in kinds:
            return "byte-level BPE (GPT-2 byte map, Ġ = space)"
        if ("replace", "▁".encode(), b" ") in self.ops:
            return "SentencePiece-style (▁ = space" + (", byte fallback <0xNN>" * ("fallback" in kinds)) + ")"
        if "wordpiece" in kinds:
            op = next(op for op in self.ops if op[0] == "wordpiece")
            return f"WordPiece ({op[1].decode()} = continuation, other tokens start a word)"
        if "join" in kinds:
            return "no decoder (tokens joined by spaces)"
        return "decoder " + "+".join(s.get("type", "?") for s in _flatten(self.decoder))

    def text(self, token: str) -> tuple[bytes | None, bool]:
        """(the bytes `token` stands for in the middle of a sequence, whether they came from byte fallback);
        (None, False) when the decoder is not read."""
        if self.ops is None:
            return None, False
        t, fallback = token.encode(), False
        for op in self.ops:
            kind = op[0]
            if kind == "join":
                t = op[1] + t
            elif kind == "replace":
                t = t.replace(op[1], op[2])
            elif kind == "strip":
                t = _strip(t, *op[1:])
            elif kind == "fallback":
                m = _FALLBACK.fullmatch(t)
                if m:
                    t, fallback = bytes([int(m.group(1), 16)]), True
            elif kind == "bytelevel":
                chars, s = _byte_map(), t.decode("utf-8", "surrogateescape")
                if all(c in chars for c in s):  # else the token's own UTF-8, as the library does
                    t = bytes(chars[c] for c in s)
            elif kind == "wordpiece":
                t = t[len(op[1]):] if t.startswith(op[1]) else b" " + t
                if op[2]:
                    for a, b in _CLEANUP:
                        t = t.replace(a.encode(), b.encode())
        return t, fallback


def _strip(t: bytes, content: bytes, start: int, stop: int) -> bytes:
    for _ in range(start):
        if not t.startswith(content):
            break
        t = t[len(content):]
    for _ in range(stop):
        if not t.endswith(content) or not t:
            break
        t = t[: -len(content)]
    return t


@dataclass
class Tokens:
    """One tokenizer's vocabulary: token string -> id, its special tokens, and its decoding."""

    ids: dict[str, int]
    special: set[str]
    decoding: Decoding

    @classmethod
    def of(cls, tokenizer) -> Tokens:
        """From a transformers tokenizer: get_vocab(), the added tokens with special=True, the fast
        tokenizer's decoder (a slow tokenizer's decoder is not read)."""
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None:
            dec = backend.decoder
            decoder = json.loads(dec.__getstate__()) if dec is not None else None
        else:
            decoder = {"type": f"slow {type(tokenizer).__name__}"}
        special = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        return cls(tokenizer.get_vocab(), special, Decoding(decoder))


def comparable(old: Tokens, new: Tokens) -> bool:
    """Rows can be matched: both decoders are read, or both are the same decoder."""
    return (old.decoding.known and new.decoding.known) or old.decoding.key == new.decoding.key


def match(old: Tokens, new: Tokens, n_old: int, n_new: int) -> tuple[torch.Tensor, dict]:
    """(n_new,) old row of each new row (-1: none) and the counts: matched_by_string, matched_by_text,
    same_string_other_text (identical strings that stand for other texts: never matched to each other;
    other_text_matched_by_text of them found their text under another string), same_text_not_paired
    (new tokens whose text an old token has, left without a row because another new token of that text
    took it). Rows at or above n_old / n_new (tokens without a row in the tensor) are left out."""
    rows = [-1] * n_new
    same = old.decoding.key == new.decoding.key
    used, other, by_string = set(), set(), 0
    for tok, j in new.ids.items():  # 1. identical string (and text)
        i = old.ids.get(tok)
        if j >= n_new or i is None or i >= n_old:
            continue
        if same or tok in old.special or tok in new.special or old.decoding.text(tok)[0] == new.decoding.text(tok)[0]:
            rows[j] = i
            used.add(i)
            by_string += 1
        else:
            other.add(j)
    by_text = not_paired = 0
    news = _by_text(new, n_new, lambda j: rows[j] < 0) if old.decoding.known and new.decoding.known else {}
    if news:  # 2. identical text
        olds = _by_text(old, n_old, lambda i: True)
        for text, js in news.items():
            js = sorted(js)
            ins = sorted(k for k in olds.get(text, []) if k[1] not in used)
            for (_, j), (_, i) in zip(js, ins):
                rows[j] = i
            by_text += min(len(js), len(ins))
            not_paired += max(0, len(js) - len(ins)) if text in olds else 0
    stats = {"old_convention": old.decoding.label, "new_convention": new.decoding.label, "same_convention": same,
             "matched_by_string": by_string, "matched_by_text": by_text, "same_string_other_text": len(other),
             "other_text_matched_by_text": sum(rows[j] >= 0 for j in other), "same_text_not_paired": not_paired}
    return torch.tensor(rows, dtype=torch.long), stats


def _by_text(tokens: Tokens, n: int, keep) -> dict[bytes, list[tuple[bool, int]]]:
    """text -> [(from byte fallback, id)] of the non-special tokens below row n with a nonempty text, for
    the ids `keep` accepts."""
    out: dict[bytes, list] = {}
    for tok, i in tokens.ids.items():
        if i < n and tok not in tokens.special and keep(i):
            text, fallback = tokens.decoding.text(tok)
            if text:
                out.setdefault(text, []).append((fallback, i))
    return out
