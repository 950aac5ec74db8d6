"""Tables, the papers' claims and their verdicts, plots and the README of a demo run."""

from __future__ import annotations

import math
from pathlib import Path

from readapt.demoworld.settings import EM, FULL, GRID, MARGIN, QUICK, RL

def tables_of(res: dict) -> dict[str, dict]:
    """The tables of one seed: {name: {"title", "unit", "columns", "rows": [[label, *values]]}}."""

    def four(d):  # in-domain and out-of-domain, both metrics
        return [d["B"][RL], d["B"][EM], d["A"][RL], d["A"][EM]]

    qa_cols = ["B (in-domain) Rouge-L recall", "B contains-EM", "A held out (out-of-domain) Rouge-L recall",
               "A held out contains-EM"]
    t = {"re_adapt": {"title": "RE-Adapt (paper Table 2 shape): closed-book QA, test split", "unit": "%",
                      "columns": qa_cols, "rows": [[k, *four(v)] for k, v in res["re_adapt"].items()]}}
    for name in ("re_adapt", "lore_adapt"):
        g = res["grids"][name]["cells"]
        for dom, label in (("B", "in-domain B"), ("A", "out-of-domain A")):
            t[f"grid_{name}_{dom}"] = {
                "title": f"{'RE' if name == 're_adapt' else 'LoRE'}-Adapt partial adaptation Φ + αΨ + β·adapter: "
                         f"{label} contains-EM, test split (rows α, columns β; chosen on validation: "
                         f"α={res['grids'][name]['chosen'][0]:g}, β={res['grids'][name]['chosen'][1]:g})",
                "unit": "%", "columns": [f"β={b:g}" for b in GRID],
                "rows": [[f"α={a:g}", *(g[f"{a:g},{b:g}"]["test"][dom][EM] for b in GRID)] for a in GRID]}
    t["strength"] = {"title": "Instruction strength Φ + βΔ (paper Figure 6; the α=0 row of the grid), test split", "unit": "%",
                     "columns": qa_cols, "rows": [[f"β={b}", *four(v["test"])] for b, v in res["strength"].items()]}
    lore = res["lore"]
    modules = sorted({m for r in lore["ranks"].values() for m in r}, key="qkvogateupdown".find)
    t["lore_ranks"] = {"title": "LoRE-Adapt ranks per layer at τ=0.5 (of min(out, in))", "unit": "rank",
                       "columns": modules,
                       "rows": [[f"layer {i}", *(r.get(m, 0) for m in modules)] for i, r in sorted(lore["ranks"].items(), key=lambda x: int(x[0]))]}
    t["lore_share"] = {"title": "LoRE-Adapt at τ=0.5: what the adapter keeps of Δ", "unit": "%",
                       "columns": ["share"], "rows": [["parameters kept", lore["params_kept_share"]],
                                                      ["energy ‖Δ‖² kept", lore["energy_kept_share"]]]}
    t["rag"] = {"title": "RAG (paper Table 3 shape): B test questions, top-1 BM25 and oracle passage", "unit": "%",
                "columns": ["closed book Rouge-L recall", "closed book contains-EM", "BM25 Rouge-L recall",
                            "BM25 contains-EM", "oracle Rouge-L recall", "oracle contains-EM"],
                "rows": [[k, *(v[r][m] for r in ("closed book", "bm25", "oracle") for m in (RL, EM))]
                         for k, v in res["rag"].items()]}
    t["port"] = {"title": "PortLLM: a task patch (chat QA LoRA) trained on version 1, used on version 2", "unit": "%",
                 "columns": ["task: A held out Rouge-L recall", "task: A held out contains-EM",
                             "C (read only by v2) Rouge-L recall", "C contains-EM"],
                 "rows": [[k, v["A"][RL], v["A"][EM], v["C"][RL], v["C"][EM]] for k, v in res["port"].items()]}
    t["world"] = {"title": "World checks: bio completion (teacher-forced value after a bio prefix)", "unit": "%",
                  "columns": ["facts completed"],
                  "rows": [[k, v] for k, v in res["bio_completion"].items()]
                  + [["chance (uniform guess of one value)", 100 * sum(1 / n for n in (20, 40, 12, 16)) / 4]]}
    return t


def aggregate(per_seed: list[dict]) -> dict[str, dict]:
    """Cell-wise mean and sample standard deviation of the seeds' tables (std 0 for one seed)."""
    tabs = [tables_of(r) for r in per_seed]
    out = {}
    for name, t in tabs[0].items():
        rows = []
        for i, row in enumerate(t["rows"]):
            vals = [[tab[name]["rows"][i][j] for tab in tabs] for j in range(1, len(row))]
            mean = [sum(v) / len(v) for v in vals]
            std = [math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
                   for v, m in zip(vals, mean)]
            rows.append({"label": row[0], "mean": mean, "std": std})
        out[name] = {**{k: t[k] for k in ("title", "unit", "columns")}, "rows": rows}
    return out


def format_tables(tables: dict, markdown: bool = False) -> str:
    lines = []
    for t in tables.values():
        def cell(m, s):
            v = f"{m:.0f}" if t["unit"] == "rank" else f"{m:.1f}"
            return v + (f" ± {s:.1f}" if s else "")
        body = [[r["label"], *(cell(m, s) for m, s in zip(r["mean"], r["std"]))] for r in t["rows"]]
        head = ["", *t["columns"]]
        if markdown:
            lines += [f"### {t['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in body] + [""]
        else:
            w = [max(len(str(x[j])) for x in [head, *body]) for j in range(len(head))]
            lines += [t["title"], "  ".join(h.rjust(n) if j else h.ljust(n) for j, (h, n) in enumerate(zip(head, w)))]
            lines += ["  ".join(c.rjust(n) if j else c.ljust(n) for j, (c, n) in enumerate(zip(r, w))) for r in body]
            lines.append("")
    return "\n".join(lines)


def world_check_failures(tables: dict) -> list[str]:
    """The world is good enough to test the claims only if the instruct model answers held-out A far above
    chance (≥ 3×) and the knowledge adapter has memorised B (bio completion ≥ 90%). Returns what failed."""
    world = {r["label"]: r["mean"][0] for r in tables["world"]["rows"]}
    chance = world["chance (uniform guess of one value)"]
    inst_a = next(r["mean"][3] for r in tables["re_adapt"]["rows"] if r["label"] == "instruct")
    failed = []
    if inst_a < 3 * chance:
        failed.append(f"the instruct model answers {inst_a:.1f}% of held-out A (needs ≥ 3× chance = {3 * chance:.1f})")
    knowledge = world.get("pretrained + knowledge adapter on B")
    if knowledge is not None and knowledge < 90:
        failed.append(f"the knowledge adapter completes {knowledge:.1f}% of B's bio facts (needs ≥ 90)")
    return failed


def claims(tables: dict, per_seed: list[dict]) -> list[dict]:
    """The papers' claims checked against this world's means: reproduced when the difference exceeds
    MARGIN points in the claimed direction, 'within noise' when |difference| <= MARGIN, else not reproduced."""

    def get(table, label, col):
        t = tables[table]
        return next(r["mean"][col] for r in t["rows"] if r["label"] == label)

    def verdict(diff, kind):
        if kind == "same":  # |difference| within the margin
            return "reproduced" if abs(diff) <= MARGIN else "not reproduced"
        if kind == "not worse":  # at most the margin below
            return "reproduced" if diff >= -MARGIN else "not reproduced"
        return "reproduced" if diff > MARGIN else ("within noise" if diff >= -MARGIN else "not reproduced")

    out = []

    def add(claim, paper, diff, evidence, two_sided=False, kind="better"):
        kind = "same" if two_sided else kind
        out.append({"claim": claim, "paper": paper, "difference": round(diff, 1),
                    "verdict": verdict(diff, kind), "evidence": evidence})

    r = "re_adapt"
    inst_b, inst_a = get(r, "instruct", 1), get(r, "instruct", 3)
    ika_a = get(r, "instruct + knowledge adapter", 3)
    re_b, re_a = get(r, "RE-Adapt (α, β chosen on validation)", 1), get(r, "RE-Adapt (α, β chosen on validation)", 3)
    re5 = (get(r, "RE-Adapt (α=β=0.5)", 1) + get(r, "RE-Adapt (α=β=0.5)", 3)) / 2
    lo_b, lo_a = get(r, "LoRE-Adapt (α, β chosen on validation)", 1), get(r, "LoRE-Adapt (α, β chosen on validation)", 3)
    add("Fine-tuning the instruct model on new text hurts its out-of-domain QA", "RE-Adapt §1, Table 2",
        inst_a - ika_a, f"A contains-EM: instruct {inst_a:.1f}, instruct + knowledge adapter {ika_a:.1f}")
    add("RE-Adapt adds the new knowledge: in-domain QA above the instruct model", "RE-Adapt Table 2",
        re_b - inst_b, f"B contains-EM: RE-Adapt {re_b:.1f}, instruct {inst_b:.1f}")
    add("RE-Adapt keeps out-of-domain QA better than fine-tuning the instruct model", "RE-Adapt Table 2",
        re_a - ika_a, f"A contains-EM: RE-Adapt {re_a:.1f}, instruct + knowledge adapter {ika_a:.1f}")
    add("RE-Adapt keeps the instruct model's out-of-domain QA (at most the margin below it)", "RE-Adapt Table 2",
        re_a - inst_a, f"A contains-EM: RE-Adapt {re_a:.1f}, instruct {inst_a:.1f}", kind="not worse")
    add("LoRE-Adapt performs like RE-Adapt (mean of B and A contains-EM within the margin)", "RE-Adapt Table 2",
        (lo_b + lo_a - re_b - re_a) / 2, f"LoRE-Adapt {(lo_b + lo_a) / 2:.1f}, RE-Adapt {(re_b + re_a) / 2:.1f}, "
        f"with {get('lore_share', 'parameters kept', 0):.1f}% of the delta's parameters", two_sided=True)
    add("α=β=0.5 is a robust choice (within the margin of the best scales)", "RE-Adapt §5.2",
        re5 - (re_b + re_a) / 2, f"mean contains-EM: α=β=0.5 {re5:.1f}, scales chosen on validation "
        f"{(re_b + re_a) / 2:.1f}", two_sided=True)
    picks, at_pick, at_one = [], [], []
    for res in per_seed:  # β < 1 chosen on the validation half (A held out), compared with β=1 on the test half
        st = res["strength"]
        b = max((k for k in st if float(k) < 1), key=lambda k: st[k]["val"]["A"][EM])
        picks.append(b)
        at_pick.append(st[b]["test"]["A"][EM])
        at_one.append(st["1"]["test"]["A"][EM])
    n = len(per_seed)
    add("Instruction strength below 1 can beat the instruct model (β<1 chosen on validation, A held out)",
        "RE-Adapt Figure 6", (sum(at_pick) - sum(at_one)) / n,
        f"A contains-EM (test): β={'/'.join(picks)} {sum(at_pick) / n:.1f}, β=1 {sum(at_one) / n:.1f}")
    for col, name in ((3, "BM25"), (5, "oracle")):
        rb = get("rag", "RE-Adapt (α, β chosen on validation)", col)
        ib = get("rag", "instruct", col)
        add(f"RE-Adapt helps with {name} retrieval too", "RE-Adapt Table 3", rb - ib,
            f"B contains-EM with {name}: RE-Adapt {rb:.1f}, instruct {ib:.1f}")
    p = "port"
    ported, retrained = get(p, "version 2 + ported patch (no training)", 1), get(p, "version 2 + patch re-trained on v2", 1)
    v2 = get(p, "version 2 alone", 1)
    add("A ported patch does the task on version 2 without training", "PortLLM Table 1", ported - v2,
        f"A contains-EM: v2 + ported patch {ported:.1f}, v2 alone {v2:.1f}")
    add("A ported patch matches a patch re-trained on version 2 (within the margin)", "PortLLM Table 1",
        ported - retrained, f"A contains-EM: ported {ported:.1f}, re-trained {retrained:.1f}", two_sided=True)
    if retrained - v2 <= MARGIN:  # two patches that both fail the task "match" without saying anything
        out[-1]["verdict"] = "not meaningful"
        out[-1]["evidence"] += f"; the re-trained patch does not do the task on version 2 either (v2 alone {v2:.1f})"
    pm = sum(r["port_memory"]["port --merge peak RSS (MB)"] for r in per_seed) / len(per_seed)
    tm = sum(r["port_memory"]["re-training (3 LoRA steps) peak RSS (MB)"] for r in per_seed) / len(per_seed)
    out.append({"claim": "Porting needs less memory than re-training", "paper": "PortLLM §5 (12.2x less GPU memory)",
                "difference": round(tm / pm, 2),
                "verdict": "within noise" if abs(tm / pm - 1) < 0.05 else ("reproduced" if pm < tm else "not reproduced"),
                "evidence": f"peak RSS: port --merge {pm:.0f} MB, 3 LoRA training steps {tm:.0f} MB ({tm / pm:.2f}x); "
                            "the tiny model is a few MB, so both are mostly the Python/torch process itself"})
    return out


def plots(tables: dict, per_seed: list[dict], runs: list[Path], folder: Path) -> list[str]:
    """PNG figures: partial-adaptation heatmaps, the instruction-strength curve, and (copied from
    readapt.lowrank.spectrum, first seed) the LoRE spectrum figures. Returns the file names."""
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for i, method in enumerate(("re_adapt", "lore_adapt")):
        chosen = per_seed[0]["grids"][method]["chosen"]
        for j, (dom, label) in enumerate((("B", "in-domain B"), ("A", "out-of-domain A"))):
            t = tables[f"grid_{method}_{dom}"]
            z = np.array([r["mean"] for r in t["rows"]])
            ax = axes[i][j]
            im = ax.imshow(z, origin="lower", cmap="viridis", vmin=0, vmax=100)
            for (a, b), v in np.ndenumerate(z):
                ax.text(b, a, f"{v:.0f}", ha="center", va="center", color="w" if v < 50 else "k", fontsize=8)
            a, b = GRID.index(chosen[0]), GRID.index(chosen[1])
            ax.add_patch(plt.Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            ax.set_xticks(range(len(GRID)), [f"{g:g}" for g in GRID])
            ax.set_yticks(range(len(GRID)), [f"{g:g}" for g in GRID])
            ax.set_xlabel("β (RE-Adapter Δ)" if method == "re_adapt" else "β (LoRE-Adapter)")
            ax.set_ylabel("α (knowledge adapter Ψ)")
            ax.set_title(f"{'RE' if method == 're_adapt' else 'LoRE'}-Adapt, {label}, contains-EM (test)")
            fig.colorbar(im, ax=ax)
    fig.suptitle("Partial adaptation Φ + αΨ + β·adapter (red: chosen on validation, seed 0)")
    fig.tight_layout()
    fig.savefig(folder / "partial_adaptation.png", dpi=100)
    plt.close(fig)
    names.append("partial_adaptation.png")

    t = tables["strength"]
    betas = [float(r["label"].split("=")[1]) for r in t["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in ((3, "A held out (out-of-domain)"), (1, "B (in-domain)")):
        mean = np.array([r["mean"][col] for r in t["rows"]])
        std = np.array([r["std"][col] for r in t["rows"]])
        ax.plot(betas, mean, marker="o", label=label)
        ax.fill_between(betas, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("β (instruction strength): Φ + βΔ")
    ax.set_ylabel("contains-EM x100 (test)")
    ax.set_ylim(0, 100)
    ax.set_title("Instruction strength (RE-Adapt Figure 6 shape)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "instruction_strength.png", dpi=100)
    plt.close(fig)
    names.append("instruction_strength.png")
    for f in sorted((runs[0] / "spectrum").glob("*.png")):
        shutil.copyfile(f, folder / f"spectrum_{f.name}")
        names.append(f"spectrum_{f.name}")
    return names


def _machine() -> str:
    import os

    load = os.getloadavg()[0]
    return f"{len(os.sched_getaffinity(0))} CPU cores, load average {load:.1f} when it finished"


def readme(tables: dict, verdicts: list[dict], per_seed: list[dict], quick: bool, seconds: float, figs: list[str]) -> str:
    s = QUICK if quick else FULL
    sizes = ", ".join(f"{k}={n}" for k, n in s.sizes)
    lines = [
        "# readapt demo: RE-Adapt, LoRE-Adapt, partial adaptation and PortLLM in a synthetic world", "",
        f"Made by `readapt demo{' --quick' if quick else ''} --seeds {len(per_seed)}` in {seconds:.0f} s "
        f"(wall time of this run; trained models came from the cache when it was warm; {_machine()}). "
        f"Cold build of seed {per_seed[0]['seed']} (from its cache record): "
        + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in per_seed[0]["cold_build"].items())
        + f" (load average up to {max(v['load_average'] for v in per_seed[0]['cold_build'].values()):.1f} on "
        f"{per_seed[0]['cold_build']['models']['cores']} cores). Populations: {sizes} "
        f"people; tiny Llama ({s.layers} layers, hidden {s.hidden}); seeds {[r['seed'] for r in per_seed]}. "
        "Numbers are x100, mean ± sample standard deviation over seeds.", "",
        "The world: fictional people with 4 attributes (birth city, birth year, university, employer). "
        "The *pretrained* model Φ read the bios of population A; the *instruct* model Θ is Φ fine-tuned to "
        "answer chat questions in full sentences about half of A (A_train) and about people whose bio is in "
        "the prompt (reading practice on strangers drawn fresh for every example); *version 2* Φ₂ is Φ pre-trained further on A's and C's "
        "bios. New knowledge is population B: unlabeled bios only. Closed-book questions on B are in-domain, "
        "questions on the held-out half of A are out-of-domain (knowledge the models already had).", "",
        "## Claims of the papers, as measured here", "",
        f"A claim is *reproduced* when the difference exceeds {MARGIN:g} points in the claimed direction "
        "(or, for 'matches' claims, stays within it); *within noise* when it is smaller than that.", "",
        "| claim | paper | verdict | evidence |", "|---|---|---|---|",
        *(f"| {c['claim']} | {c['paper']} | {c['verdict']} | {c['evidence']} |" for c in verdicts), "",
        "## The tables", "",
        "- **RE-Adapt**: rows are the paper's Table 2 models: Φ, Φ + knowledge adapter Ψ (LoRA on B's bios), "
        "Θ, Θ + a LoRA trained on B's bios, and Φ + αΨ + β·(LoRE-)adapter. Scales are either fixed (1, or the "
        "paper's 0.5) or chosen on a validation half of the questions; every number is on the other (test) half.",
        "- **Partial adaptation grids**: the (α, β) grid of Φ + αΨ + βΔ on the test half, in-domain and "
        "out-of-domain; the validation half chose the framed cell. The instruction-strength table is Φ + βΔ "
        "alone (paper Figure 6): β=1 is the instruct model.",
        "- **LoRE ranks**: the rank k each weight keeps at τ=0.5 (the smallest k whose singular values hold half of "
        "‖Δ‖²) and the share of Δ's parameters and energy the adapter keeps; spectrum plots from `readapt spectrum`.",
        "- **RAG**: the same models answering B's test questions with the top-1 BM25 passage or the gold passage "
        "(one bio per person of B) in the prompt (paper Table 3).",
        "- **PortLLM**: a LoRA task patch (chat QA, trained with `readapt train` on Φ) added to Φ₂ by `readapt port` "
        "with no training, against Φ₂ alone and a LoRA re-trained on Φ₂; column C shows what only Φ₂ read. "
        "The memory line compares the peak RSS of `readapt port --merge` with that of 3 LoRA training steps.",
        "- **World checks**: the share of facts a model completes after a bio prefix; the knowledge adapter must "
        "memorise B (≥ 90%) for the experiments to mean anything.", "",
        "contains-EM credits any response that contains the value: a pretrained model that recites bios after "
        "the question earns some credit that way (the 'pretrained' and 'version 2 alone' rows).", "",
        *(f"![{f}]({f})" for f in figs), "",
        format_tables(tables, markdown=True),
        "## Memory (PortLLM)", "",
        *(f"- {k}: {v}" for k, v in per_seed[0]["port_memory"].items()), "",
        "## Files", "",
        "`results.json` (every number, per seed), `tables.json` / `tables.md`, the figures, and `seed<N>/`: the "
        "world's data files (`data/`), the RE-Adapter (`re_adapter/`), the LoRE-Adapter (`lore_adapter/`), the "
        "spectrum report, every sweep and evaluation (`eval/`, `sweep_*/` with predictions), the ported model "
        "(`ported/`). Trained models and adapters stay in the cache folder named in `results.json`.", "",
    ]
    return "\n".join(lines)

