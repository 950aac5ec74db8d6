"""PNG figures of a demo run: partial-adaptation heatmaps, instruction strength, the τ curve, PortLLM drift."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chosen_cells(chosen: list) -> dict[tuple[float, float], int]:
    """{(α, β): how many seeds chose that cell on validation}, from each seed's chosen (α, β)."""
    from collections import Counter

    return dict(Counter(map(tuple, chosen)))


def heatmaps(tables: dict, chosen: dict, folder: Path) -> str:
    """RE-Adapt and LoRE-Adapt grids (B and A contains-EM, mean over seeds); `chosen` {method: each seed's
    chosen (α, β)}: every chosen cell framed, with the number of seeds that chose it."""
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for i, method in enumerate(("re_adapt", "lore_adapt")):
        for j, (dom, label) in enumerate((("B", "in-domain B"), ("A", "out-of-domain A"))):
            rows = tables[f"grid_{method}_{dom}"]["rows"]  # α down, β across: the same values
            grid = [float(r["label"].split("=")[1]) for r in rows]
            z = np.array([r["mean"] for r in rows])
            ax = axes[i][j]
            im = ax.imshow(z, origin="lower", cmap="viridis", vmin=0, vmax=100)
            for (a, b), v in np.ndenumerate(z):
                ax.text(b, a, f"{v:.0f}", ha="center", va="center", color="w" if v < 50 else "k", fontsize=8)
            for (alpha, beta), n in chosen_cells(chosen[method]).items():
                a, b = grid.index(alpha), grid.index(beta)
                ax.add_patch(plt.Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
                ax.text(b, a - 0.3, f"{n} seed{'s' if n > 1 else ''}", ha="center", va="center", color="red",
                        fontsize=7, bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
            ax.set_xticks(range(len(grid)), [f"{g:g}" for g in grid])
            ax.set_yticks(range(len(grid)), [f"{g:g}" for g in grid])
            ax.set_xlabel("β (RE-Adapter Δ)" if method == "re_adapt" else "β (LoRE-Adapter, τ=0.5)")
            ax.set_ylabel("α (knowledge adapter Ψ)")
            ax.set_title(f"{'RE' if method == 're_adapt' else 'LoRE'}-Adapt, {label}, contains-EM (test)")
            fig.colorbar(im, ax=ax)
    fig.suptitle("Partial adaptation Φ + αΨ + β·adapter, mean over seeds\n"
                 "(red: the cells chosen on validation, and by how many seeds)")
    fig.tight_layout()
    fig.savefig(folder / "partial_adaptation.png", dpi=100)
    plt.close(fig)
    return "partial_adaptation.png"


def _curves(path: Path, x, series, xlabel: str, title: str, ylabel: str = "contains-EM x100 (test)") -> str:
    """Lines with a ±std band: series = [(label, means, stds)]."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, mean, std in series:
        mean, std = np.array(mean, dtype=float), np.array(std, dtype=float)
        ax.plot(x, mean, marker="o", label=label)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _column(t: dict, j: int) -> tuple[list[float], list[float]]:
    return [r["mean"][j] for r in t["rows"]], [r["std"][j] for r in t["rows"]]


def plots(tables: dict, chosen: dict, folder: Path) -> list[str]:
    """Every figure; returns the file names."""
    names = [heatmaps(tables, chosen, folder)]
    t = tables["strength"]
    betas = [float(r["label"].split("=")[1]) for r in t["rows"]]
    names.append(_curves(folder / "instruction_strength.png", betas,
                         [("A held out (out-of-domain)", *_column(t, 3)), ("B (in-domain)", *_column(t, 1))],
                         "β (instruction strength): Φ + βΔ", "Instruction strength (RE-Adapt Figure 6 shape)"))
    t = tables["lore_tau"]
    taus = [float(r["label"].split("=")[1]) for r in t["rows"]]
    names.append(_curves(folder / "lore_tau.png", taus,
                         [("B contains-EM", *_column(t, 2)), ("A held out contains-EM", *_column(t, 3)),
                          ("Δ parameters kept %", *_column(t, 0))],
                         "τ (share of ‖Δ‖² kept per matrix)", "LoRE-Adapt τ curve (at RE-Adapt's chosen α, β)",
                         "x100"))
    t = tables["port"]
    steps = [int(r["label"].split()[0]) for r in t["rows"]]
    names.append(_curves(folder / "port_drift.png", steps,
                         [("Φ₂ + ported patch", *_column(t, 4)), ("Φ₂ + re-trained patch", *_column(t, 5)),
                          ("Φ₂ alone", *_column(t, 3))],
                         "further pre-training steps of version 2 (version drift)", "PortLLM over version drift (A)"))
    return names
