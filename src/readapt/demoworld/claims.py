"""The papers' own comparisons, as claims over this world's per-seed numbers (judged by verdicts.verdict)."""

from __future__ import annotations

from readapt.demoworld.checks import INSTRUCT_A, LEARNED_B, READS, ROOM, SEEDS, TASK
from readapt.demoworld.settings import EM
from readapt.demoworld.verdicts import Claim

T2 = "RE-Adapt Table 2"
CHOSEN = "RE-Adapt (α, β chosen on validation)"
HALF = "RE-Adapt (α=β=0.5)"
FT = "instruct + knowledge adapter"
KNOWS = (SEEDS, INSTRUCT_A, LEARNED_B, ROOM)  # what a comparison of Φ + αΨ + βΔ with Θ (+ Ψ) needs


def _cb(per_seed, row, dom):
    return [r["closed_book"][row][dom][EM] for r in per_seed]


def table2(per_seed: list[dict]) -> list[Claim]:
    """RE-Adapt vs the instruct model fine-tuned on the new text (in- and out-of-domain), at the scales
    chosen on validation and at α=β=0.5; and the fine-tuning's cost out-of-domain."""
    out = []
    for row, at in ((CHOSEN, "scales chosen on validation"), (HALF, "α=β=0.5")):
        out.append(Claim(f"RE-Adapt ({at}) beats the instruct model fine-tuned on the new text, in-domain (B)", T2,
                         "RE-Adapt B", "instruct + knowledge adapter B", _cb(per_seed, row, "B"),
                         _cb(per_seed, FT, "B"), KNOWS))
        out.append(Claim(f"RE-Adapt ({at}) keeps out-of-domain QA (held-out A) better than the fine-tuned instruct "
                         "model", T2, "RE-Adapt A", "instruct + knowledge adapter A", _cb(per_seed, row, "A"),
                         _cb(per_seed, FT, "A"), KNOWS))
        out.append(Claim(f"RE-Adapt ({at}) scores above the instruct model out-of-domain (held-out A)", T2,
                         "RE-Adapt A", "instruct A", _cb(per_seed, row, "A"), _cb(per_seed, "instruct", "A"), KNOWS))
    out.append(Claim("Fine-tuning the instruct model on the new text hurts its out-of-domain QA", T2,
                     "instruct A", "instruct + knowledge adapter A", _cb(per_seed, "instruct", "A"),
                     _cb(per_seed, FT, "A"), (SEEDS, INSTRUCT_A, LEARNED_B)))
    return out


def figure6(per_seed: list[dict]) -> list[Claim]:
    """Φ + βΔ with β < 1 chosen on validation (held-out A) vs the instruct model (β = 1), test split."""
    picked, one, betas = [], [], []
    for r in per_seed:
        st = r["strength"]
        b = max((k for k in st if float(k) < 1), key=lambda k: st[k]["val"]["A"][EM])
        betas.append(b)
        picked.append(st[b]["test"]["A"][EM])
        one.append(st["1"]["test"]["A"][EM])
    return [Claim("Instruction strength below 1 beats the instruct model out-of-domain (Φ + βΔ, β < 1 chosen on "
                  "validation)", "RE-Adapt Figure 6", "Φ + βΔ A", "instruct A", picked, one, (SEEDS, INSTRUCT_A),
                  note=f"β chosen per seed: {', '.join(betas)}")]


def table3(per_seed: list[dict]) -> list[Claim]:
    """RE-Adapt vs the instruct model on B with the top-1 BM25 passage and with the gold passage."""
    out = []
    for ret, name in (("bm25", "BM25"), ("oracle", "the oracle passage")):
        out.append(Claim(f"RE-Adapt beats the instruct model with {name} in the prompt (in-domain B)", "RE-Adapt Table 3",
                         f"RE-Adapt B ({ret})", f"instruct B ({ret})",
                         [r["rag"][CHOSEN][ret][EM] for r in per_seed],
                         [r["rag"]["instruct"][ret][EM] for r in per_seed], (*KNOWS, READS)))
    return out


def lore(per_seed: list[dict]) -> list[Claim]:
    """LoRE-Adapt (τ=0.5) performs like RE-Adapt: mean of B and A, each at its own validation-chosen scales."""
    def mean_ab(row):
        return [(r["closed_book"][row]["B"][EM] + r["closed_book"][row]["A"][EM]) / 2 for r in per_seed]

    kept = sum(r["lore"]["0.5"]["params_kept_share"] for r in per_seed) / len(per_seed)
    return [Claim("LoRE-Adapt (τ=0.5) performs like RE-Adapt (mean of B and A)", "RE-Adapt Table 2",
                  "LoRE-Adapt", "RE-Adapt", mean_ab("LoRE-Adapt τ=0.5 (α, β chosen on validation)"), mean_ab(CHOSEN),
                  KNOWS, kind="match", note=f"LoRE keeps {kept:.1f}% of Δ's parameters")]


def baselines(per_seed: list[dict]) -> list[Claim]:
    """The reviewers' baselines: a plain-LoRA Ψ next to DoRA (the paper's), and Φ + 0.5Δ (no Ψ at all)."""
    def mean_ab(row):
        return [(r["closed_book"][row]["B"][EM] + r["closed_book"][row]["A"][EM]) / 2 for r in per_seed]

    return [
        Claim("RE-Adapt with a plain-LoRA knowledge adapter performs like with DoRA (the paper's; mean of B and A)",
              "RE-Adapt review", "plain LoRA Ψ", "DoRA Ψ", mean_ab(CHOSEN),
              mean_ab("RE-Adapt, DoRA Ψ (α, β chosen on validation)"), KNOWS, kind="match"),
        Claim("RE-Adapt's in-domain gain comes from the knowledge adapter, not from scaling Δ (vs Φ + 0.5Δ, B)",
              "RE-Adapt review", "RE-Adapt B", "Φ + 0.5Δ B", _cb(per_seed, CHOSEN, "B"),
              _cb(per_seed, "Φ + 0.5Δ (no knowledge adapter)", "B"), KNOWS),
    ]


def _a(rows: list[dict], key: str) -> list[float]:
    """Held-out A contains-EM of row `key` of each seed's drift point."""
    return [x[key]["A"][EM] for x in rows]


def portllm(per_seed: list[dict]) -> list[Claim]:
    """At the smallest and at the largest version drift: the ported patch does the task (vs Φ₂ alone) and
    matches a patch re-trained on Φ₂. The drift (‖θ′−θ‖/‖θ‖, mean over seeds) is in each claim's note."""
    drifts = per_seed[0]["port"]["drift"]
    claims = []
    for i in sorted({0, len(drifts) - 1}):
        rows = [r["port"]["drift"][i] for r in per_seed]
        k = rows[0]["steps"]
        drift = sum(x["drift"].get("drift", float("nan")) for x in rows) / len(rows)
        note = f"weights moved {100 * drift:.1f}% from version 1 to 2"
        claims += [
            Claim(f"A ported patch does the task on version 2 with no training ({k} further steps)", "PortLLM Table 1",
                  "Φ₂ + ported patch A", "Φ₂ alone A", _a(rows, "version 2 + ported patch"),
                  _a(rows, "version 2 alone"), (SEEDS, TASK), note=note),
            Claim(f"A ported patch matches a patch re-trained on version 2 ({k} further steps)", "PortLLM Table 1",
                  "ported", "re-trained", _a(rows, "version 2 + ported patch"),
                  _a(rows, "version 2 + re-trained patch"), (SEEDS, TASK), kind="match", note=note),
        ]
    return claims


def memory(per_seed: list[dict]) -> list[Claim]:
    port = [r["memory"]["port --merge peak RSS (MB)"] for r in per_seed]
    train = [r["memory"]["re-training (3 LoRA steps) peak RSS (MB)"] for r in per_seed]
    return [Claim("Porting needs less memory than re-training (peak RSS, MB)", "PortLLM §5 (12.2x less GPU memory)",
                  "re-training", "port --merge", train, port, (SEEDS,),
                  note="the tiny model is a few MB, so both are mostly the Python/torch process itself")]


def all_claims(per_seed: list[dict]) -> list[Claim]:
    return [*table2(per_seed), *figure6(per_seed), *table3(per_seed), *lore(per_seed), *baselines(per_seed),
            *portllm(per_seed), *memory(per_seed)]
