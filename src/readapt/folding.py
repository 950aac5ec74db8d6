"""Fold a partial adaptation Ω = Φ + Σᵢ sᵢ·Ψᵢ into ONE PEFT LoRA adapter on the shared base Φ
(`readapt merge BASE --add A:s --add B:s -o OUT --as-lora [--rank R | --tau T]`), for multi-LoRA serving.

Per base tensor n that an addend touches, the fold carries D[n] = Σᵢ sᵢ·Ψᵢ[n] (Ψᵢ as merge computes it:
s·B·A for LoRA, W′ − W for DoRA, Δ for a delta folder, Θ − Φ for a checkpoint) so that Φ + D = Ω:

    exact mode (no rank rule; every addend a plain LoRA or rsLoRA on the 2-D weights):
        B = [s₁·c₁·B₁, s₂·c₂·B₂, …],  A = [A₁; A₂; …]       (cᵢ = alphaᵢ/rᵢ, or alphaᵢ/√rᵢ for rsLoRA)
        so B A = Σ sᵢ·cᵢ·Bᵢ Aᵢ = D exactly, rank Σ rᵢ, saved with scale 1 (rank_pattern = alpha_pattern)
    compressed mode (--rank or --tau: needed once an addend is a delta, a checkpoint or DoRA):
        B̂ Â = the best rank-k approximation of D (Eckart–Young), k by LoRE's rule (readapt.factorize),
        from the stacked factors when every term on n is a plain LoRA term (a `Product`: QR of B and Aᵀ,
        SVD of the R×R core, no m×n matrix), else from the dense D, one tensor in memory at a time

Embeddings, lm_head, norms and biases are carried as `extract --tau` carries them (readapt.loreplan's
Policy): norms and biases dense as Ω's own values (PEFT modules_to_save, bias="lora_only"), a tied
embedding as the changed rows of Ω (PEFT trainable tokens). The pass and the writer are LoRE's
(readapt.lowrank.LorePass, write_lore): same rank rule, same PEFT layout, same check that PEFT loads it.

The report (fold_report.json) gives per tensor the rank, the kept energy and the relative error
‖Ω − Ω̂‖/‖Ω − Φ‖ = ‖D − B̂Â‖/‖D‖, the mode, and the adapter's size against the dense model's; with a
calibration text, the functional fidelity KL(Ω ‖ Φ + adapter) (readapt.fidelity).

PEFT's add_weighted_adapter is not the same operation: it combines DoRA adapters through their LoRA
factors alone (dropping the magnitude renormalisation), which is why a DoRA addend here enters as W′ − W.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from readapt.addends import Addend, AddSpec, CheckpointDifference, DeltaFolder, Kind, LoraAdapter, LoraTerm
from readapt.cards import FOLD_REPORT, fold_card
from readapt.checkpoint import Blocks, Checkpoint, ReadOptions, recorded_name
from readapt.errors import ReadaptError
from readapt.factorize import Product, check_rule, one_thread
from readapt.fidelity import Calibration
from readapt.loreplan import Entry, Policy, classify, need_config
from readapt.lowrank import LorePass, Rule, write_lore
from readapt.merging import merged, open_inputs
from readapt.numerics import parse_device, parse_dtype


def fold(base: str | os.PathLike, out: str | os.PathLike, adds: Sequence[AddSpec], *, rank: int | None = None,
         tau: float | None = None, svd: str = "auto", device: str | None = None, policy: Policy | None = None,
         dtype: str | torch.dtype | None = None, calibration: str | os.PathLike | None = None,
         skip_missing: bool = False, overwrite: bool = False, allow_pickle: bool = False, verify: bool = True,
         read: ReadOptions | None = None) -> dict:
    """Write Ω = Φ + Σᵢ sᵢ·Ψᵢ as one PEFT LoRA adapter for `base` at `out`; returns the report.

    Per touched 2-D weight, D = Σᵢ sᵢ·Ψᵢ is carried as B A with scale 1: exactly (no `rank`/`tau`: the
    LoRA factors concatenated, B = [sᵢ·cᵢ·Bᵢ], A = [Aᵢ], every addend a plain LoRA/rsLoRA) or as its best
    rank-k approximation (`rank`, or `tau`: k = min{k : Σ_{i≤k}σᵢ²/Σσⱼ² ≥ τ}), so that
    PeftModel.from_pretrained(BASE, out).merge_and_unload() ≈ `merge(base, ..., adds)`. `dtype`: the factors'
    (default float32). `calibration`: a text file; adds mean KL(Ω ‖ Φ + adapter) per token and top-1 agreement.
    Refuses what merge refuses; nothing is written on failure.
    """
    factor_dtype = parse_dtype(dtype) or torch.float32
    exact = rank is None and tau is None
    if not exact:
        check_rule(tau, rank)
    policy = policy or Policy()
    policy.check()
    b, addends = open_inputs(base, adds, skip_missing, ReadOptions.of(read, allow_pickle))
    if not addends:
        raise ReadaptError("nothing to fold: give at least one adapter with its scale")
    source = FromMerge(b, addends)
    entries = classify(source.config, source.names, b.shape, source.floating)
    policy.apply(entries)
    if exact:
        _check_exact(entries, source)
    cal = Calibration(calibration, b, device) if calibration is not None else None
    rule = Rule(tau, rank, svd, parse_device(device), factor_dtype)
    provenance = {"base": recorded_name(base), "addends": [
        {"spec": a.label, "kind": str(a.kind), "scale": s} for a, s in addends]}

    def amend(report: dict, folder: Path) -> None:
        _fold_fields(report, folder, b, source, exact)

    return write_lore(out, LorePass(entries, source, rule), overwrite=overwrite,
                      inputs=[b.path] + [a.path for a, _ in addends], base_model=recorded_name(base),
                      provenance=provenance, verify=verify, report_file=FOLD_REPORT, card=fold_card, amend=amend,
                      fidelity=None if cal is None else lambda folder: cal.measure(b, addends, folder))


class FromMerge:
    """D[n] = Σᵢ sᵢ·Ψᵢ[n] over the addends that touch n, as LorePass reads a delta source: `delta(n)` is a
    `Product` of stacked factors when every term on n is a plain LoRA term, else the dense float32 D[n];
    `tuned(n)` is Ω[n] exactly as merge writes it (for the tensors carried as values)."""

    def __init__(self, base: Checkpoint, addends: Sequence[tuple[Addend, float]]):
        self.base, self.config = base, need_config(base.config, base.path)
        self.terms: dict[str, list[tuple[Addend, float]]] = {}
        for a, s in addends:
            for n in a.targets():
                self.terms.setdefault(n, []).append((a, s))
        self.names = [n for n in base.names if n in self.terms]  # in the base's order
        self.from_factors: set[str] = set()

    def floating(self, name: str) -> bool:
        return self.base.dtype(name).is_floating_point

    def nbytes(self, name: str) -> int:
        info = self.base.infos[name]
        return info.end - info.start

    def factored(self, name: str) -> bool:
        """Whether every term on `name` is a plain LoRA term s·c·B·A."""
        return all(isinstance(a, LoraAdapter) and a.factored(name) for a, _ in self.terms[name])

    def delta(self, name: str) -> torch.Tensor | Product:
        terms = self.terms[name]
        if self.factored(name):  # small tensors (m×R, R×n): one thread (see factorize.one_thread)
            self.from_factors.add(name)
            with one_thread(torch.device("cpu")):
                return stacked([(a.term(name), s) for a, s in terms])
        W = self.base.read(name).float() if any(_from_phi(a, name) for a, _ in terms) else None
        acc = None  # Σ sᵢ·Ψᵢ: one buffer besides the term at hand (and Φ where it is read)
        for a, s in terms:
            if isinstance(a, LoraAdapter) and a.factored(name):
                d = a.term(name).delta()  # s·B·A as PEFT's get_delta_weight computes it
            elif isinstance(a, CheckpointDifference) and a.pair is not None:
                d = a.pair.delta(name)  # Θ − Φ
            else:
                d = a.delta(name, W)
            if d is not None:
                acc = d.mul_(s) if acc is None else acc.add_(d, alpha=s)
        return torch.zeros(self.base.shape(name)) if acc is None else acc

    def tuned(self, name: str) -> torch.Tensor:
        t = merged(self.base, name, self.terms[name])
        return materialize(t) if isinstance(t, Blocks) else t


def _from_phi(a: Addend, name: str) -> bool:
    """Whether Ψᵢ[name] is computed from the whole Φ (DoRA's W′, trainable tokens, saved tensors); not a LoRA
    term s·B·A, a delta folder's stored Δ, or a checkpoint's Θ − Φ (its Pair subtracts Φ in blocks)."""
    if isinstance(a, LoraAdapter):
        return not a.factored(name)
    if isinstance(a, CheckpointDifference):
        return a.pair is None
    return not isinstance(a, DeltaFolder)


def stacked(terms: Sequence[tuple[LoraTerm, float]]) -> Product:
    """Σᵢ sᵢ·cᵢ·Bᵢ Aᵢ as one product B A, B = [s₁c₁B₁, s₂c₂B₂, …] (columns), A = [A₁; A₂; …] (rows), in the
    base tensor's orientation (an embedding's Ψ = c·(B A)ᵀ = c·Aᵀ Bᵀ enters as B ← Aᵀ, A ← Bᵀ)."""
    Bs, As = [], []
    for t, s in terms:
        B, A = (t.A.T, t.B.T) if t.transposed else (t.B, t.A)
        Bs.append(B * (s * t.scale))
        As.append(A)
    return Product(torch.cat(Bs, dim=1), torch.cat(As, dim=0).contiguous())


def materialize(t: Blocks) -> torch.Tensor:
    """A tensor that merge yields block by block, whole (its blocks are reused buffers: copied as they come)."""
    out = torch.empty(math.prod(t.shape), dtype=t.dtype)
    i = 0
    for blk in t.blocks:
        out[i:i + blk.numel()].copy_(blk)
        i += blk.numel()
    return out.view(t.shape)


_WHY = {Kind.DELTA: "a dense delta folder (Δ has full rank)", Kind.CHECKPOINT: "a full checkpoint (Θ − Φ is dense)",
        Kind.DORA: "a DoRA adapter (W′ − W renormalises every row: not a product of its factors)",
        Kind.PORTED_DELTA: "a dense (ported) delta"}


def _check_exact(entries: Sequence[Entry], source: FromMerge) -> None:
    """Exact mode: every term on a tensor carried low rank must be a plain LoRA term; else name the addend,
    the tensor, and why, and ask for a rank rule."""
    for e in entries:
        if e.policy != "lowrank" or source.factored(e.name):
            continue
        a = next(a for a, _ in source.terms[e.name] if not (isinstance(a, LoraAdapter) and a.factored(e.name)))
        kind = Kind.DORA if isinstance(a, LoraAdapter) and a.variant.kind is Kind.DORA else a.kind
        why = _WHY.get(kind, "a full tensor (modules_to_save or trainable tokens), not LoRA factors")
        raise ReadaptError(f"--as-lora without --rank/--tau folds exactly by concatenating LoRA factors, but "
                           f"{a.label} changes {e.name} as {why}: give --rank R or --tau T to fold it compressed "
                           f"(the best rank-R approximation of the sum)")


def _fold_fields(report: dict, folder: Path, base: Checkpoint, source: FromMerge, exact: bool) -> None:
    """The fold's own fields of the report: the mode and whether the result is exact, the path of each tensor,
    and the adapter's size against the dense model's."""
    lost = [t["name"] for t in report["tensors"] if t["energy"] and t["kept"] < t["energy"]]
    report["format"] = "readapt-fold-report"
    report["mode"] = "exact" if exact else "compressed"
    report["exact"] = exact and not lost
    if exact:
        report["rule"] = {"exact": True}
    for t in report["tensors"]:
        t["from_factors"] = t["name"] in source.from_factors
    adapter = Checkpoint.open(folder)
    floats = [n for n in base.names if base.dtype(n).is_floating_point]
    report["totals"] = {
        "adapter_bytes": adapter.nbytes, "model_bytes": base.nbytes,
        "adapter_params": sum(math.prod(adapter.shape(n)) for n in adapter.names),
        "model_params": sum(math.prod(base.shape(n)) for n in floats),
        "not_carried": lost if exact else [t["name"] for t in report["tensors"] if t["policy"] == "skip"
                                           and t["energy"]],
    }
