"""The singular-value spectrum of a weight delta: how much of each layer's Δ a rank keeps, and its plots.

RE-Adapt (Fleshman & Van Durme, 2024), Figures 2 and 3: per 2-D delta tensor the cumulative explained
variance v_k = Σ_{i≤k} σᵢ² / Σⱼ σⱼ² against k, and the share of the delta's parameters a LoRE-Adapter keeps
at each τ. `spectrum` writes spectrum.json, spectrum.safetensors (σ per tensor), figure2.png and figure3.png.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from readapt.addends import DeltaFolder
from readapt.cards import spectrum_readme
from readapt.checkpoint import Pair, ReadOptions, is_delta_folder, output_folder, progress, recorded_name, write_file
from readapt.errors import ReadaptError
from readapt.factorize import energy_of, explained, gram_eig, rank_at
from readapt.loreplan import Entry, Policy, classify, lore_report, params
from readapt.lowrank import FromDelta, FromPair
from readapt.numerics import is_finite, parse_device

TAU_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))  # Figure 3's x axis


def spectrum(source: str | os.PathLike, tuned: str | os.PathLike | None, out: str | os.PathLike, *,
             tau: float = 0.5, svd: str = "gram", device: str | None = None, policy: Policy | None = None,
             layers: Sequence[int] | None = None, skip_missing: bool = False, overwrite: bool = False,
             allow_pickle: bool = False, read: ReadOptions | None = None) -> dict:
    """Singular-value spectrum of every 2-D delta tensor (delta folder, or TUNED − BASE) → report at `out`:

    spectrum.json (per tensor: shape, ‖Δ‖², k(τ), v_k, parameters kept k·(m+n); whole model at each τ of
    TAU_GRID), spectrum.safetensors (σ per tensor), figure2.png (v_k against k for chosen layers, like
    the paper's Figure 2), figure3.png (share of the delta's parameters kept against τ, Figure 3).
    Returns the report; `cards.lore_summary(report)` is the terminal view.
    """
    if not (isinstance(tau, (int, float)) and 0 < tau <= 1):
        raise ReadaptError(f"--tau {tau!r} is outside (0, 1]")
    if svd not in ("exact", "gram", "auto"):
        raise ReadaptError(f"--svd {svd!r}: the spectrum needs every singular value: use gram or exact")
    svd = "gram" if svd == "auto" else svd
    policy = policy or Policy()
    policy.check()
    dev = parse_device(device)
    src, names, shape, inputs, provenance = _open(source, tuned, ReadOptions.of(read, allow_pickle), skip_missing)
    entries = classify(src.config, names, shape, src.floating)
    _check_layers(entries, layers)
    policy.apply(entries, adapter=False)
    spectra = _spectra(entries, src, svd, dev, tau)
    report = lore_report(entries, tau=tau, rank=None, svd=svd, provenance=provenance)
    report["tau_grid"] = _tau_grid(entries, spectra, report, tau)
    with output_folder(out, overwrite, inputs=inputs) as tmp:
        write_file(tmp / "spectrum.safetensors", ((n, s.contiguous()) for n, s in spectra.items()),
                   metadata={"readapt": "spectrum"})
        (tmp / "spectrum.json").write_text(json.dumps(report, indent=2) + "\n")
        _plot(tmp, entries, spectra, report, tau, layers)
        (tmp / "README.md").write_text(spectrum_readme(report, provenance, svd))
    return report


def _open(source, tuned, read: ReadOptions, skip_missing: bool):
    """(the delta source, its tensor names, their shapes, the input folders, the provenance) of a delta
    folder (`tuned` None) or of TUNED − BASE."""
    if tuned is None:
        if not is_delta_folder(Path(source)):
            raise ReadaptError(f"{source} is not a delta folder: give a delta folder, or BASE and TUNED")
        src = FromDelta(DeltaFolder(source))
        ckpt = src.delta_folder.ckpt
        return src, ckpt.names, ckpt.shape, [src.delta_folder.path], {"delta": recorded_name(source)}
    pair = Pair.open(source, tuned, read, skip_missing=skip_missing)
    return (FromPair(pair), pair.names, pair.base.shape, [pair.base.path, pair.tuned.path],
            {"base": recorded_name(source), "tuned": recorded_name(tuned)})


def _check_layers(entries: list[Entry], layers: Sequence[int] | None) -> None:
    """--layers names layers this model has."""
    depths = sorted({ly for e in entries if (ly := _layer_of(e.name)) is not None})
    missing = [ly for ly in layers or () if ly not in depths]
    if missing:
        have = ("not numbered" if not depths else f"{depths[0]} to {depths[-1]}"
                if depths == list(range(depths[0], depths[-1] + 1)) else ", ".join(map(str, depths)))
        raise ReadaptError(f"--layers {','.join(map(str, missing))}: no such layer; this model's layers are {have}")


def _spectra(entries: list[Entry], src: FromPair | FromDelta, svd: str, dev: torch.device,
             tau: float) -> dict[str, torch.Tensor]:
    """σ of every low-rank entry's Δ (one tensor in memory at a time); each entry's energy, k(τ) and kept
    energy are filled in (dense entries: kept whole, as extract carries them)."""
    spectra: dict[str, torch.Tensor] = {}
    with progress(sum(src.nbytes(e.name) for e in entries if e.policy != "skip"), "spectrum") as bar:
        for e in entries:
            if e.policy == "skip":
                continue
            D = src.delta(e.name)
            if not is_finite(D):
                raise ReadaptError(f"tensor {e.name!r} has NaN/Inf values in the delta (in the inputs)")
            e.energy = energy_of(D)
            if e.policy == "dense":
                e.kept, e.rank = e.energy, -1
                e.rows = int(D.ne(0).any(dim=1).sum()) if e.tied else 0  # as extract carries it
            else:
                D = D.to(dev)
                X = D if D.shape[0] <= D.shape[1] else D.T
                S = (torch.linalg.svdvals(X) if svd == "exact"
                     else gram_eig(X @ X.T, vectors=False).clamp_min(0).sqrt()).cpu()
                spectra[e.name] = S
                e.rank = rank_at(S, tau)
                e.kept = float(S[:e.rank].double().square().sum())
                if e.rank == 0:
                    e.note = "delta is all zero: rank 0"
            bar.update(src.nbytes(e.name))
    return spectra


def _tau_grid(entries: list[Entry], spectra: dict, report: dict, tau: float) -> list[dict]:
    """The whole model's share of the delta's parameters kept at each τ of TAU_GRID (and the chosen τ)."""
    grid = []
    for g in sorted(set(TAU_GRID) | {tau}):
        kept = sum(params(e)[1] if e.policy != "lowrank" else (rank_at(spectra[e.name], g) * sum(e.shape)
                   if e.name in spectra else 0) for e in entries)
        grid.append({"tau": g, "params_kept_share": kept / report["params_delta"] if report["params_delta"] else 0})
    return grid


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    return None


def _plot(folder: Path, entries: list[Entry], spectra: dict, report: dict, tau: float,
          layers: Sequence[int] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # Figure 2: cumulative explained variance v_k against k, one panel per module type, a few depths
    with_layer = [(e, _layer_of(e.name)) for e in entries if e.name in spectra]
    depths = sorted({ly for _, ly in with_layer if ly is not None})
    if layers is None and depths:
        layers = sorted({depths[0], depths[len(depths) // 2], depths[-1]})
    types = []
    for e, ly in with_layer:
        t = e.name.rsplit(".", 2)[-2] if ly is not None else e.kind
        if t not in types:
            types.append(t)
    cols = min(4, max(1, len(types)))
    rows = max(1, math.ceil(len(types) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, t in zip(axes.flat, types):
        for e, ly in with_layer:
            if (e.name.rsplit(".", 2)[-2] if ly is not None else e.kind) != t:
                continue
            if ly is not None and layers is not None and ly not in layers:
                continue
            v = explained(spectra[e.name]).numpy()
            ax.plot(range(1, len(v) + 1), v, label=f"layer {ly}" if ly is not None else e.kind)
        ax.axhline(tau, color="grey", ls="--", lw=0.8)
        ax.set_title(t)
        ax.set_xlabel("rank k")
        ax.set_ylabel("explained variance v_k")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    fig.suptitle("Cumulative explained variance of Δ = U S Vᵀ (cf. RE-Adapt Figure 2)")
    fig.tight_layout()
    fig.savefig(folder / "figure2.png", dpi=120)
    plt.close(fig)
    # Figure 3: share of the delta's parameters kept against τ
    fig, ax = plt.subplots(figsize=(5, 3.5))
    g = report["tau_grid"]
    ax.plot([p["tau"] for p in g], [100 * p["params_kept_share"] for p in g], marker="o")
    ax.axvline(tau, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("τ (explained variance kept per layer)")
    ax.set_ylabel("% of the delta's parameters kept")
    ax.set_title("LoRE-Adapter size against τ (cf. RE-Adapt Figure 3)")
    fig.tight_layout()
    fig.savefig(folder / "figure3.png", dpi=120)
    plt.close(fig)
