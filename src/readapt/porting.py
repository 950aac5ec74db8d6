"""Port (PortLLM): carry a patch learned on one model version to the next, with no training and no data.

PortLLM (Khan et al., 2024, "PortLLM: Personalizing Evolving Large Language Models with Training-Free
and Portable Model Patches", §3): a patch P = θ_ft − θ learned on version θ is added to the new version θ′,

    θ′_ported = θ′ + P          (LoRA: P = s·B·A; delta folder: P = Δ, e.g. instruct_v1 − base_v1)

and the residual between re-fine-tuning θ′ and θ′ + P has rank ≤ 2r and a small norm. A real version
change also renames modules, grows the vocabulary and changes configs, so every tensor of the patch is
mapped to the new base (readapt.portmap) and gets one status in the report:

    carried    same (or re-keyed) name and shape: P is added as it is
    adjusted   vocabulary rows (embed_tokens / lm_head): new row j gets P's row i when token j of the new
               tokenizer stands for the same text as token i of the old one, each decoded in its own
               tokenizer's convention (readapt.vocab: SentencePiece ▁ and <0xNN>, byte-level Ġ, ...;
               identical strings first; special tokens by identical string only); new tokens get no
               patch. DoRA magnitudes rescaled (below). PEFT modules_to_save copies and trainable
               tokens (whole saved values) turned back into a patch (saved − old values) and added to
               the new values (trainable-token rows follow their tokens to the new ids).
    skipped    absent from the new base, other shape differences, tokenizers missing, ... (with why)

DoRA (Liu et al. 2024): W′ = m ⊙ (W + sBA) / ‖W + sBA‖, norm per output row (per column for embeddings).
m was learned for the old W: DoRA starts it at m₀ = ‖W_old‖, so what training learned is the ratio
m / ‖W_old‖. Carrying m verbatim would force the new model's row norms back to the old fine-tuned ones
and drop whatever the new version changed in them; so, when the old base is known, the port carries the
learned ratio:  m′ = m ⊙ ‖W_new‖ / ‖W_old‖  (m′ = m when W_new = W_old; rows of new tokens get
m′ = ‖W_new‖, i.e. no change). Without the old base m is carried verbatim and the report warns.

Outputs: a retargeted PEFT adapter folder (or a delta folder for a delta patch), or with merge=True the
complete model folder θ′ + P written by `readapt.merging.merge`; every output holds `port_report.json`.
With an explicit old base the report adds the version drift ‖θ′ − θ‖/‖θ‖ per tensor and per layer, the
patch's norm relative to the drift and cos(P, θ′ − θ), streamed one tensor at a time (readapt.drift).

The port runs in phases: open the inputs (`_open`), check the architecture (`_check_architecture`), map
every tensor (`_match`), collect the warnings (`_warnings`), build the report, refuse what cannot be ported
(`_refuse`), then carry the patch (`_carry`: a retargeted adapter or delta, or the merged model).

Memory: no model is ever loaded; one tensor of the new base (with --from also its old counterpart) and
one patch tensor are in memory at a time, so a port costs a merge, not a fine-tune (benchmarks/bench_port.py).
"""


from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from readapt._version import __version__
from readapt.addends import TOKENS, DeltaFolder, Kind, LoraAdapter, PortedDelta, open_addend
from readapt.cards import PORT_REPORT, port_card, port_summary
from readapt.checkpoint import (DELTA_MANIFEST, Checkpoint, ReadOptions, check_output, compare_configs,
                                is_delta_folder, is_peft_folder, open_model, output_folder, resolve_model)
from readapt.drift import drift
from readapt.errors import ReadaptError
from readapt.merging import merge as merged_model
from readapt.portmap import TIED_OLD, Item, Vocab, map_tensor, rekey, tied_head
from readapt.retarget import write_delta, write_peft


@dataclass
class _Sources:
    """What a port reads: the patch (`src`, opened as a LoRA adapter or a delta folder), the new base and,
    when known, the old base with its config and model class."""

    patch: str  # as the user gave it
    path: Path  # the patch folder
    src: LoraAdapter | DeltaFolder
    kind: Kind  # Kind.LORA, Kind.DORA or Kind.DELTA: what the report calls the patch
    new: Checkpoint
    read: ReadOptions
    recorded: str | None  # the old base the patch records
    old: Checkpoint | None = None
    old_source: str = ""
    old_cfg: dict | None = None
    old_class: str | None = None

    @property
    def inputs(self) -> list[Path]:
        return [self.path, self.new.path] + ([self.old.path] if self.old else [])


def port(patch: str | os.PathLike, to: str | os.PathLike, out: str | os.PathLike | None, *,
         from_: str | os.PathLike | None = None, merge: bool = False, strict: bool = False,
         overwrite: bool = False, dtype: str | torch.dtype | None = None, max_shard_size: int | str = "5GB",
         allow_pickle: bool = False, read: ReadOptions | None = None, whole_tensors: bool = False) -> dict:
    """Carry `patch` (a PEFT LoRA/DoRA adapter or a delta folder made on an old version) to the new base `to`.

    Writes at `out`: θ′ + P as a complete model folder (merge=True, the folder `readapt merge` writes), or
    else the patch retargeted to `to` (a PEFT adapter folder `PeftModel.from_pretrained(to, out)` loads,
    or a delta folder). Each gets `port_report.json`; the report is also returned (out=None: report only,
    nothing written). `from_` is the old base: it enables the drift statistics and DoRA magnitude
    rescaling (without it the base recorded in the patch is used for the latter when it is found locally).
    Refuses: a different architecture, PEFT keys that match nothing in `to`, nothing carried, and with
    strict=True any skipped tensor. Pickled .bin weights are read only with allow_pickle=True.
    whole_tensors: with merge=True, LoRA/DoRA terms on whole tensors (merging.iter_merged).
    """
    if dtype is not None and not merge:
        raise ReadaptError("--dtype (dtype=) applies only with --merge: a retargeted patch keeps its own dtype")
    s = _open(patch, to, from_, ReadOptions.of(read, allow_pickle))
    if out is not None:  # before any long work: the checks output_folder makes again at the end
        check_output(out, overwrite, inputs=s.inputs)
    _check_architecture(s, to, from_)
    items, vocab, base_copies = _match(s)
    report = {
        "readapt_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "patch": {"spec": str(patch), "path": str(s.path.resolve()), "kind": s.kind.value},
        "new_base": {"spec": str(to), "path": str(s.new.path.resolve()),
                     "model_type": (s.new.config or {}).get("model_type")},
        "old_base": {"spec": str(s.old.path) if s.old else None, "path": str(s.old.path.resolve()) if s.old else None,
                     "source": s.old_source or "unknown"},
        "output": None if out is None else {"path": str(Path(out).expanduser().absolute()), "merged": merge},
        "counts": {c: sum(it.status == c for it in items) for c in ("carried", "adjusted", "skipped")},
        "vocabulary": vocab.stats or None,
        "warnings": _warnings(s, from_, items, vocab, base_copies),
        "modules": [it.as_dict() for it in items],
        "drift": None,
    }
    _refuse(report, s, to, items, strict)
    return _carry(s, to, out, [it for it in items if it.status != "skipped"], report, from_=from_, merge=merge,
                  dtype=dtype, overwrite=overwrite, max_shard_size=max_shard_size, whole_tensors=whole_tensors)


def _open(patch, to, from_, read: ReadOptions) -> _Sources:
    """The new base (--to), the patch, and the old base: --from, else the one the patch records (if found)."""
    new = _open_model(to, "--to", read)
    try:
        path = resolve_model(patch)
    except ReadaptError as err:
        raise ReadaptError(f"PATCH {patch}: {err}") from None
    old = (_open_model(from_, "--from", read), "--from") if from_ is not None else (None, "")
    if is_peft_folder(path):
        src = LoraAdapter(path, label=str(patch), read=read)
        s = _Sources(str(patch), path, src, src.variant.kind, new, read, _recorded_base(src),
                     old_class=src.made_on()[1])
        where = f"base_model_name_or_path in {path / 'adapter_config.json'}"
    elif is_delta_folder(path):
        src = DeltaFolder(path, label=str(patch))
        s = _Sources(str(patch), path, src, Kind.DELTA, new, read, _recorded_base(src))
        where = f"the base recorded in {path / DELTA_MANIFEST}"
    else:
        raise ReadaptError(f"{patch} is not a patch: expected a PEFT LoRA/DoRA adapter folder (adapter_config.json) "
                           f"or a delta folder (readapt_delta.json). For a full fine-tuned checkpoint, make its delta "
                           f"first: readapt extract OLD_BASE TUNED -o DELTA")
    s.old, s.old_source = old
    if s.old is None and s.recorded:
        s.old, s.old_source = _open_old(s.recorded, where, read)
    s.old_cfg = s.old.config if s.old is not None else (src.config if s.kind is Kind.DELTA else None)
    return s


def _check_architecture(s: _Sources, to, from_) -> None:
    """One architecture on both sides (model_type, model class); the patch fits the old base it names
    (--from: refused otherwise; a recorded base that does not fit is dropped)."""
    new_cfg = s.new.config or {}
    old_type, new_type = (s.old_cfg or {}).get("model_type"), new_cfg.get("model_type")
    if old_type and new_type and old_type != new_type:
        made_on = f"the old base --from {from_} is" if s.old_source == "--from" else f"{s.patch} was made on"
        raise ReadaptError(f"{made_on} a {old_type!r} model but {to} is a {new_type!r} model: a patch only "
                           f"ports between versions of one architecture")
    new_class = (new_cfg.get("architectures") or [None])[0]
    if s.old_class and new_class and s.old_class != new_class:
        raise ReadaptError(f"{s.patch} was trained on a {s.old_class} but {to} is a {new_class} (adapter_config.json "
                           f"auto_mapping): a patch only ports between versions of one architecture")
    if s.old is None:
        return
    misfit = [n for n, shape in s.src.targets().items() if not tied_head(n, s.old) and
              (n not in s.old or (shape is not None and tuple(shape) != s.old.shape(n)))]
    if misfit and s.old_source == "--from":
        raise ReadaptError(f"{s.patch} does not fit the old base {from_}: {len(misfit)} of its tensors are missing "
                           f"there or have another shape ({', '.join(misfit[:5])}); pass the base it was made on")
    if misfit:
        s.old, s.old_source = None, f"the base recorded in the patch does not fit it ({misfit[0]})"
        s.old_cfg = None if s.kind is not Kind.DELTA else s.src.config


def _match(s: _Sources) -> tuple[list[Item], Vocab, list[str]]:
    """(an Item for every tensor of the patch, the vocabularies compared, PEFT's base_layer copies left out)."""
    targets = s.src.targets()
    names = rekey(list(targets), s.new.names)
    vocab = Vocab([p for p in (s.old.path if s.old else None, s.path) if p is not None], s.new.path)
    modules = s.src.modules if isinstance(s.src, LoraAdapter) else {}
    base_copies = [n for n, m in modules.items() if set(m.parts) <= {"base_layer.weight", "base_layer.bias"}]
    tokens = {n for n, m in modules.items() if TOKENS in m.parts}
    if s.old is not None:  # trainable tokens record rows, not the tensor's shape: the old base has it
        targets = {n: s.old.shape(n) if n in tokens and n in s.old else shape for n, shape in targets.items()}
    items = [Item(n, None, "skipped", TIED_OLD, shape) if s.old is not None and tied_head(n, s.old) else
             map_tensor(n, shape, s.new, names, vocab, s.new.config or {})
             for n, shape in targets.items() if n not in base_copies]
    for it in items if modules else ():
        parts = modules[it.name].parts
        saved = it.name in tokens or any(p in ("weight", "bias") or p.startswith("modules_to_save") for p in parts)
        what = "trainable-token rows" if it.name in tokens else "a modules_to_save copy"
        if saved and s.old is None and (it.status != "skipped" or it.name in tokens):  # tokens: no shape to match
            it.status, it.why = "skipped", (f"{what} of the old tensor: its patch is (saved − old values); pass "
                                            f"--from OLD_BASE to carry it")
        elif saved and it.status != "skipped":
            it.status, it.why = "adjusted", f"{what}: new values + (saved − old values); " + it.why
        elif it.status != "skipped" and "lora_magnitude_vector" in parts and s.old is not None:
            it.status, it.why = "adjusted", "DoRA magnitude rescaled m′ = m·‖W_new‖/‖W_old‖; " + it.why
    return items, vocab, base_copies


def _warnings(s: _Sources, from_, items: list[Item], vocab: Vocab, base_copies: list[str]) -> list[str]:
    """What the report warns about: configs, tied embeddings, rows carried by id, the old base, DoRA."""
    new_cfg, old_cfg = s.new.config or {}, s.old_cfg
    warnings = _config_warnings(old_cfg, new_cfg)
    embeddings = any(it.name.endswith("embed_tokens.weight") and it.status != "skipped" for it in items)
    if old_cfg and old_cfg.get("tie_word_embeddings") and not new_cfg.get("tie_word_embeddings") and embeddings:
        warnings.append("the old base tied lm_head to embed_tokens, the new one has its own lm_head: the embed_tokens "
                        "patch is carried to embed_tokens only; the new lm_head gets no patch")
    if old_cfg and not old_cfg.get("tie_word_embeddings") and new_cfg.get("tie_word_embeddings") and embeddings:
        warnings.append("the new base ties lm_head to embed_tokens, the old one did not: the embed_tokens patch now "
                        "also changes the output layer")
    by_id = [it.new_name for it in items if it.status == "carried" and "tokenizers not compared" in it.why]
    if by_id:
        warnings.append(f"{', '.join(by_id)} carried row for row by token id, because the tokenizers were not compared "
                        f"(old: {vocab.old_from}; new: {vocab.new_from}); if the new version moved tokens to other "
                        f"ids these rows are patched wrongly: make both tokenizers available (the old one with --from "
                        f"OLD_BASE or in the patch folder, the new one in NEW_BASE)")
    if from_ is not None and s.recorded:
        try:
            rec_path = resolve_model(s.recorded)
        except ReadaptError:
            rec_path = None
        if rec_path is not None and not _same_folder(rec_path, s.old.path):
            warnings.append(f"--from {from_} is not the base recorded in the patch ({s.recorded}): the drift, DoRA "
                            f"rescaling, modules_to_save patches and old vocabulary all come from --from")
    if s.old is not None and _same_folder(s.old.path, s.new.path):
        warnings.append("the old base and --to are the same checkpoint: nothing changed between the versions")
    if s.kind is Kind.DORA and s.old is None:
        warnings.append("DoRA magnitudes carried verbatim: they are the old model's fine-tuned row norms and override "
                        "the new base's; pass --from OLD_BASE to rescale them (m′ = m·‖W_new‖/‖W_old‖)")
    modules = s.src.modules if isinstance(s.src, LoraAdapter) else {}
    if base_copies or any("base_layer.weight" in modules[it.name].parts for it in items if modules):
        warnings.append("PEFT's copies of the old base's embedding layers (base_layer.weight, saved when embeddings "
                        "are targeted) are old weights, not part of the patch: not carried")
    return warnings


def _refuse(report: dict, s: _Sources, to, items: list[Item], strict: bool) -> None:
    """Refuse (nothing written; the error carries the report) PEFT keys that match no module of the new base,
    a patch of which nothing carries, and with --strict any skipped tensor."""
    def refuse(msg: str):
        err = ReadaptError(msg + "\n" + port_summary({**report, "output": None}))
        err.report = report
        raise err

    unmatched = [it.name for it in items if it.new_name is None and "ties lm_head" not in it.why]
    if unmatched and s.kind is not Kind.DELTA:
        refuse(f"{s.patch} has adapter keys that match no module of {to} ({len(unmatched)}: "
               f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}): it was trained on another model")
    if report["counts"]["carried"] + report["counts"]["adjusted"] == 0:
        refuse(f"nothing in {s.patch} can be carried to {to}")
    if strict and report["counts"]["skipped"]:
        refuse(f"--strict: {report['counts']['skipped']} tensors of {s.patch} cannot be carried to {to}")


def _carry(s: _Sources, to, out, carried: list[Item], report: dict, *, from_, merge: bool, dtype, overwrite: bool,
           max_shard_size, whole_tensors: bool = False) -> dict:
    """The ported patch as an addend of the new base (with the drift statistics when --from is given), then
    written: the merged model (merge=True), or the retargeted adapter or delta folder with report and card."""
    with tempfile.TemporaryDirectory(prefix="readapt-port-") as tmp:
        if s.kind is Kind.DELTA:
            ported = PortedDelta(s.src, carried, s.new, label=f"{s.patch} (ported)")
        else:
            write_peft(Path(tmp), s.src, carried, s.new, s.old, to)
            ported = open_addend(tmp, s.new)
            ported.label = f"{s.patch} (ported)"
        if from_ is not None:
            report["drift"] = drift(s.new, s.old, ported, {it.new_name: it for it in carried})
        if out is None:
            return report
        text = json.dumps(report, indent=2) + "\n"
        if merge:
            merged_model(to, out, [(ported, 1.0)], dtype=dtype, overwrite=overwrite, max_shard_size=max_shard_size,
                         read=s.read, extra_files={PORT_REPORT: text}, whole_tensors=whole_tensors)
            return report
        with output_folder(out, overwrite, inputs=s.inputs) as dst:
            if s.kind is Kind.DELTA:
                write_delta(dst, ported, report, max_shard_size)
            else:
                for f in Path(tmp).iterdir():
                    shutil.copyfile(f, dst / f.name)
            (dst / PORT_REPORT).write_text(text)
            (dst / "README.md").write_text(port_card(report))
    return report


def _config_warnings(old_cfg: dict | None, new_cfg: dict | None) -> list[str]:
    """Config differences between the versions: warnings, each tensor being carried or skipped on its own."""
    if not new_cfg:
        return ["the new base (--to) has no config.json: its architecture and config were not checked"]
    if not old_cfg:
        return ["the old base's config is unknown (pass --from OLD_BASE): config differences were not checked"]
    errors, warns = compare_configs(new_cfg, old_cfg, "the new base", "the old base")
    return [e + " (each tensor it affects is carried, adjusted or skipped on its own: see the list)"
            for e in errors] + warns


def _open_old(spec, source: str, read: ReadOptions) -> tuple[Checkpoint | None, str]:
    """The old base the patch records, and where that came from; (None, why) when it cannot be opened."""
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


def _recorded_base(src: LoraAdapter | DeltaFolder) -> str | None:
    """The old base a patch says it was made on: PEFT's base_model_name_or_path, or a delta's manifest."""
    if isinstance(src, DeltaFolder):
        rec = src.manifest.get("base") or {}
        return next((s for s in (rec.get("path"), rec.get("spec")) if s and Path(s).is_dir()), None)
    return src.config.get("base_model_name_or_path") or None


def _same_folder(a: Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
