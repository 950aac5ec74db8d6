"""The verdict rule and the world checks, on given numbers (no training): every verdict each rule can give."""

import math

import pytest

from readapt.demoworld import checks as wc
from readapt.demoworld.verdicts import (
    MATCH_MARGIN,
    NOT_REPRODUCED,
    NOT_TESTABLE,
    REPRODUCED,
    WITHIN_NOISE,
    Claim,
    mean_se,
    verdict,
)


def test_mean_and_standard_error():
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))  # sample std 1
    m, se = mean_se([5.0])
    assert m == 5.0 and math.isnan(se)


@pytest.mark.parametrize("a, b, expected", [
    ([60, 62, 64], [50, 50, 50], REPRODUCED),          # d = 10, 12, 14: m 12, SE 1.15
    ([51, 52, 53], [50, 50, 50], REPRODUCED),          # m 2, SE 0.58: small but consistent
    ([50, 51, 52], [50, 50, 50], WITHIN_NOISE),        # m 1, SE 0.58: 2·SE 1.15 > 1
    ([55, 45, 52], [50, 50, 50], WITHIN_NOISE),        # m 0.67, SE 2.9
    ([40, 41, 42], [50, 50, 50], NOT_REPRODUCED),      # clearly the other way
    ([50, 50, 50], [50, 50, 50], WITHIN_NOISE),        # no difference at all
    ([52, 52, 52], [50, 50, 50], REPRODUCED),          # SE 0, m > 0
])
def test_better(a, b, expected):
    assert verdict(a, b)[0] == expected


def test_better_needs_more_than_twice_the_standard_error():
    # d = (2, 4, 6): m = 4, SE = 2/√3 ≈ 1.155, 2·SE ≈ 2.31 < 4 -> reproduced
    assert verdict([2, 4, 6], [0, 0, 0])[0] == REPRODUCED
    # d = (0, 4, 8): m = 4, SE = 4/√3 ≈ 2.31, 2·SE ≈ 4.62 > 4 -> within noise
    assert verdict([0, 4, 8], [0, 0, 0])[0] == WITHIN_NOISE


@pytest.mark.parametrize("a, b, expected", [
    ([50, 51, 49], [50, 50, 50], REPRODUCED),          # |m| 0 + 2·SE 1.15 <= 5
    ([70, 71, 72], [50, 50, 50], NOT_REPRODUCED),      # |m| 21 - 2·SE >> 5
    ([53, 58, 48], [50, 50, 50], WITHIN_NOISE),        # m 3, SE 2.9: the interval reaches past 5
])
def test_match(a, b, expected):
    assert verdict(a, b, "match")[0] == expected


def test_match_margin_edge():
    assert verdict([50 + MATCH_MARGIN] * 3, [50] * 3, "match")[0] == REPRODUCED  # SE 0, |m| = margin
    assert verdict([50 + MATCH_MARGIN + 0.1] * 3, [50] * 3, "match")[0] == NOT_REPRODUCED


def test_not_testable():
    v, numbers = verdict([90, 91, 92], [10, 10, 10], failed=("instruct reads a passage",))
    assert v == NOT_TESTABLE and numbers["failed_checks"] == ["instruct reads a passage"]
    v, numbers = verdict([90], [10])  # one seed: no standard error
    assert v == NOT_TESTABLE and numbers["failed_checks"] == ["seeds"]


def test_bad_input():
    with pytest.raises(ValueError):
        verdict([1, 2], [1])
    with pytest.raises(ValueError):
        verdict([1, 2], [1, 2], "bigger")


def test_claim_names_the_failed_check_it_depends_on():
    c = Claim("x beats y", "Paper Table 1", "x", "y", [60, 62, 64], [50, 50, 50], ("room", "seeds"))
    judged = c.judge({"reads"})  # a failed check it does not depend on changes nothing
    assert judged["verdict"] == REPRODUCED and judged["depends_on"] == ["room", "seeds"]
    judged = c.judge({"room", "reads"})
    assert judged["verdict"] == NOT_TESTABLE and "room failed" in judged["evidence"]
    assert judged["numbers"]["failed_checks"] == ["room"]
    assert c.judge(set(), extra=("smoke test",))["verdict"] == NOT_TESTABLE
    assert set(judged) == {"claim", "paper", "verdict", "evidence", "numbers", "depends_on"}


def _seed(seed, instruct_a=95.0, learned_b=98.0, reads=85.0, keeps=(60.0, 58.0, 97.0, 95.0), task=90.0):
    pa, ppa, ppb, ppdb = keeps  # Φ on A, Φ+Ψ on A, Φ+Ψ on B, Φ+Ψ+Δ on B
    return {"seed": seed, "closed_book": {"instruct": {"A": {"contains_em": instruct_a}}},
            "knowledge": {"pretrained on A": pa, "pretrained + Ψ on A": ppa, "pretrained + Ψ on B": learned_b,
                          "pretrained + Ψ + Δ on B": ppdb * learned_b / ppb},
            "rag": {"instruct": {"oracle": {"contains_em": reads}}},
            "port": {"version 1 + task patch": {"A": {"contains_em": task}}}}


def test_world_checks_pass_and_fail_on_their_thresholds():
    checks = wc.world_checks([_seed(0), _seed(1)])
    assert [c["name"] for c in checks] == [wc.INSTRUCT_A, wc.LEARNED_B, wc.READS, wc.ROOM, wc.TASK, wc.SEEDS]
    assert all(c["passed"] for c in checks), checks
    assert {"name", "description", "value", "per_seed", "threshold", "passed"} <= set(checks[0])
    bad = wc.world_checks([_seed(0, instruct_a=89.0, reads=5.0, keeps=(60.0, 9.0, 97.0, 95.0))])
    assert wc.failed(bad) == {wc.INSTRUCT_A, wc.READS, wc.ROOM, wc.SEEDS}
    room = next(c for c in bad if c["name"] == wc.ROOM)
    assert room["value"] == pytest.approx(100 * 9 / 60)  # Ψ keeps 15% of what Φ knew of A
    text = wc.format_checks(bad)
    assert "FAIL" in text and "PASS" in text and "needs ≥ 80" in text


def test_room_is_the_worse_of_the_two_retentions():
    r = _seed(0, keeps=(60.0, 60.0, 100.0, 50.0), learned_b=100.0)  # Δ halves what Ψ taught
    assert wc._room(r) == pytest.approx(50.0)
    r = _seed(0, keeps=(50.0, 70.0, 100.0, 100.0), learned_b=100.0)  # Ψ improving A counts as keeping it all
    assert wc._room(r) == pytest.approx(100.0)


def test_capacity_row_gives_mean_std_and_the_per_seed_values():
    """The capacity sweep's row: 'mean ± std' of room for both and of the closed-book scores, the gap
    RE-Adapt − fine-tuned instruct per seed, and the values themselves under per_seed."""
    from readapt.demoworld.run import capacity_row
    from readapt.demoworld.settings import FULL

    def seed(i, ft, ra, room_b):
        r = _seed(i, keeps=(60.0, 60.0, 100.0, room_b), learned_b=100.0)
        r["closed_book"].update({"instruct + knowledge adapter": {d: {"contains_em": x} for d, x in zip("BA", ft)},
                                 "RE-Adapt (α, β chosen on validation)": {d: {"contains_em": x} for d, x in zip("BA", ra)}})
        return r

    row = capacity_row(FULL, [seed(0, (30, 20), (20, 90), 70.0), seed(1, (40, 30), (26, 96), 80.0)])
    assert row["room for both"] == "75.0 ± 7.1" and row["instruct A"] == "95.0 ± 0.0"
    assert row["fine-tuned instruct B / A"] == "35.0 ± 7.1 / 25.0 ± 7.1"
    assert row["RE-Adapt − fine-tuned, B"] == "-12.0 ± 2.8" and row["RE-Adapt − fine-tuned, A"] == "68.0 ± 2.8"
    assert row["seeds"] == [0, 1] and row["per_seed"]["room for both"] == [70.0, 80.0]
    assert row["per_seed"]["RE-Adapt − fine-tuned, B"] == [-10, -14]
    assert row["per_seed"]["RE-Adapt (α, β chosen on validation) A"] == [90, 96]
    assert row["parameters"] == "1.08M"
