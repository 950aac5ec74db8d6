"""Tables (per seed, then mean ± std over seeds), their text and markdown forms, and the folder key."""

from __future__ import annotations

import math

from readapt.demoworld.settings import EM, RL, SELECT, TAUS

QA_COLS = ["B (in-domain) Rouge-L recall", "B contains-EM", "A held out (out-of-domain) Rouge-L recall",
           "A held out contains-EM"]


def _four(d: dict) -> list[float]:
    return [d["B"][RL], d["B"][EM], d["A"][RL], d["A"][EM]]


def _table(title: str, columns: list[str], rows: list[list], unit: str = "%") -> dict:
    return {"title": title, "unit": unit, "columns": columns, "rows": rows}


def qa_tables(res: dict) -> dict[str, dict]:
    """Table 2 shape, the partial-adaptation grids and instruction strength (Figure 6), test split."""
    t = {"closed_book": _table("Closed-book QA (RE-Adapt Table 2 shape): test half of the questions; chosen scales: "
                               + SELECT, QA_COLS, [[k, *_four(v)] for k, v in res["closed_book"].items()])}
    for name, label in (("re_adapt", "RE-Adapt"), ("re_adapt_dora", "RE-Adapt with a DoRA Ψ"),
                        ("lore_adapt", "LoRE-Adapt τ=0.5")):
        g = res["grids"][name]
        for dom, where in (("B", "in-domain B"), ("A", "out-of-domain A")):
            t[f"grid_{name}_{dom}"] = _table(
                f"{label}: Φ + αΨ + β·adapter, {where} contains-EM, test half (rows α, columns β; chosen on "
                f"validation in seed {res['seed']}: α={g['chosen'][0]:g}, β={g['chosen'][1]:g})",
                [f"β={b:g}" for b in g["grid"]],
                [[f"α={a:g}", *(g["cells"][f"{a:g},{b:g}"]["test"][dom][EM] for b in g["grid"])] for a in g["grid"]])
    t["strength"] = _table("Instruction strength Φ + βΔ (RE-Adapt Figure 6; the α=0 row of the RE-Adapt grid), test "
                           "half", QA_COLS, [[f"β={b}", *_four(v["test"])] for b, v in res["strength"].items()])
    return t


def lore_tables(res: dict) -> dict[str, dict]:
    """The τ curve (LoRE-Adapter at RE-Adapt's chosen scales) and the ranks at τ=0.5."""
    t = {"lore_tau": _table(
        "LoRE-Adapt τ curve: Φ + αΨ + β·LoRE(τ) at RE-Adapt's chosen (α, β), test half",
        ["Δ parameters kept", "‖Δ‖² kept", "B contains-EM", "A held out contains-EM"],
        [[f"τ={t:g}", res["lore"][f"{t:g}"]["params_kept_share"], res["lore"][f"{t:g}"]["energy_kept_share"],
          res["lore"][f"{t:g}"]["scores"]["B"][EM], res["lore"][f"{t:g}"]["scores"]["A"][EM]] for t in TAUS])}
    ranks = res["lore"]["0.5"]["ranks"]
    modules = sorted({m for r in ranks.values() for m in r}, key="qkvogateupdown".find)
    t["lore_ranks"] = _table("LoRE-Adapt ranks per layer at τ=0.5 (of min(out, in))", modules,
                             [[f"layer {i}", *(r.get(m, 0) for m in modules)]
                              for i, r in sorted(ranks.items(), key=lambda x: int(x[0]))], unit="rank")
    return t


def rag_table(res: dict) -> dict[str, dict]:
    cols = ["BM25 Rouge-L recall", "BM25 contains-EM", "oracle Rouge-L recall", "oracle contains-EM"]
    return {"rag": _table("RAG (RE-Adapt Table 3 shape): B's test questions with the top-1 BM25 passage or the gold "
                          "passage in the prompt", cols,
                          [[k, *(v[r][m] for r in ("bm25", "oracle") for m in (RL, EM))] for k, v in res["rag"].items()])}


def _num(x) -> float:
    return math.nan if x is None else float(x)


def port_tables(res: dict) -> dict[str, dict]:
    """PortLLM over version drift, with the port report's diagnostics, and the memory figures."""
    cols = ["drift ‖θ′−θ‖/‖θ‖ %", "patch/drift ‖P‖/‖θ′−θ‖", "cos(P, θ′−θ)", "Φ₂ alone A", "Φ₂ + ported patch A",
            "Φ₂ + re-trained patch A", "Φ₂ + ported patch C"]
    alone, v1 = res["port"]["version 1 alone"], res["port"]["version 1 + task patch"]
    nan = math.nan  # the patch on the version it was trained on: no drift, nothing to port or re-train
    rows = [["0 steps (Φ: the patch as trained)", 0.0, nan, nan, alone["A"][EM], v1["A"][EM], nan, v1["C"][EM]]]
    for d in res["port"]["drift"]:
        rows.append([f"{d['steps']} steps", 100 * _num(d["drift"].get("drift")), _num(d["drift"].get("patch_to_drift")),
                     _num(d["drift"].get("cos_patch_drift")), d["version 2 alone"]["A"][EM],
                     d["version 2 + ported patch"]["A"][EM], d["version 2 + re-trained patch"]["A"][EM],
                     d["version 2 + ported patch"]["C"][EM]])
    return {"port": _table("PortLLM over version drift: a task patch (chat QA LoRA) trained on Φ, carried to Φ₂ "
                           "(Φ pre-trained k steps further) with no training; contains-EM on held-out A (the task) "
                           "and C (read only by Φ₂); the first row is the patch on Φ itself", cols, rows,
                           unit="mixed"),
            "memory": _table("PortLLM memory: peak RSS of a child process", ["MB"],
                             [[k.replace(" (MB)", ""), v] for k, v in res["memory"].items()], unit="MB")}


def world_tables(res: dict) -> dict[str, dict]:
    """Bio completion (teacher-forced) per model and population, and the interference figures of Ψ and Δ."""
    inter = res["interference"]
    layers = {**inter["layers"], "all layers": inter["overall"]}
    return {
        "knowledge": _table("Knowledge: % of facts completed after a bio prefix (teacher-forced); chance 5.5",
                            ["facts completed"], [[k, v] for k, v in res["knowledge"].items()]),
        "interference": _table("How Ψ (knowledge adapter) and Δ = Θ − Φ meet in Φ + Ψ + Δ, per layer "
                               "(readapt.interference, as `readapt merge` reports it)",
                               ["cos(Ψ, Δ)", "‖Ψ‖/‖Φ‖", "‖Δ‖/‖Φ‖"],
                               [[k, _num(v["cos"]["1,2"]), _num(v["rel"][0]), _num(v["rel"][1])]
                                for k, v in layers.items()], unit="ratio"),
    }


def tables_of(res: dict) -> dict[str, dict]:
    """Every table of one seed: {name: {"title", "unit", "columns", "rows": [[label, *values]]}}."""
    return {**qa_tables(res), **lore_tables(res), **rag_table(res), **port_tables(res), **world_tables(res)}


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


def _cell(t: dict, m: float, s: float) -> str:
    if math.isnan(m):
        return "n/a"
    v = f"{m:.0f}" if t["unit"] == "rank" else (f"{m:.3f}" if abs(m) < 1 and m != 0 else f"{m:.1f}")
    return v + (f" ± {s:.1f}" if s and not math.isnan(s) and t["unit"] != "ratio" else "")


def format_tables(tables: dict, markdown: bool = False) -> str:
    lines = []
    for t in tables.values():
        body = [[r["label"], *(_cell(t, m, s) for m, s in zip(r["mean"], r["std"]))] for r in t["rows"]]
        head = ["", *t["columns"]]
        if markdown:
            lines += [f"### {t['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in body] + [""]
            continue
        w = [max(len(str(x[j])) for x in [head, *body]) for j in range(len(head))]
        lines += [t["title"], "  ".join(h.rjust(n) if j else h.ljust(n) for j, (h, n) in enumerate(zip(head, w)))]
        lines += ["  ".join(c.rjust(n) if j else c.ljust(n) for j, (c, n) in enumerate(zip(r, w))) for r in body]
        lines.append("")
    return "\n".join(lines)
