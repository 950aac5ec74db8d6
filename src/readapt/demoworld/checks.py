"""World checks: is this world able to test a claim at all? Each is measured, printed and judged first.

A claim depends on the checks its comparison needs (verdicts.Claim.depends_on); when one of them fails the
claim is "not testable" and the verdict names the check. A check passes when its mean over seeds reaches
the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

from readapt.demoworld.settings import EM

INSTRUCT_A, LEARNED_B, READS, ROOM, TASK, SEEDS = (
    "instruct answers held-out A", "knowledge adapter learned B", "instruct reads a passage",
    "room for both Ψ and Δ", "task patch learned", "seeds")


@dataclass(frozen=True)
class CheckSpec:
    name: str
    description: str
    threshold: float
    measure: object  # per-seed results -> value


def _room(res: dict) -> float:
    """min(Ψ keeps A, Δ keeps B) x100: bio completion of A under Φ+Ψ over that under Φ, and of B under
    Φ+Ψ+Δ over that under Φ+Ψ (each capped at 100%).

    Not normalised by what Δ does to A alone: Φ+Δ completes A's facts as well as Φ does (seed 0: 94-99% vs
    98%), so a low ratio on B is Δ erasing what Ψ added, not a change of format that every population shares."""
    k = res["knowledge"]
    keeps_a = k["pretrained + Ψ on A"] / max(k["pretrained on A"], 1e-9)
    keeps_b = k["pretrained + Ψ + Δ on B"] / max(k["pretrained + Ψ on B"], 1e-9)
    return 100 * min(1.0, keeps_a, keeps_b)


SPECS = (
    CheckSpec(INSTRUCT_A, "the instruct model Θ answers held-out A (people it read about but was never asked "
              "about) closed book: contains-EM, test split", 90.0,
              lambda r: r["closed_book"]["instruct"]["A"][EM]),
    CheckSpec(LEARNED_B, "the knowledge adapter Ψ (on Φ, B's bios) has learned B: % of B's facts completed after a "
              "bio prefix (teacher-forced)", 90.0, lambda r: r["knowledge"]["pretrained + Ψ on B"]),
    CheckSpec(READS, "the instruct model reads: contains-EM on B's test questions (people it never saw) with the "
              "gold passage in the prompt", 80.0, lambda r: r["rag"]["instruct"]["oracle"][EM]),
    CheckSpec(ROOM, "Ψ and Δ do not erase each other: min(bio completion of A under Φ+Ψ / under Φ, of B under "
              "Φ+Ψ+Δ / under Φ+Ψ), %", 80.0, _room),
    CheckSpec(TASK, "the PortLLM task patch does its task on version 1: contains-EM on held-out A of Φ + patch "
              "(Φ alone: the first row of the PortLLM table)", 80.0, lambda r: r["port"]["version 1 + task patch"]["A"][EM]),
)


def world_checks(per_seed: list[dict]) -> list[dict]:
    """[{"name", "description", "value" (mean over seeds), "per_seed", "threshold", "passed"}], seeds last."""
    out = []
    for spec in SPECS:
        values = [float(spec.measure(r)) for r in per_seed]
        mean = sum(values) / len(values)
        out.append({"name": spec.name, "description": spec.description, "value": round(mean, 2),
                    "per_seed": [round(v, 2) for v in values], "threshold": spec.threshold,
                    "passed": mean >= spec.threshold})
    n = len(per_seed)
    out.append({"name": SEEDS, "description": "seeds (a standard error needs at least two)", "value": n,
                "per_seed": [r["seed"] for r in per_seed], "threshold": 2, "passed": n >= 2})
    return out


def failed(checks: list[dict]) -> set[str]:
    return {c["name"] for c in checks if not c["passed"]}


def format_checks(checks: list[dict]) -> str:
    """One line per check: name, value, threshold, PASS/FAIL."""
    w = max(len(c["name"]) for c in checks)
    lines = ["World checks (can this world test the claims?):"]
    for c in checks:
        value = f"{c['value']:g}" if c["name"] == SEEDS else f"{c['value']:.1f}"
        lines.append(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['name'].ljust(w)}  {value:>6} (needs ≥ {c['threshold']:g})")
    return "\n".join(lines)
