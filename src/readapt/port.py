"""Port (PortLLM): carry a patch learned on one model version to the next, with no training and no data.

PortLLM (Khan et al., 2024, "PortLLM: Personalizing Evolving Large Language Models with Training-Free
and Portable Model Patches", §3): a patch P = θ_ft − θ learned on version θ is added to the new version θ′,

    θ′_ported = θ′ + P          (LoRA: P = s·B·A; delta folder: P = Δ, e.g. instruct_v1 − base_v1)

and the residual between re-fine-tuning θ′ and θ′ + P has rank ≤ 2r and a small norm. A real version
change also renames modules, grows the vocabulary and changes configs, so every tensor of the patch is
mapped to the new base and gets one status in the report:

    carried    same (or re-keyed) name and shape: P is added as it is
    adjusted   vocabulary rows (embed_tokens / lm_head): new row j gets P's row i when token j of the new
               tokenizer stands for the same text as token i of the old one, each decoded in its own
               tokenizer's convention (readapt.vocab: SentencePiece ▁ and <0xNN>, byte-level Ġ, ...;
               identical strings first; special tokens by identical string only); new tokens get no
               patch. DoRA magnitudes rescaled (below). PEFT modules_to_save copies turned back
               into a patch (copy − old tensor) and added to the new tensor.
    skipped    absent from the new base, other shape differences, tokenizers missing, ... (with why)

DoRA (Liu et al. 2024): W′ = m ⊙ (W + sBA) / ‖W + sBA‖, norm per output row (per column for embeddings).
m was learned for the old W: DoRA starts it at m₀ = ‖W_old‖, so what training learned is the ratio
m / ‖W_old‖. Carrying m verbatim would force the new model's row norms back to the old fine-tuned ones
and drop whatever the new version changed in them; so, when the old base is known, the port carries the
learned ratio:  m′ = m ⊙ ‖W_new‖ / ‖W_old‖  (m′ = m when W_new = W_old; rows of new tokens get
m′ = ‖W_new‖, i.e. no change). Without the old base m is carried verbatim and the report warns.

Outputs: a retargeted PEFT adapter folder (or a delta folder for a delta patch), or with merge=True the
complete model folder θ′ + P written by `readapt.merge.merge`; every output holds `port_report.json`.
With an explicit old base the report adds the version drift ‖θ′ − θ‖/‖θ‖ per tensor and per layer, the
patch's norm relative to the drift and cos(P, θ′ − θ), streamed one tensor at a time.

Memory: no model is ever loaded; one tensor of the new base (with --from also its old counterpart) and
one patch tensor are in memory at a time, so a port costs a merge, not a fine-tune (benchmarks/bench_port.py).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from readapt._version import __version__
from readapt.adapters import PREFIX, PeftAdapter
from readapt.checkpoint import (Checkpoint, ReadOptions, TensorInfo, check_output, compare_configs, difference_blocks,
                                is_delta_folder, is_peft_folder, open_model, output_folder, progress, reader,
                                resolve_model, write_file, write_tensors)
from readapt.delta import MANIFEST, DeltaFolder
from readapt.errors import ReadaptError
from readapt.numerics import is_finite
from readapt.vocab import Tokens, comparable, match

REPORT = "port_report.json"
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


# ---------------------------------------------------------------------------------------------------
# matching the patch to the new base: names, vocabulary rows, configs


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


def _matched(st: dict, details: bool = True) -> str:
    """How the vocabulary rows were matched, in words (the report's `vocabulary`)."""
    if st["same_convention"] and not st["matched_by_text"]:
        how = "matched by token string"
    else:
        how = (f"matched by the text each token stands for ({st['matched_by_string']} by identical string, "
               f"{st['matched_by_text']} by identical text under another string)")
    if not details:
        return how
    if not st["same_convention"]:
        how += (f"; the tokenizers use different conventions (old: {st['old_convention']}; new: "
                f"{st['new_convention']})")
    if st["same_string_other_text"]:
        how += (f"; {st['same_string_other_text']} tokens with the same string stand for other text and were not "
                f"matched to each other ({st['other_text_matched_by_text']} of them found their text elsewhere)")
    if st["same_text_not_paired"]:
        how += (f"; {st['same_text_not_paired']} new tokens share their text with an old token already carried to "
                f"another new token of that text: no patch")
    return how


def _classify(name: str, shape: tuple[int, ...] | None, new: Checkpoint, names: dict[str, str], vocab: Vocab,
              new_cfg: dict) -> Item:
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
        return Item(name, new_name, "adjusted", f"vocabulary rows {_matched(st, details=False)}: {st['shared_tokens']} "
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


_TIED_OLD = ("the old base ties lm_head to embed_tokens (tie_word_embeddings: it stores no lm_head.weight), so this "
             "lm_head change (mergekit-extract-lora writes one even for tied models) has no tensor of its own: not "
             "carried; re-extract without lm_head (mergekit-extract-lora ... --exclude-regex lm_head) or with "
             "`readapt extract --tau`, which puts the tied matrix's change on embed_tokens")


def _tied_head(name: str, old: Checkpoint) -> bool:
    """`name` is an lm_head the checkpoint `old` does not store because it ties it to embed_tokens."""
    return name.endswith("lm_head.weight") and name not in old and bool((old.config or {}).get("tie_word_embeddings"))


def _config_warnings(old_cfg: dict | None, new_cfg: dict | None) -> list[str]:
    if not new_cfg:
        return ["the new base (--to) has no config.json: its architecture and config were not checked"]
    if not old_cfg:
        return ["the old base's config is unknown (pass --from OLD_BASE): config differences were not checked"]
    errors, warns = compare_configs(new_cfg, old_cfg, "the new base", "the old base")
    return [e + " (each tensor it affects is carried, adjusted or skipped on its own: see the list)"
            for e in errors] + warns


def _open_old(spec, source: str, read: ReadOptions) -> tuple[Checkpoint | None, str]:
    try:
        return Checkpoint.open(spec, read), source
    except ReadaptError as err:
        return None, f"{spec} recorded in the patch could not be opened ({err})"


def _open_model(spec, flag: str, read: ReadOptions) -> Checkpoint:
    """The checkpoint `spec` given with `flag`: errors name the flag; adapters and deltas are refused."""
    try:
        return open_model(spec, read, fix="pass the model folder (or model id) of that version")
    except ReadaptError as err:
        raise ReadaptError(f"{flag} {spec}: {err}") from None


def _recorded_base(src) -> str | None:
    """The old base a patch says it was made on: PEFT's base_model_name_or_path, or a delta's manifest."""
    if isinstance(src, DeltaFolder):
        rec = src.manifest.get("base") or {}
        return next((s for s in (rec.get("path"), rec.get("spec")) if s and Path(s).is_dir()), None)
    return src.config.get("base_model_name_or_path") or None


def _same_folder(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# ---------------------------------------------------------------------------------------------------
# the port


def port(patch: str | os.PathLike, to: str | os.PathLike, out: str | os.PathLike | None, *,
         from_: str | os.PathLike | None = None, merge: bool = False, strict: bool = False,
         overwrite: bool = False, dtype: str | torch.dtype | None = None, max_shard_size: int | str = "5GB",
         allow_pickle: bool = False, read: ReadOptions | None = None) -> dict:
    """Carry `patch` (a PEFT LoRA/DoRA adapter or a delta folder made on an old version) to the new base `to`.

    Writes at `out`: θ′ + P as a complete model folder (merge=True, the folder `readapt merge` writes), or
    else the patch retargeted to `to` (a PEFT adapter folder `PeftModel.from_pretrained(to, out)` loads,
    or a delta folder). Each gets `port_report.json`; the report is also returned (out=None: report only,
    nothing written). `from_` is the old base: it enables the drift statistics and DoRA magnitude
    rescaling (without it the base recorded in the patch is used for the latter when it is found locally).
    Refuses: a different architecture, PEFT keys that match nothing in `to`, nothing carried, and with
    strict=True any skipped tensor. Pickled .bin weights are read only with allow_pickle=True.
    """
    if dtype is not None and not merge:
        raise ReadaptError("--dtype (dtype=) applies only with --merge: a retargeted patch keeps its own dtype")
    read = ReadOptions.of(read, allow_pickle)
    new = _open_model(to, "--to", read)
    new_cfg = new.config or {}
    try:
        patch_path = resolve_model(patch)
    except ReadaptError as err:
        raise ReadaptError(f"PATCH {patch}: {err}") from None
    old, old_source = (_open_model(from_, "--from", read), "--from") if from_ is not None else (None, "")
    if is_peft_folder(patch_path):
        src = PeftAdapter(patch_path, label=str(patch), read=read)
        recorded = _recorded_base(src)
        if old is None and recorded:
            old, old_source = _open_old(recorded, f"base_model_name_or_path in {patch_path / 'adapter_config.json'}",
                                        read)
        targets = src.targets()
        old_cfg = old.config if old is not None else None
        old_class = (src.config.get("auto_mapping") or {}).get("base_model_class")
        kind = "peft-dora" if src.dora else "peft-lora"
    elif is_delta_folder(patch_path):
        src = DeltaFolder(patch_path, label=str(patch))
        recorded = _recorded_base(src)
        if old is None and recorded:
            old, old_source = _open_old(recorded, f"the base recorded in {patch_path / MANIFEST}", read)
        targets = src.targets()
        old_cfg = old.config if old is not None else src.config
        old_class, kind = None, "delta"
    else:
        raise ReadaptError(f"{patch} is not a patch: expected a PEFT LoRA/DoRA adapter folder (adapter_config.json) "
                           f"or a delta folder (readapt_delta.json). For a full fine-tuned checkpoint, make its delta "
                           f"first: readapt extract OLD_BASE TUNED -o DELTA")

    if out is not None:  # before any long work: the checks output_folder makes again at the end
        check_output(out, overwrite, inputs=[patch_path, new.path] + ([old.path] if old else []))

    # -- architecture ------------------------------------------------------------------------------------
    old_type, new_type = (old_cfg or {}).get("model_type"), new_cfg.get("model_type")
    if old_type and new_type and old_type != new_type:
        made_on = f"the old base --from {from_} is" if old_source == "--from" else f"{patch} was made on"
        raise ReadaptError(f"{made_on} a {old_type!r} model but {to} is a {new_type!r} model: a patch only "
                           f"ports between versions of one architecture")
    new_class = (new_cfg.get("architectures") or [None])[0]
    if old_class and new_class and old_class != new_class:
        raise ReadaptError(f"{patch} was trained on a {old_class} but {to} is a {new_class} (adapter_config.json "
                           f"auto_mapping): a patch only ports between versions of one architecture")
    if old is not None:  # the patch must fit the old base it names
        misfit = [n for n, s in targets.items() if not _tied_head(n, old) and
                  (n not in old or (s is not None and tuple(s) != old.shape(n)))]
        if misfit and old_source == "--from":
            raise ReadaptError(f"{patch} does not fit the old base {from_}: {len(misfit)} of its tensors are missing "
                               f"there or have another shape ({', '.join(misfit[:5])}); pass the base it was made on")
        if misfit:
            old, old_source = None, f"the base recorded in the patch does not fit it ({misfit[0]})"
            old_cfg = None if kind != "delta" else src.config

    # -- match every tensor of the patch -------------------------------------------------------------------
    names = rekey(list(targets), new.names)
    vocab = Vocab([p for p in (old.path if old else None, patch_path) if p is not None], new.path)
    base_copies = [n for n, m in getattr(src, "modules", {}).items()
                   if set(m.parts) <= {"base_layer.weight", "base_layer.bias"}]
    items = [Item(n, None, "skipped", _TIED_OLD, s) if old is not None and _tied_head(n, old) else
             _classify(n, s, new, names, vocab, new_cfg) for n, s in targets.items() if n not in base_copies]
    if kind != "delta":
        for it in items:
            parts = src.modules[it.name].parts
            full = any(p in ("weight", "bias") or p.startswith("modules_to_save") for p in parts)
            if it.status != "skipped" and full and old is None:
                it.status, it.why = "skipped", ("a modules_to_save copy of the old tensor: its patch is "
                                                "(copy − old tensor); pass --from OLD_BASE to carry it")
            elif it.status != "skipped" and full:
                it.status, it.why = "adjusted", "modules_to_save copy: new tensor + (copy − old tensor); " + it.why
            elif it.status != "skipped" and "lora_magnitude_vector" in parts and old is not None:
                it.status, it.why = "adjusted", "DoRA magnitude rescaled m′ = m·‖W_new‖/‖W_old‖; " + it.why
    warnings = _config_warnings(old_cfg, new_cfg)
    if old_cfg and old_cfg.get("tie_word_embeddings") and not new_cfg.get("tie_word_embeddings") \
            and any(it.name.endswith("embed_tokens.weight") and it.status != "skipped" for it in items):
        warnings.append("the old base tied lm_head to embed_tokens, the new one has its own lm_head: the embed_tokens "
                        "patch is carried to embed_tokens only; the new lm_head gets no patch")
    if old_cfg and not old_cfg.get("tie_word_embeddings") and new_cfg.get("tie_word_embeddings") \
            and any(it.name.endswith("embed_tokens.weight") and it.status != "skipped" for it in items):
        warnings.append("the new base ties lm_head to embed_tokens, the old one did not: the embed_tokens patch now "
                        "also changes the output layer")
    by_id = [it.new_name for it in items if it.status == "carried" and "tokenizers not compared" in it.why]
    if by_id:
        warnings.append(f"{', '.join(by_id)} carried row for row by token id, because the tokenizers were not compared "
                        f"(old: {vocab.old_from}; new: {vocab.new_from}); if the new version moved tokens to other "
                        f"ids these rows are patched wrongly: make both tokenizers available (the old one with --from "
                        f"OLD_BASE or in the patch folder, the new one in NEW_BASE)")
    if from_ is not None and recorded:
        try:
            rec_path = resolve_model(recorded)
        except ReadaptError:
            rec_path = None
        if rec_path is not None and not _same_folder(rec_path, old.path):
            warnings.append(f"--from {from_} is not the base recorded in the patch ({recorded}): the drift, DoRA "
                            f"rescaling, modules_to_save patches and old vocabulary all come from --from")
    if old is not None and _same_folder(old.path, new.path):
        warnings.append("the old base and --to are the same checkpoint: nothing changed between the versions")
    if kind == "peft-dora" and old is None:
        warnings.append("DoRA magnitudes carried verbatim: they are the old model's fine-tuned row norms and override "
                        "the new base's; pass --from OLD_BASE to rescale them (m′ = m·‖W_new‖/‖W_old‖)")
    if base_copies or any("base_layer.weight" in src.modules[it.name].parts for it in items if kind != "delta"):
        warnings.append("PEFT's copies of the old base's embedding layers (base_layer.weight, saved when embeddings "
                        "are targeted) are old weights, not part of the patch: not carried")
    report = {
        "readapt_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "patch": {"spec": str(patch), "path": str(patch_path.resolve()), "kind": kind},
        "new_base": {"spec": str(to), "path": str(new.path.resolve()), "model_type": new_type},
        "old_base": {"spec": str(old.path) if old else None, "path": str(old.path.resolve()) if old else None,
                     "source": old_source or "unknown"},
        "output": None if out is None else {"path": str(Path(out).absolute()), "merged": merge},
        "counts": {s: sum(it.status == s for it in items) for s in ("carried", "adjusted", "skipped")},
        "vocabulary": vocab.stats or None,
        "warnings": warnings,
        "modules": [it.as_dict() for it in items],
        "drift": None,
    }

    # -- refusals ------------------------------------------------------------------------------------------
    def refuse(msg: str):
        err = ReadaptError(msg + "\n" + summary({**report, "output": None}))  # nothing is written
        err.report = report
        raise err

    unmatched = [it.name for it in items if it.new_name is None and "ties lm_head" not in it.why]
    if unmatched and kind != "delta":
        refuse(f"{patch} has adapter keys that match no module of {to} ({len(unmatched)}: "
               f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}): it was trained on another model")
    if report["counts"]["carried"] + report["counts"]["adjusted"] == 0:
        refuse(f"nothing in {patch} can be carried to {to}")
    if strict and report["counts"]["skipped"]:
        refuse(f"--strict: {report['counts']['skipped']} tensors of {patch} cannot be carried to {to}")

    carried = [it for it in items if it.status != "skipped"]
    with tempfile.TemporaryDirectory(prefix="readapt-port-") as tmp:
        if kind == "delta":
            ported = PortedDelta(src, carried, new, label=f"{patch} (ported)")
        else:
            _write_peft(Path(tmp), src, carried, new, old, to)
            from readapt.merge import open_addend

            ported = open_addend(tmp, new)
            ported.label = f"{patch} (ported)"
        if from_ is not None:
            report["drift"] = drift(new, old, ported, {it.new_name: it for it in carried})
        if out is None:
            return report
        text = json.dumps(report, indent=2) + "\n"
        if merge:
            from readapt.merge import merge as merge_fn

            merge_fn(to, out, [(ported, 1.0)], dtype=dtype, overwrite=overwrite,
                     max_shard_size=max_shard_size, read=read, extra_files={REPORT: text})
            return report
        with output_folder(out, overwrite, inputs=[patch_path, new.path] + ([old.path] if old else [])) as dst:
            if kind == "delta":
                _write_delta(dst, ported, report, max_shard_size)
            else:
                for f in Path(tmp).iterdir():
                    shutil.copyfile(f, dst / f.name)
            (dst / REPORT).write_text(text)
            (dst / "README.md").write_text(_card(report))
    return report


# ---------------------------------------------------------------------------------------------------
# writing the retargeted patch


def _write_peft(folder: Path, src: PeftAdapter, items: list[Item], new: Checkpoint, old: Checkpoint | None, to) -> None:
    """The adapter's tensors under the new module names, vocabulary rows remapped, DoRA m rescaled,
    modules_to_save copies rebuilt on the new tensors, base_layer copies dropped; adapter_config retargeted."""
    cfg = dict(src.config)
    modules: dict[str, str] = {}  # old module -> new module, for LoRA-factor modules

    def tensors():
        for it in items:
            mod = src.modules[it.name]
            new_mod = it.new_name.rsplit(".", 1)[0]
            embedding = "lora_embedding_A" in mod.parts
            for part, key in mod.parts.items():
                if part.startswith("base_layer"):
                    continue
                t = src.ckpt.read(key)
                if not is_finite(t):
                    raise ReadaptError(f"the patch {src.path} has NaN/Inf values in {key!r} "
                                       f"({src.ckpt.infos[key].file.name}): it cannot be ported")
                if part in ("weight", "bias") or part.startswith("modules_to_save"):
                    P = t.float().sub_(old.read(it.name).float())  # the patch, on the old tensor's rows
                    if it.rows is not None:
                        P = remap_rows(P, it.rows)
                    t = new.read(it.new_name).float().add_(P).to(t.dtype)  # new tensor + P
                elif part == "lora_magnitude_vector":
                    t = _dora_magnitude(t, it, new, old, embedding)
                elif it.rows is not None and embedding and part == "lora_embedding_A":
                    t = remap_rows(t, it.rows, dim=1)  # A: r×vocab, columns are tokens
                elif it.rows is not None and not embedding and part in ("lora_B.weight", "lora_B.bias"):
                    if src.config.get("fan_in_fan_out"):
                        raise ReadaptError(f"{src.path}: vocabulary rows of the fan_in_fan_out layer {mod.name} "
                                           f"cannot be remapped (not supported)")
                    t = remap_rows(t, it.rows)  # B: vocab×r, rows are tokens
                else:
                    t = t.clone()
                if part.startswith("lora_"):
                    modules[mod.name] = new_mod
                head = PREFIX if key.startswith(PREFIX) else ""
                yield head + new_mod + key[len(head) + len(mod.name):], t
                del t

    write_file(folder / "adapter_model.safetensors", tensors(), metadata={"readapt": "port"})
    cfg["base_model_name_or_path"] = str(Path(to).absolute()) if Path(to).expanduser().is_dir() else str(to)
    n_lora = len({src.modules[n].name for n in src.modules if any(p.startswith("lora_") for p in src.modules[n].parts)})
    if modules and (any(a != b for a, b in modules.items()) or len(modules) < n_lora):
        # wrap exactly the carried modules under their new names, with their own r and alpha
        from peft.utils.other import get_pattern_key

        rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        cfg["rank_pattern"] = {b: rp.get(get_pattern_key(rp.keys(), a), cfg["r"]) for a, b in modules.items()}
        cfg["alpha_pattern"] = {b: ap.get(get_pattern_key(ap.keys(), a), cfg["lora_alpha"]) for a, b in modules.items()}
        cfg["target_modules"] = "^(" + "|".join(re.escape(m) for m in modules.values()) + ")$"
        cfg["layers_to_transform"] = cfg["layers_pattern"] = None
    if (new.config or {}).get("architectures") and isinstance(cfg.get("auto_mapping"), dict):
        cfg["auto_mapping"] = {**cfg["auto_mapping"], "base_model_class": new.config["architectures"][0]}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _dora_magnitude(m: torch.Tensor, it: Item, new: Checkpoint, old: Checkpoint | None,
                    embedding: bool) -> torch.Tensor:
    """m′ = m ⊙ ‖W_new‖ / ‖W_old‖ (old base known) or m (unknown); rows of new tokens: m′ = ‖W_new‖ (no change).
    Norms as PEFT's DoRA takes them: per output row of a Linear W (out×in), per column of an embedding (vocab×dim)."""
    dim = 0 if embedding else 1
    n_new = torch.linalg.norm(new.read(it.new_name).float(), dim=dim)
    mf = m.float()
    if it.rows is not None and not embedding:  # m has one entry per vocabulary row
        mf = remap_rows(mf, it.rows, fill=n_new)
    if old is not None:
        n_old = torch.linalg.norm(old.read(it.name).float(), dim=dim)
        if it.rows is not None and not embedding:
            n_old = remap_rows(n_old, it.rows, fill=n_new)
        ratio = torch.where(n_old > 0, n_new / n_old, torch.ones_like(n_new))
        keep = it.rows >= 0 if it.rows is not None and not embedding else torch.ones_like(mf, dtype=torch.bool)
        mf = torch.where(keep, mf * ratio, mf)
    return mf.to(m.dtype)


class PortedDelta:
    """A delta folder seen through the port's name and row mapping: Ψ[new name] = Δ[old name], rows remapped."""

    kind = "delta (ported)"

    def __init__(self, src: DeltaFolder, items: list[Item], new: Checkpoint, label: str):
        self.src, self.path, self.label = src, src.path, label
        order = {n: i for i, n in enumerate(new.names)}
        self.items = {it.new_name: it for it in sorted(items, key=lambda it: order[it.new_name])}
        self.config = new.config

    def targets(self) -> dict[str, tuple[int, ...]]:
        return {n: it.new_shape for n, it in self.items.items()}

    def stored(self, name: str) -> torch.Tensor | TensorInfo:
        """Δ[name] as merge and the writer read it block by block: where it is stored, or, when its
        vocabulary rows move, the remapped tensor."""
        it = self.items[name]
        return self.src.ckpt.stored(it.name) if it.rows is None else self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        it = self.items[name]
        d = self.src.ckpt.read(it.name)
        return remap_rows(d, it.rows) if it.rows is not None else d

    def delta(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor | None:
        return self._read(name).float() if name in self.items else None


def _write_delta(folder: Path, ported: PortedDelta, report: dict, max_shard_size) -> None:
    ckpt = ported.src.ckpt
    plan = [(n, ckpt.dtype(it.name), it.new_shape) for n, it in ported.items.items()]
    write_tensors(folder, plan, ((n, ported.stored(n)) for n, _, _ in plan), max_shard_size=max_shard_size,
                  metadata={"readapt": "delta", "formula": "delta ported by readapt port"})
    manifest = {**ported.src.manifest,
                "created": report["created"], "readapt_version": __version__,
                "formula": "delta ported to a new base by readapt port (PortLLM): see port_report.json",
                "base": {"spec": report["new_base"]["spec"], "path": report["new_base"]["path"],
                         "model_type": report["new_base"]["model_type"]},
                "tuned": None,  # the old tuned model is no base + Δ here: see ported_from
                "base_config": ported.config, "tensor_count": len(plan),
                "skipped": [m["name"] for m in report["modules"] if m["status"] == "skipped"],
                "ported_from": {"delta": report["patch"]["path"], "base": ported.src.manifest.get("base"),
                                "tuned": ported.src.manifest.get("tuned")}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# drift between versions


def _layer(name: str) -> str:
    m = re.search(r"layers\.(\d+)\.", name)
    return f"layer {int(m.group(1))}" if m else name.removesuffix(".weight")


class _Dots:
    """⟨a, b⟩ summed in float64, BLOCK elements at a time, widened into two reused float64 buffers (no
    float64 copy of a whole tensor, and no fresh allocation per chunk)."""

    def __init__(self):
        n = reader.BLOCK
        self.x, self.y = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float:
        total, same = 0.0, a.data_ptr() == b.data_ptr() and a.dtype == b.dtype  # ‖a‖²: widen once
        for u, v in zip(a.reshape(-1).split(reader.BLOCK), b.reshape(-1).split(reader.BLOCK)):
            x = self.x[: u.numel()].copy_(u)
            total += float(x.dot(x if same else self.y[: v.numel()].copy_(v)))
        return total

    def drift(self, new: torch.Tensor | TensorInfo, old: torch.Tensor | TensorInfo,
              P: torch.Tensor | None = None) -> tuple[float, float, float, float]:
        """(‖D‖², ‖θ‖², ‖P‖², ⟨P, D⟩) for D = θ′ − θ, θ′ and θ given as `Checkpoint.stored` values (read
        in BLOCK-element blocks, never loaded whole) or tensors, P the patch on it (0 if None): the same
        float32 difference and float64 sums as the whole-tensor path."""
        d2 = w2 = p2 = pd = 0.0
        ps = P.reshape(-1).split(reader.BLOCK) if P is not None else itertools.repeat(None)
        for (_, theta, d), p in zip(difference_blocks(new, old), ps):  # θ′ − θ in float32
            d2 += self(d, d)
            w2 += self(theta, theta)
            if p is not None:
                p2 += self(p, p)
                pd += self(p, d)
        return d2, w2, p2, pd


def drift(new: Checkpoint, old: Checkpoint, patch, items: dict[str, Item]) -> dict:
    """Version drift D = θ′ − θ per tensor and per layer: ‖D‖/‖θ‖, ‖P‖/‖D‖ and cos(P, D), where P is the
    ported patch on that tensor (0 where it has none). Vocabulary tensors compare the rows of shared
    tokens. Streams one tensor triple at a time; sums in float64."""
    names = rekey(old.names, new.names)
    old_of = {v: k for k, v in names.items()}
    per_tensor: dict[str, dict] = {}
    acc: dict[str, list[float]] = {}  # layer -> [‖D‖², ‖θ‖², ‖P‖², ⟨P, D⟩]
    dot = _Dots()
    floats = [n for n in new.names
              if n in old_of and new.dtype(n).is_floating_point and old.dtype(old_of[n]).is_floating_point]
    with progress(sum(new.infos[n].end - new.infos[n].start for n in floats), "drift") as bar:
        for n in floats:
            it, o = items.get(n), old_of[n]
            if it is None and new.shape(n) == old.shape(o):  # unpatched: θ′ and θ in blocks
                d2, w2, p2, pd = dot.drift(new.stored(n), old.stored(o))
            elif it is not None and it.rows is None and new.shape(n) == old.shape(o):
                Wn = new.read(n).float()  # whole: DoRA's W′ needs it; read once, θ in blocks beside it
                d2, w2, p2, pd = dot.drift(Wn, old.stored(o), patch.delta(n, Wn))
                del Wn
            elif it is not None and it.rows is not None:  # vocabulary rows: compare the shared tokens
                keep = it.rows >= 0
                Wn = new.read(n).float()
                P = patch.delta(n, Wn)[keep]
                Wo = old.read(o).float()[it.rows[keep]]  # old rows of the shared tokens
                D = Wn[keep].sub_(Wo)
                d2, w2, p2, pd = dot(D, D), dot(Wo, Wo), dot(P, P), dot(P, D)
                del Wn, Wo, D
            else:  # another shape: no drift to report
                per_tensor[n] = {"drift": None, "note": f"shape {list(old.shape(o))} -> {list(new.shape(n))}: not compared"}
                continue
            patched, P = it is not None, None
            row = {"drift": math.sqrt(d2 / w2) if w2 else None}
            if patched:
                row["patch_to_drift"] = math.sqrt(p2 / d2) if d2 else None
                row["cos_patch_drift"] = pd / math.sqrt(p2 * d2) if p2 and d2 else None
            per_tensor[n] = row
            a = acc.setdefault(_layer(n), [0.0, 0.0, 0.0, 0.0])
            for k, v in enumerate((d2, w2, p2, pd)):
                a[k] += v
            bar.update(new.infos[n].end - new.infos[n].start)
    acc = dict(sorted(acc.items(), key=lambda kv: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", kv[0])]))
    layers = {k: {"drift": math.sqrt(d2 / w2) if w2 else None,
                  "patch_to_drift": math.sqrt(p2 / d2) if d2 and p2 else None,
                  "cos_patch_drift": pd / math.sqrt(p2 * d2) if p2 and d2 else None}
              for k, (d2, w2, p2, pd) in acc.items()}
    tot = [sum(a[k] for a in acc.values()) for k in range(4)]
    total = {"drift": math.sqrt(tot[0] / tot[1]) if tot[1] else None,
             "patch_to_drift": math.sqrt(tot[2] / tot[0]) if tot[0] and tot[2] else None,
             "cos_patch_drift": tot[3] / math.sqrt(tot[2] * tot[0]) if tot[0] and tot[2] else None}
    return {"formula": "drift = ‖θ′−θ‖/‖θ‖; patch_to_drift = ‖P‖/‖θ′−θ‖; cos = ⟨P, θ′−θ⟩/(‖P‖‖θ′−θ‖)",
            "total": total, "layers": layers, "tensors": per_tensor}


# ---------------------------------------------------------------------------------------------------
# the report, in words


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def summary(report: dict) -> str:
    """The terminal summary of a port report: counts, every adjusted and skipped tensor, warnings, drift."""
    c, p = report["counts"], report["patch"]
    lines = [f"port {p['spec']} ({p['kind']}) -> {report['new_base']['spec']}: {c['carried']} carried, "
             f"{c['adjusted']} carried with adjustment, {c['skipped']} skipped "
             f"(old base: {report['old_base']['spec'] or 'unknown'}; {report['old_base']['source']})"]
    rest = [m for m in report["modules"] if m["status"] != "carried"]
    for m in rest[:40]:
        lines.append(f"  {m['status']:9s} {m['name']}: {m['why']}")
    if len(rest) > 40:
        lines.append(f"  ... {len(rest) - 40} more adjusted/skipped tensors in {REPORT}")
    renamed = [m for m in report["modules"] if m["new_name"] and m["new_name"] != m["name"]]
    if renamed:
        m = renamed[0]
        lines.append(f"  re-keyed: {len(renamed)} tensor{'s' * (len(renamed) != 1)} matched to a new name by their "
                     f"common suffix, e.g. {m['name']} -> {m['new_name']} (all in {REPORT})")
    v = report.get("vocabulary")
    if v:
        lines.append(f"  vocabulary: {v['old_rows']} -> {v['new_rows']} rows, {v['shared_tokens']} shared tokens "
                     f"carried ({v['moved_tokens']} of them moved to another id), "
                     f"{v['new_tokens']} new token{'s' * (v['new_tokens'] != 1)} without patch; rows {_matched(v)}")
    for w in report["warnings"]:
        lines.append(f"  warning: {w}")
    d = report.get("drift")
    if d:
        lines.append(f"  drift vs the old base (total): drift {_fmt(d['total']['drift'])}, patch/drift "
                     f"{_fmt(d['total']['patch_to_drift'])}, cos {_fmt(d['total']['cos_patch_drift'])}")
        lines.append("    drift = ‖θ′−θ‖/‖θ‖ (how far the new version moved); patch/drift = ‖P‖/‖θ′−θ‖ (the patch "
                     "is small next to the move when ≪ 1); cos = cos(P, θ′−θ) (≈ 0: unrelated directions)")
        lines.append(f"    {'layer':28s} {'drift':>9s} {'patch/drift':>12s} {'cos':>9s}")
        for k, r in d["layers"].items():
            lines.append(f"    {k:28s} {_fmt(r['drift']):>9s} {_fmt(r['patch_to_drift']):>12s} "
                         f"{_fmt(r['cos_patch_drift']):>9s}")
    if report.get("output"):
        lines.append(f"  wrote {report['output']['path']} (details: {REPORT})")
    return "\n".join(lines)


def _card(report: dict) -> str:
    c = report["counts"]
    what = "LoRA/DoRA adapter (PEFT)" if report["patch"]["kind"] != "delta" else "weight delta"
    return f"""---
library_name: {'peft' if report['patch']['kind'] != 'delta' else 'readapt'}
tags: [readapt, portllm, port]
---
# Ported {what}

Made by readapt {__version__} on {report['created']}: the patch `{report['patch']['spec']}` (made on
`{report['old_base']['spec'] or 'an older version'}`) retargeted to `{report['new_base']['spec']}` with no training
(PortLLM: θ′ + P).

{c['carried']} tensors carried, {c['adjusted']} carried with adjustment (vocabulary rows matched by the text each
token stands for, DoRA magnitudes rescaled), {c['skipped']} skipped. Every tensor and the reason: `{REPORT}`.
"""
