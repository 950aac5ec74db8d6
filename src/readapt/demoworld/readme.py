"""The README of a demo run and the key to its folder names."""

from __future__ import annotations

import os

from readapt.demoworld.checks import format_checks
from readapt.demoworld.report import format_tables
from readapt.demoworld.settings import SELECT, TAUS, Settings
from readapt.demoworld.verdicts import RULE

KEY = """# Key to the files of this demo run

Top level: `README.md` (what was measured and the verdicts), `results.json` (world_checks, claims, seeds,
settings and every per-seed number), `tables.md` / `tables.json` (mean ± std over seeds), the figures.

`seed<N>/` holds the run of seed N (its world, its trained models are in the cache named in results.json):

| folder / file | what it is |
|---|---|
| `data/knowledge.jsonl` | unlabeled paraphrased bios of population B (plus a share of A's bios when `replay` > 0): the knowledge adapters' corpus |
| `data/task.jsonl` | closed-book chat QA examples on A_train and A's bios: the PortLLM task patch's corpus |
| `data/qa.jsonl` | every closed-book question: B (ids `B/...`, in-domain) and the held-out half of A (`A/...`, out-of-domain); the sweeps split it in halves (validation / test) by the seed |
| `data/qa_test.jsonl` | the test half of `qa.jsonl`: every closed-book evaluation and table |
| `data/qa_B_test.jsonl`, `data/passages_B.jsonl` | B's test questions and one bio per person of B (RAG) |
| `data/qa_port.jsonl` | held-out A (the task) and C (`C/...`, read only by version 2) |
| `re_adapter/` | the RE-Adapter Δ = Θ − Φ (`readapt extract`) |
| `lore_adapter_tau<τ>/` | the LoRE-Adapter of Δ keeping share τ of each matrix's energy (`readapt extract --tau`) |
| `spectrum/` | singular-value spectra of Δ (`readapt spectrum`) |
| `sweep_re_adapt/`, `sweep_re_adapt_dora/`, `sweep_lore_adapt/` | `readapt sweep` of Φ + αΨ + β·adapter with the plain-LoRA Ψ and Δ, the DoRA Ψ and Δ, the plain-LoRA Ψ and the LoRE-Adapter (τ=0.5); `summary.json` reports the chosen cell on the test half over B and A together, `cells.csv` every cell on both halves; the tables split B and A |
| `eval/instruct/`, `eval/instruct_knowledge/` | Θ and Θ + a LoRA trained on B's bios (the fine-tuned instruct baseline) on `qa_test.jsonl`; `summary.json` is over B and A together, the tables split them |
| `eval/lore_tau<τ>/` | Φ + αΨ + β·LoRE(τ) at RE-Adapt's chosen (α, β), on `qa_test.jsonl` |
| `eval/rag_<bm25,oracle>_<model>/` | `model` = `instruct`, `instruct_knowledge`, `re_adapt`, `lore_adapt` (chosen scales) answering `qa_B_test.jsonl` with the top-1 BM25 passage or the gold passage |
| `eval/port_v1/` | Φ + the task patch on `qa_port.jsonl` (the patch on the version it was trained on) |
| `eval/port_v1_alone/` | Φ alone on `qa_port.jsonl` (what the patch adds to its own version) |
| `eval/port_v2_<k>_<alone,ported,retrained>/` | version 2 after k further pre-training steps: alone, with the ported patch, with a patch re-trained on it (`qa_port.jsonl`) |
| `ported_v2_<k>/` | the task patch carried to version 2 (k steps) by `readapt port`, with its `port_report.json` (drift figures) |
| `ported_merged/` | `readapt port --merge` at the largest drift (the memory measurement) |
| `logs/` | the output of the child processes of the memory measurement |
| `results.json` | this seed's numbers (the top-level results.json holds them too) |
"""


def _machine() -> str:
    load = os.getloadavg()[0]
    return f"{len(os.sched_getaffinity(0))} CPU cores, load average {load:.1f} when it finished"


def _verdict_lines(claims: list[dict]) -> list[str]:
    return ["| verdict | claim | paper | evidence |", "|---|---|---|---|",
            *(f"| **{c['verdict']}** | {c['claim']} | {c['paper']} | {c['evidence']} |" for c in claims)]


def readme(s: Settings, checks: list[dict], claims: list[dict], tables: dict, seeds: list[int], smoke: bool,
           seconds: float, figs: list[str], interference: str) -> str:
    sizes = ", ".join(f"{k}={n}" for k, n in s.sizes)
    lines = [
        "# readapt demo: RE-Adapt, LoRE-Adapt, partial adaptation and PortLLM in a synthetic world", "",
        *([("**SMOKE TEST** (`--quick`): a world too small to test the papers' claims; every verdict is "
           "'not testable'. Run `readapt demo` for the real thing."), ""] if smoke else []),
        (f"Made in {seconds:.0f} s ({_machine()}; trained models come from the cache when it is warm). Populations "
        f"{sizes}; tiny Llama ({s.label}); seeds {seeds}. Numbers are x100, mean ± sample standard deviation "
        "over seeds."), "",
        ("The world: fictional people with 4 attributes (birth city, birth year, university, employer). The "
        "*pretrained* model Φ read population A's bios; the *instruct* model Θ is Φ fine-tuned to answer chat "
        "questions in full sentences, first reading a passage about a stranger, then also closed book about "
        "half of A (A_train); *version 2* Φ₂ is Φ pre-trained further on A's and C's bios. New knowledge is "
        "population B: unlabeled bios only. Questions on B are in-domain, questions on the held-out half of A "
        "out-of-domain (knowledge the models already had)."), "",
        "## World checks", "", "```", format_checks(checks), "```", "",
        *(f"- **{c['name']}**: {c['description']}" for c in checks), "",
        "## Claims of the papers, as measured here", "", f"Rule: {RULE}.", "",
        f"Scales chosen on validation: {SELECT}.", "", *_verdict_lines(claims), "",
        "## Why Ψ and Δ do or do not compose here", "", "```", interference, "```", "",
        *(f"![{f}]({f})" for f in figs), "", "## Tables", "", format_tables(tables, markdown=True),
        "## Files", "", "See `KEY.md` for every folder name.", "",
    ]
    return "\n".join(lines)


def interference_text(tables: dict) -> str:
    """The per-layer interference table with a one-line reading of it."""
    t = tables["interference"]
    return format_tables({"interference": t}) + (
        "cos near 0: Ψ and Δ change nearly orthogonal directions in weight space; they can still interfere "
        "through the function (the world checks' 'room for both' measures that: what each keeps of the other's knowledge).")


def capacity_readme(rows: list[dict], seconds: float) -> str:
    """The capacity sweep's README: the RE-Adapt vs fine-tuned-instruct gap per model size."""
    head = ["model", "parameters", "room for both", "instruct A", "fine-tuned instruct B / A", "RE-Adapt (chosen) B / A",
            "RE-Adapt − fine-tuned, B", "RE-Adapt − fine-tuned, A"]
    lines = ["# readapt demo --capacity-sweep", "",
             (f"The default world at {len(rows)} model sizes, {seconds:.0f} s ({_machine()}). contains-EM x100, mean ± "
             "std over seeds (each seed's values: capacity.json, per_seed); RE-Adapt at the scales chosen on validation."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


__all__ = ["KEY", "TAUS", "capacity_readme", "interference_text", "readme"]
