"""LoRE-Adapt: per-layer low-rank compression of a weight delta, saved as a PEFT LoRA.

RE-Adapt (Fleshman & Van Durme, 2024, §3.3, "LoRE-Adapt"): every 2-D weight of the RE-Adapter Δ = Θ − Φ
is replaced by its best rank-k factors Ψ = B A, k by the τ rule or fixed (readapt.factorize). The
adapter is a PEFT LoRA with rank_pattern = alpha_pattern (scale alpha/r = 1), one fully qualified key per
module (addends.save_lora); norms, biases and tied embeddings are carried as PEFT's dense forms
(readapt.loreplan says which tensor is what and how it is carried).

    extract_lowrank(base, tuned, out, tau=0.5)    Δ = Θ − Φ from two checkpoints (no delta written)
    compress(delta_folder, out, rank=64)          Δ from a delta folder (readapt extract)
    (readapt.folding runs the same pass on Σ sᵢΨᵢ: merge --as-lora)

Both stream: one delta tensor in memory at a time (pass 1 factors each low-rank tensor as it comes and
notes which dense tensors changed; pass 2 re-reads only those as tuned values), then PEFT itself loads
what was written (`verify_peft`) before the output folder is committed.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from readapt.addends import PREFIX, Addend, CheckpointDifference, DeltaFolder, save_lora
from readapt.cards import LORE_REPORT, lore_card
from readapt.checkpoint import Checkpoint, Pair, ReadOptions, is_delta_folder, output_folder, progress, recorded_name
from readapt.errors import ReadaptError
from readapt.factorize import Product, check_rule, energy_of, factorize
from readapt.fidelity import Calibration
from readapt.loreplan import Entry, Policy, classify, lore_report, meta_model, need_config
from readapt.numerics import is_finite, parse_device, parse_dtype


def extract_lowrank(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, *,
                    tau: float | None = None, rank: int | None = None, svd: str = "auto",
                    device: str | None = None, policy: Policy | None = None, dtype: str | None = None,
                    skip_missing: bool = False, overwrite: bool = False, allow_pickle: bool = False,
                    verify: bool = True, calibration: str | os.PathLike | None = None,
                    read: ReadOptions | None = None) -> dict:
    """LoRE-Adapter of TUNED − BASE in one streaming pass (no delta written): a PEFT LoRA at `out`.

    Per 2-D weight Δ = U S Vᵀ, keep k(τ) = min{k : Σ_{i≤k}σᵢ²/Σσⱼ² ≥ τ} (or k = rank) directions:
    B = U_k S_k, A = V_kᵀ, saved with scale 1. One base/tuned tensor pair in memory at a time.
    Returns the report (also written to `out/lore_report.json`). `calibration` (a text file) adds the
    adapter's functional fidelity to the tuned model: mean KL(TUNED ‖ BASE + adapter) per token and top-1
    agreement (readapt.fidelity).
    """
    check_rule(tau, rank)
    policy = policy or Policy()
    policy.check()
    pair = Pair.open(base, tuned, ReadOptions.of(read, allow_pickle), skip_missing=skip_missing)
    source = FromPair(pair)
    entries = classify(source.config, pair.names, pair.base.shape, pair.floating)
    policy.apply(entries)
    rule = Rule(tau, rank, svd, parse_device(device), parse_dtype(dtype) or torch.float32)
    provenance = {"base": recorded_name(base), "tuned": recorded_name(tuned), "skipped_missing": pair.skipped}
    return write_lore(out, LorePass(entries, source, rule), overwrite=overwrite,
                      inputs=[pair.base.path, pair.tuned.path], base_model=recorded_name(base), provenance=provenance,
                      verify=verify,
                      fidelity=_fidelity(calibration, pair.base, CheckpointDifference(pair.tuned), device))


def compress(delta_dir: str | os.PathLike, out: str | os.PathLike, *, tau: float | None = None,
             rank: int | None = None, svd: str = "auto", device: str | None = None, policy: Policy | None = None,
             base: str | os.PathLike | None = None, dtype: str | None = None, overwrite: bool = False,
             verify: bool = True, allow_pickle: bool = False, calibration: str | os.PathLike | None = None,
             read: ReadOptions | None = None) -> dict:
    """LoRE-Adapter of a delta folder (readapt extract): a PEFT LoRA at `out` (same rule as extract_lowrank).

    Dense tensors (norms, biases, dense embeddings) are saved as tuned = base + Δ, so they need the base:
    `base`, else the base recorded in the delta's manifest; with --norms skip --biases skip none is needed.
    `calibration` measures the adapter against base + 1·Δ (the tuned model; readapt.fidelity), which needs the
    base too.
    """
    check_rule(tau, rank)
    policy = policy or Policy()
    policy.check()
    if not is_delta_folder(Path(delta_dir)):
        raise ReadaptError(f"{delta_dir} is not a delta folder (no readapt_delta.json); make one with "
                           f"`readapt extract BASE TUNED -o DELTA`, or pass BASE TUNED to `readapt extract --tau`")
    source = FromDelta(DeltaFolder(delta_dir))
    d = source.delta_folder
    entries = classify(source.config, d.ckpt.names, d.ckpt.shape, source.floating)
    policy.apply(entries)
    if calibration is not None or any(e.policy == "dense" for e in entries):
        spec = base or (d.manifest.get("base") or {}).get("path")
        if spec is None or (base is None and not Path(spec).exists()):
            need, other = (("--calibration runs base + adapter", "") if calibration is not None else
                           ("norms/biases/dense embeddings are saved as tuned values (PEFT modules_to_save)",
                            ", or --norms skip --biases skip (and no dense embeddings)"))
            raise ReadaptError(f"{need}, which needs the base checkpoint; the one in {d.path}'s manifest ({spec}) is "
                               f"gone. Pass --base BASE{other}")
        source.base = Checkpoint.open(spec, ReadOptions.of(read, allow_pickle))
    rule = Rule(tau, rank, svd, parse_device(device), parse_dtype(dtype) or torch.float32)
    b = source.base
    provenance = {"delta": recorded_name(delta_dir), "base_for_dense": str(b.path.absolute()) if b else None}
    return write_lore(out, LorePass(entries, source, rule), overwrite=overwrite,
                      inputs=[d.path] + ([b.path] if b else []),
                      base_model=recorded_name(base) if base else (d.manifest.get("base") or {}).get("spec"),
                      provenance=provenance, verify=verify, fidelity=_fidelity(calibration, b, d, device))


def _fidelity(calibration: str | os.PathLike | None, base: Checkpoint | None, reference: Addend,
              device: str | None) -> Callable[[Path], dict] | None:
    """The --calibration measurement of a LoRE adapter against base + 1·reference (the tuned model), or None.
    The file is read and tokenized now, so that a bad one fails before the long work."""
    if calibration is None:
        return None
    cal = Calibration(calibration, base, device)
    return lambda folder: cal.measure(base, [(reference, 1.0)], folder)


class FromPair:
    """Δ = Θ − Φ of two checkpoints (extract --tau, spectrum BASE TUNED); Θ where a dense tensor needs it."""

    def __init__(self, pair: Pair):
        self.pair, self.config = pair, need_config(pair.base.config, pair.base.path)
        self.floating, self.nbytes, self.delta = pair.floating, pair.nbytes, pair.delta

    def tuned(self, name: str) -> torch.Tensor:
        return self.pair.tuned.read(name)


class FromDelta:
    """Δ of a delta folder (compress, spectrum DELTA); Θ = Φ + Δ (with the delta's recorded exceptions)
    where a dense tensor needs it, from the base checkpoint `base` (set when one is needed)."""

    def __init__(self, d: DeltaFolder, base: Checkpoint | None = None):
        self.delta_folder, self.base, self.config = d, base, need_config(d.config, d.path)

    def floating(self, name: str) -> bool:
        return self.delta_folder.ckpt.dtype(name).is_floating_point

    def nbytes(self, name: str) -> int:
        info = self.delta_folder.ckpt.infos[name]
        return info.end - info.start

    def delta(self, name: str) -> torch.Tensor:
        return self.delta_folder.ckpt.read(name).float()

    def tuned(self, name: str) -> torch.Tensor:
        base_t = self.base.read(name)
        return self.delta_folder.tuned(name, base_t).to(base_t.dtype)


@dataclass(frozen=True)
class Rule:
    """How every low-rank tensor is factored: τ or a fixed rank, the SVD path, where, and the factors' dtype."""

    tau: float | None
    rank: int | None
    svd: str
    device: torch.device
    factor_dtype: torch.dtype


class LorePass:
    """The streaming pass of one LoRE job over its delta source (FromPair, FromDelta, or fold's FromMerge, whose
    delta may be a `Product`: factors never formed).

    `factors()` (pass 1) yields the (module, B, A) of every low-rank tensor, one delta tensor in memory at a
    time, and notes which dense tensors changed; `dense()` (pass 2) re-reads only those as tuned values
    and fills `extra_config` (trainable tokens, bias="lora_only", modules_to_save) as it goes."""

    def __init__(self, entries: list[Entry], source: FromPair | FromDelta, rule: Rule):
        self.entries, self.source, self.rule, self.config = entries, source, rule, source.config
        self.embeddings: set[str] = set()  # modules written as lora_embedding_A/B
        self.clamped: list[str] = []
        self.changed: list[Entry] = []  # 'dense' tensors whose delta is nonzero
        self.rows: dict[str, torch.Tensor] = {}  # tied embeddings carried dense: the changed rows
        self.extra_config: dict = {}  # filled by dense(), read by save_lora once every tensor is written

    def factors(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        todo = [e for e in self.entries if e.kind not in ("tied", "nonfloat", "unknown")]
        nbytes = self.source.nbytes
        with progress(sum(nbytes(e.name) for e in todo), "lowrank") as bar:
            for e in todo:
                d = self.source.delta(e.name)  # float32 Δ, one tensor in memory (or its factors: a Product)
                if not all(is_finite(t) for t in ((d.B, d.A) if isinstance(d, Product) else (d,))):
                    raise ReadaptError(f"tensor {e.name!r} has NaN/Inf values in the delta (they come from the "
                                       f"inputs); nothing was written")
                bar.update(nbytes(e.name))
                if e.policy != "lowrank":
                    self._note_dense(e, d.dense() if isinstance(d, Product) else d)
                    continue
                f = factorize(d.to(self.rule.device), tau=self.rule.tau, rank=self.rule.rank, svd=self.rule.svd)
                del d
                e.rank, e.energy, e.kept, e.residual = f.rank, f.energy, f.kept, f.residual
                if f.clamped:
                    self.clamped.append(e.name)
                if f.rank == 0:
                    e.note = "delta is all zero: skipped (rank 0)"
                    continue
                if e.kind == "embedding":
                    self.embeddings.add(e.module)
                yield e.module, f.B.to("cpu", self.rule.factor_dtype), f.A.to("cpu", self.rule.factor_dtype)

    def _note_dense(self, e: Entry, d: torch.Tensor) -> None:
        """A dense or skipped tensor in pass 1: its energy, and whether pass 2 carries it."""
        e.energy = energy_of(d)
        if e.policy == "dense" and e.energy > 0:
            e.kept, e.rank = e.energy, -1
            self.changed.append(e)
            if e.tied:
                self.rows[e.name] = d.ne(0).any(dim=1).nonzero().view(-1)
                e.rows = len(self.rows[e.name])
        elif e.policy == "dense":
            e.note = "unchanged: nothing to carry"
        else:
            e.note = "skipped by policy: its delta is lost"

    def dense(self) -> Iterator[tuple[str, torch.Tensor]]:
        tuned, extra = self.source.tuned, self.extra_config
        lora = {e.module for e in self.entries if e.policy == "lowrank" and e.rank > 0}
        to_save: list[str] = []
        for e in self.changed:
            if e.name in self.rows:  # PEFT trainable tokens: the tuned rows R, tied to lm_head by PEFT
                r = self.rows.pop(e.name)
                extra.setdefault("trainable_token_indices", {})[e.module] = r.tolist()
                e.note = (f"tied to lm_head: its {len(r)} changed rows carried as the tuned rows (PEFT "
                          f"trainable_token_indices, tied to lm_head)")
                yield f"{PREFIX}{e.module}.token_adapter.trainable_tokens_delta", tuned(e.name)[r]
            elif e.kind == "bias" and e.module in lora:
                extra["bias"] = "lora_only"  # PEFT loads <module>.base_layer.bias into the layer
                e.note = "carried as the tuned <module>.base_layer.bias (PEFT bias='lora_only')"
                yield f"{PREFIX}{e.module}.base_layer.bias", tuned(e.name)
            elif e.module not in to_save:
                to_save.append(e.module)
        for mod in to_save:  # PEFT modules_to_save: every parameter of the module, tuned values
            for e in self.entries:
                if e.module == mod and e.kind not in ("tied", "nonfloat", "unknown"):
                    if e.policy == "lowrank":
                        e.note = "weight unchanged, bias changed: module carried dense (modules_to_save)"
                    elif not e.note:
                        e.note = "carried dense (PEFT modules_to_save)"
                    yield f"{PREFIX}{e.name}", tuned(e.name)
        if to_save:
            extra["modules_to_save"] = to_save


def write_lore(out: str | os.PathLike, job: LorePass, *, overwrite: bool, inputs: list[Path],
               base_model: str | None, provenance: dict, verify: bool, fidelity: Callable[[Path], dict] | None = None,
               report_file: str = LORE_REPORT, card: Callable[[dict], str] = lore_card,
               amend: Callable[[dict, Path], None] | None = None) -> dict:
    """Run the pass into a PEFT LoRA folder at `out`, verify it the way PEFT loads it, write report and card.
    `amend(report, folder)` adds a job's own fields (fold); `fidelity(folder)` measures the written adapter
    against its dense model (--calibration, readapt.fidelity) before the folder is committed."""
    rule = job.rule
    with output_folder(Path(out), overwrite, inputs=inputs) as tmp:
        save_lora(tmp, job.factors(), base_model=base_model, extra_tensors=job.dense(),
                  extra_config=job.extra_config, embeddings=job.embeddings)
        if job.clamped:
            c = job.clamped
            warnings.warn(f"--rank {rule.rank} is above min(out, in) or the numerical rank of {len(c)} tensors "
                          f"({', '.join(c[:3])}{' ...' if len(c) > 3 else ''}): clamped to it", stacklevel=3)
        if verify:
            verify_peft(tmp, job.config)
        report = lore_report(job.entries, tau=rule.tau, rank=rule.rank, svd=rule.svd, provenance=provenance)
        if amend is not None:
            amend(report, tmp)
        if fidelity is not None:
            report["fidelity"] = fidelity(tmp)
        (tmp / report_file).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(card(report))
    return report


def verify_peft(folder: Path, config: dict) -> None:
    """Inject the written adapter_config into the model class (meta device) with PEFT and load the
    written tensor names/shapes with PEFT's own `set_peft_model_state_dict`; raise if PEFT would ignore
    any tensor (unexpected key), misses any factor, or wraps another set of modules than was written."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    cfg = LoraConfig.from_pretrained(str(folder))
    model = meta_model(config)
    written = Checkpoint.open(folder)
    sd = {n: torch.empty(written.shape(n), dtype=written.dtype(n), device="meta") for n in written.names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel(model, cfg, low_cpu_mem_usage=True)
        try:
            result = set_peft_model_state_dict(pm, sd, low_cpu_mem_usage=True)
        except RuntimeError as err:  # size mismatch
            raise ReadaptError(f"PEFT cannot load the adapter just written to {folder}: {err}") from None
    if result.unexpected_keys:
        raise ReadaptError(f"PEFT would ignore {len(result.unexpected_keys)} tensors of the adapter written to "
                           f"{folder} ({', '.join(result.unexpected_keys[:3])}); this is a readapt bug, please report")
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    expected = set((cfg.rank_pattern or {}).keys())
    if wrapped != expected:
        raise ReadaptError(f"PEFT wraps {sorted(wrapped ^ expected)[:3]} differently from what was written to "
                           f"{folder}; this is a readapt bug, please report")
    missing = [k for k in result.missing_keys if ".lora_" in k and ".default" in k]
    if missing:
        raise ReadaptError(f"PEFT finds no value for {len(missing)} LoRA factors in {folder} ({missing[:3]})")
