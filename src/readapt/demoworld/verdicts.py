"""The verdict rule: a claim of a paper judged on per-seed numbers, the same way for every claim.

A claim compares two conditions measured on the same seeds (paired), or states that two conditions match.
With per-seed differences dᵢ = aᵢ − bᵢ (i = 1..n seeds), m = mean(d), SE = std(d) / √n (sample std):

    "better" claims (a > b):   reproduced      m > 2·SE and m > 0
                               not reproduced  m < −2·SE (clearly the other way)
                               within noise    otherwise
    "match" claims (|a − b| small, MATCH_MARGIN points):
                               reproduced      |m| + 2·SE ≤ margin (the whole ±2 SE interval inside it)
                               not reproduced  |m| − 2·SE > margin (clearly outside it)
                               within noise    otherwise
    not testable               a world check the claim depends on failed (it is named), or fewer than 2
                               seeds (no standard error)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REPRODUCED, NOT_REPRODUCED, WITHIN_NOISE, NOT_TESTABLE = "reproduced", "not reproduced", "within noise", "not testable"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, WITHIN_NOISE, NOT_TESTABLE)
MATCH_MARGIN = 5.0  # points (x100): what "performs like" allows
RULE = ("per-seed paired differences d = a − b, m = mean(d), SE = std(d)/√n; 'a > b' claims: reproduced when "
        "m > 2·SE and m > 0, not reproduced when m < −2·SE, else within noise; 'a matches b' claims: reproduced "
        f"when |m| + 2·SE ≤ {MATCH_MARGIN:g} points, not reproduced when |m| − 2·SE > {MATCH_MARGIN:g}, else "
        "within noise; not testable when a world check it depends on failed or with fewer than 2 seeds")


def mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) with the sample standard deviation; SE is NaN for one value."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, math.nan
    var = sum((x - m) ** 2 for x in values) / (n - 1)
    return m, math.sqrt(var / n)


def verdict(a: list[float], b: list[float], kind: str = "better", failed: tuple[str, ...] = ()) -> tuple[str, dict]:
    """Judge "a > b" (kind="better") or "a matches b" (kind="match") on per-seed values -> (verdict, numbers).

    `failed`: the names of the failed world checks this claim depends on (any makes it not testable)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired per-seed values needed, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m, se = mean_se(d)
    numbers = {"a": a, "b": b, "difference": round(m, 2), "se": None if math.isnan(se) else round(se, 2),
               "kind": kind, "seeds": len(a)}
    if failed:
        return NOT_TESTABLE, {**numbers, "failed_checks": list(failed)}
    if math.isnan(se):
        return NOT_TESTABLE, {**numbers, "failed_checks": ["seeds"]}
    if kind == "better":
        if m > 2 * se and m > 0:
            return REPRODUCED, numbers
        return (NOT_REPRODUCED if m < -2 * se else WITHIN_NOISE), numbers
    if kind == "match":
        if abs(m) + 2 * se <= MATCH_MARGIN:
            return REPRODUCED, numbers
        return (NOT_REPRODUCED if abs(m) - 2 * se > MATCH_MARGIN else WITHIN_NOISE), numbers
    raise ValueError(f"kind must be 'better' or 'match', got {kind!r}")


@dataclass
class Claim:
    """One claim of a paper, judged on this world's per-seed numbers (see `verdict`)."""

    claim: str
    paper: str
    a_label: str
    b_label: str
    a: list[float]
    b: list[float]
    depends_on: tuple[str, ...]
    kind: str = "better"
    note: str = ""

    def judge(self, failed_checks: set[str], extra: tuple[str, ...] = ()) -> dict:
        """The claim as results.json holds it: claim, paper, verdict, evidence, numbers, depends_on.
        `extra`: reasons that make every claim not testable (a smoke test), named like failed checks."""
        failed = tuple(c for c in self.depends_on if c in failed_checks) + tuple(extra)
        v, numbers = verdict(self.a, self.b, self.kind, failed)
        rel = "vs" if self.kind == "better" else "matches?"
        evidence = (f"{self.a_label} {_pm(self.a)} {rel} {self.b_label} {_pm(self.b)}: difference "
                    f"{numbers['difference']:+.1f}" + (f" ± {numbers['se']:.1f} SE" if numbers["se"] is not None else "")
                    + f" over {len(self.a)} seed{'s' * (len(self.a) > 1)}")
        if v == NOT_TESTABLE:
            evidence += "; not testable: " + ", ".join(numbers["failed_checks"]) + " failed"
        if self.note:
            evidence += f"; {self.note}"
        return {"claim": self.claim, "paper": self.paper, "verdict": v, "evidence": evidence,
                "numbers": {**numbers, "a_label": self.a_label, "b_label": self.b_label},
                "depends_on": list(self.depends_on)}


def _pm(values: list[float]) -> str:
    """'mean ± sample std' of per-seed values (the std is left out for one seed)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.1f}"
    s = math.sqrt(sum((x - m) ** 2 for x in values) / (len(values) - 1))
    return f"{m:.1f} ± {s:.1f}"
