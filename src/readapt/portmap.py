"""Matching a patch to a new model version: every tensor gets a name in the new base and a status.

    names = rekey(old_names, new_names)          # the same name, or the one new name sharing its suffix
    vocab = Vocab([old_folder, patch_folder], new_folder)
    item = map_tensor(name, shape, new, names, vocab, new_config)   # carried | adjusted | skipped, and why
    remap_rows(P, item.rows)                     # a vocabulary tensor's rows moved to the new token ids

PortLLM (Khan et al., 2024) adds the patch to the new version as it is; a real version change also renames
modules and grows or reorders the vocabulary. Vocabulary rows are matched by the text each token stands for
(readapt.vocab): new row j gets the patch's row i when token j of the new tokenizer stands for the same text
as token i of the old one; new tokens get no patch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from readapt.cards import vocabulary_matched
from readapt.checkpoint import Checkpoint
from readapt.vocab import Tokens, comparable, match

_VOCAB_NAME = re.compile(r"(embed_tokens|lm_head|wte|embed_out|word_embeddings)\.weight$")


@dataclass
class Item:
    """What happens to one tensor of the patch (named as in the old base)."""

    name: str
    new_name: str | None
    status: str  # "carried" | "adjusted" | "skipped"
    why: str
    old_shape: tuple[int, ...] | None
    new_shape: tuple[int, ...] | None = None
    rows: torch.Tensor | None = None  # (new rows,) old row for each new row, -1: no patch

    def as_dict(self) -> dict:
        return {"name": self.name, "new_name": self.new_name, "status": self.status, "why": self.why,
                "old_shape": list(self.old_shape) if self.old_shape else None,
                "new_shape": list(self.new_shape) if self.new_shape else None}


def remap_rows(t: torch.Tensor, rows: torch.Tensor, dim: int = 0, fill: torch.Tensor | None = None) -> torch.Tensor:
    """out[j] = t[rows[j]] along `dim`, and `fill[j]` (default 0) where rows[j] = -1."""
    keep = rows >= 0
    shape = list(t.shape)
    shape[dim] = rows.numel()
    out = t.new_zeros(shape) if fill is None else fill.clone()
    index = [slice(None)] * t.ndim
    index[dim] = keep
    src = [slice(None)] * t.ndim
    src[dim] = rows[keep]
    out[tuple(index)] = t[tuple(src)]
    return out


def rekey(names: list[str], new_names: list[str]) -> dict[str, str]:
    """Old tensor name -> new base name: the name itself, or else the one new name that shares its longest
    dotted suffix of ≥ 2 parts keeping every layer index (model.language_model.layers.0.q_proj.weight ->
    model.layers.0.q_proj.weight). Ambiguous or unmatched names are left out."""
    present = set(new_names)
    by_suffix: dict[str, list[str]] = {}
    for n in new_names:
        parts = n.split(".")
        for k in range(len(parts) - 1):
            by_suffix.setdefault(".".join(parts[k:]), []).append(n)
    out, claimed = {}, {}
    for n in names:
        if n in present:
            out[n] = n
            continue
        parts = n.split(".")
        for k in range(1, len(parts) - 1):
            if any(p.isdigit() for p in parts[k - 1:k]):  # never drop a layer index
                break
            hits = by_suffix.get(".".join(parts[k:]), [])
            if len(hits) == 1:
                claimed.setdefault(hits[0], []).append(n)
                break
            if hits:
                break
    for target, sources in claimed.items():
        if len(sources) == 1 and target not in names:  # one old name per new name
            out[sources[0]] = target
    return out


def _load_vocab(folder: Path | None) -> tuple[Tokens | None, str]:
    """A folder's tokenizer (token strings, special tokens, decoder), and where it came from (or why there is none)."""
    if folder is None:
        return None, "no folder to read it from"
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None, f"no tokenizer files in {folder}"
    from transformers import AutoTokenizer

    try:
        return Tokens.of(AutoTokenizer.from_pretrained(folder, local_files_only=True)), str(folder)
    except Exception as err:  # tokenizer loaders raise many types; the report says why
        return None, f"cannot load the tokenizer in {folder}: {err}"


class Vocab:
    """Row correspondence between the old and the new vocabulary, by the text each token stands for
    (readapt.vocab.match: identical string and text first, then identical text)."""

    def __init__(self, old_folders: list[Path], new_folder: Path):
        self.old_folders, self.new_folder, self.loaded, self.stats = old_folders, new_folder, False, {}

    def load(self) -> Vocab:
        """Read both tokenizers, once, when a vocabulary tensor first needs them."""
        if not self.loaded:
            self.old, self.old_from = None, "no old tokenizer (pass --from OLD_BASE, or keep it in the patch folder)"
            for f in self.old_folders:
                self.old, where = _load_vocab(f)
                if self.old is not None:
                    self.old_from = where
                    break
            self.new, self.new_from = _load_vocab(self.new_folder)
            self.loaded = True
        return self

    def comparable(self) -> bool:
        return self.old is not None and self.new is not None and comparable(self.old, self.new)

    def rows(self, n_old: int, n_new: int) -> torch.Tensor | None:
        """(n_new,) old row of each new row, -1 where its token is new (or it has none); None when the
        tokenizers are missing or cannot be compared."""
        if not self.comparable():
            return None
        rows, how = match(self.old, self.new, n_old, n_new)
        shared = int((rows >= 0).sum())
        moved = int(((rows >= 0) & (rows != torch.arange(n_new))).sum())  # shared tokens now at another id
        free = rows.tolist()
        new_tokens = len({j for j in self.new.ids.values() if j < n_new and free[j] < 0})
        self.stats = {"old_rows": n_old, "new_rows": n_new, "shared_tokens": shared, "moved_tokens": moved,
                      "new_tokens": new_tokens,
                      "rows_without_token": n_new - shared - new_tokens,
                      "old_rows_dropped": n_old - len(set(rows[rows >= 0].tolist())),
                      "old_tokenizer": self.old_from, "new_tokenizer": self.new_from, **how}
        return rows

    def identical(self, n_old: int, n_new: int) -> bool:
        """Same row count, the same decoder and every token at the same id on both sides."""
        old, new = self.old.ids, self.new.ids
        return n_old == n_new and self.old.decoding.key == self.new.decoding.key and \
            all(new.get(t) == i for t, i in old.items() if i < n_old) and \
            all(old.get(t) == j for t, j in new.items() if j < n_new)


def map_tensor(name: str, shape: tuple[int, ...] | None, new: Checkpoint, names: dict[str, str], vocab: Vocab,
               new_cfg: dict) -> Item:
    """Where one tensor of the patch (named and shaped as in the old base) goes in the new base, and why:
    carried (same or re-keyed name, same shape or same tokens), adjusted (vocabulary rows matched by
    text) or skipped."""
    new_name = names.get(name)
    if new_name is None:
        if name.endswith("lm_head.weight") and new_cfg.get("tie_word_embeddings"):
            return Item(name, None, "skipped", "the new base ties lm_head to embed_tokens (tie_word_embeddings: it "
                        "stores no lm_head.weight), so the patch's lm_head change has no tensor to go to; only the "
                        "embed_tokens patch reaches the tied output layer", shape)
        return Item(name, None, "skipped", "no tensor of this name (or a unique re-keyed one) in the new base", shape)
    new_shape = new.shape(new_name)
    renamed = f" (re-keyed from {name})" if new_name != name else ""
    if not new.dtype(new_name).is_floating_point:
        return Item(name, new_name, "skipped", "not a float tensor in the new base", shape, new_shape)
    is_vocab = shape is not None and len(shape) == 2 and len(new_shape) == 2 and shape[1:] == new_shape[1:] and (
        _VOCAB_NAME.search(name) is not None or new_shape[0] == new_cfg.get("vocab_size"))
    if is_vocab and vocab.load().old is not None and vocab.new is not None:
        if vocab.identical(shape[0], new_shape[0]):
            return Item(name, new_name, "carried", "same shape, same tokens at the same ids" + renamed, shape,
                        new_shape)
        if not vocab.comparable():
            return Item(name, new_name, "skipped", f"the tokenizers cannot be compared: the old one decodes with "
                        f"{vocab.old.decoding.label}, the new one with {vocab.new.decoding.label}, and readapt cannot "
                        f"tell what text their tokens stand for" + renamed, shape, new_shape)
        rows = vocab.rows(shape[0], new_shape[0])
        st = vocab.stats
        return Item(name, new_name, "adjusted", f"vocabulary rows {vocabulary_matched(st, details=False)}: {st['shared_tokens']} "
                    f"shared tokens carried ({st['moved_tokens']} of them to another id), {st['new_tokens']} new "
                    f"token(s) and {st['rows_without_token']} untokenised "
                    f"rows get no patch, {st['old_rows_dropped']} old rows dropped" + renamed, shape, new_shape, rows)
    if shape == new_shape:
        note = " (tokenizers not compared: one is missing)" if is_vocab else ""
        return Item(name, new_name, "carried", "same shape" + renamed + note, shape, new_shape)
    if is_vocab:
        missing, where = ("old", vocab.old_from) if vocab.old is None else ("new", vocab.new_from)
        return Item(name, new_name, "skipped", f"the vocabulary changed ({shape[0]} -> {new_shape[0]} rows) and the "
                    f"{missing} tokenizer is missing ({where}): rows cannot be matched",
                    shape, new_shape)
    return Item(name, new_name, "skipped",
                f"shape {list(shape or [])} in the patch but {list(new_shape)} in the new base", shape, new_shape)


TIED_OLD = ("the old base ties lm_head to embed_tokens (tie_word_embeddings: it stores no lm_head.weight), so this "
             "lm_head change (mergekit-extract-lora writes one even for tied models) has no tensor of its own: not "
             "carried; re-extract without lm_head (mergekit-extract-lora ... --exclude-regex lm_head) or with "
             "`readapt extract --tau`, which puts the tied matrix's change on embed_tokens")


def tied_head(name: str, old: Checkpoint) -> bool:
    """`name` is an lm_head the checkpoint `old` does not store because it ties it to embed_tokens."""
    return name.endswith("lm_head.weight") and name not in old and bool((old.config or {}).get("tie_word_embeddings"))
