"""Rouge-L recall and contains-EM on hand-worked cases (RE-Adapt 5.3), and their agreement with rouge-score."""

import random

import pytest

from readapt.errors import ReadaptError
from readapt.metrics import (RESPONSE_ALLOWANCE, _head_tokens, check_metrics, contains_em, lcs_length, normalize,
                             rouge_l_recall, score_predictions)


# --- Rouge-L recall: LCS(reference, response) / len(reference) -------------------------------------------


@pytest.mark.parametrize(
    "response, answers, expected",
    [
        # ref: the capital city of france (5); LCS "the capital of france" = 4
        ("Paris is the capital of France", ["the capital city of France"], 4 / 5),
        # recall, not precision: a long response containing the whole reference scores 1 (precision 2/7)
        ("the capital of france is paris yes", ["the capital"], 1.0),
        # order matters: [france, of, capital, the] vs [the, capital, of, france] -> LCS 1
        ("France of capital the", ["the capital of France"], 1 / 4),
        # several references: max(1/4, 1/2)
        ("alpha beta", ["alpha gamma delta epsilon", "beta zeta"], 1 / 2),
        # case and punctuation are dropped by rouge-score's tokenizer; no stemming: "cats" != "cat"
        ("PARIS!!!", ["paris."], 1.0),
        ("two cats", ["cat"], 0.0),
        # a hyphen splits tokens: "New-York" -> new york
        ("He lives in New-York.", ["new york city"], 2 / 3),
        # empty response, and a reference with no tokens at all
        ("", ["Paris"], 0.0),
        ("anything", ["?!"], 0.0),
    ],
)
def test_rouge_l_recall_hand_worked(response, answers, expected):
    assert rouge_l_recall(response, answers) == pytest.approx(expected, abs=1e-12)


def _lcs(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_rouge_l_recall_agrees_with_rouge_score_and_an_independent_lcs():
    from rouge_score import rouge_scorer, tokenize

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    words = ["The", "cat", "sat,", "on", "a", "mat.", "Dogs", "run-fast", "1990", "U.S."]
    for _ in range(200):
        resp = " ".join(rng.choices(words, k=rng.randint(0, 12)))
        refs = [" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        ours = rouge_l_recall(resp, refs)
        assert ours == max(scorer.score(r, resp)["rougeL"].recall for r in refs)
        by_hand = []
        for r in refs:
            rt, pt = tokenize.tokenize(r, None), tokenize.tokenize(resp, None)
            by_hand.append(_lcs(rt, pt) / len(rt) if rt else 0.0)
        assert ours == pytest.approx(max(by_hand), abs=1e-12)


def test_bit_parallel_lcs_equals_the_dynamic_programme():
    """Lengths around and past the 64-bit word, small alphabets (many matches) and large ones (few)."""
    rng = random.Random(1)
    for _ in range(600):
        alphabet = [str(i) for i in range(rng.choice([1, 2, 3, 5, 20]))]
        a = rng.choices(alphabet, k=rng.choice([0, 1, 2, 7, 63, 64, 65, 130]))
        b = rng.choices(alphabet, k=rng.randint(0, 150))
        assert lcs_length(a, b) == _lcs(a, b) == lcs_length(b, a)


def test_rouge_l_recall_equals_rouge_score_on_many_random_texts():
    """Free text with case, punctuation, digits, hyphens and non-ASCII letters; same tokens (rouge-score's
    tokenizer), so the recall must be equal, not close."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(2)
    words = ["the", "The", "cat", "CAT", "sat,", "on", "a", "mat.", "run-fast", "1990", "U.S.", "...", "naïve",
             "K", "\u212a", "Σίσυφος", "İi", "x1", "", "e-mail", "(a)"]
    for _ in range(3000):
        resp = " ".join(rng.choices(words, k=rng.randint(0, 40)))
        refs = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(rng.randint(1, 3))]
        assert rouge_l_recall(resp, refs) == max(scorer.score(r, resp)["rougeL"].recall for r in refs), (resp, refs)


def test_head_tokens_are_the_first_tokens_of_the_whole_text():
    from rouge_score import tokenize

    rng = random.Random(3)
    pieces = ["ab", "C", "9", " ", "  ", "-", "\u212a", "İ", "Σ", "xyz" * 30, "\n", "é"]
    for _ in range(500):
        text = "".join(rng.choices(pieces, k=rng.randint(0, 300)))
        limit = rng.randint(1, 40)
        whole = tokenize.tokenize(text, None)
        assert _head_tokens(text, limit) == (whole[:limit], len(whole) > limit)


def test_rouge_l_reads_a_bounded_head_of_a_rambling_response_and_says_so():
    """A response is read up to 10 x (longest reference) + RESPONSE_ALLOWANCE tokens; the summary counts
    the responses cut. The reference right at the limit counts, one token further does not."""
    limit = 10 * 2 + RESPONSE_ALLOWANCE
    at_limit = "x " * (limit - 2) + "new york"  # exactly `limit` tokens: read whole
    past = "x " * (limit - 1) + "new york"  # one token more: "york" is cut
    assert rouge_l_recall(at_limit, ["new york"]) == 1.0
    assert rouge_l_recall(past, ["new york"]) == 0.5
    rows = [{"response": past, "answers": ["new york"]}, {"response": at_limit, "answers": ["new york"]},
            {"response": past + " more", "answers": ["new york", "a much longer reference answer " * 20]}]
    with pytest.warns(UserWarning, match="1 of 3 response"):
        summary, per_q = score_predictions(rows)
    assert summary["rouge_l_responses_cut"] == 1 and [q["rouge_l_recall"] for q in per_q] == [50.0, 100.0, 100.0]
    assert "rouge_l_responses_cut" not in score_predictions(rows[1:2])[0]  # none cut: the summary is as before
    assert "rouge_l_responses_cut" not in score_predictions(rows, ["contains_em"])[0]


def test_rouge_l_memory_is_linear_in_the_lengths():
    """rouge-score's LCS table for a 3000 x 3000-token pair holds 9M cells (over 70 MB)."""
    import tracemalloc

    rng = random.Random(4)
    resp, ref = (" ".join(f"w{rng.randrange(50)}" for _ in range(3000)) for _ in range(2))
    tracemalloc.start()
    try:
        rouge_l_recall(resp, [ref])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak


# --- contains-EM: normalised reference inside the normalised response -------------------------------------


def test_normalize_is_squad_normalisation():
    assert normalize("  The  Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize("An apple a day") == "apple day"
    assert normalize("theatre") == "theatre"  # articles only as whole words


@pytest.mark.parametrize(
    "response, answers, expected",
    [
        ("It was the Eiffel Tower.", ["eiffel tower"], 1.0),
        ("It was the Eiffel Tower.", ["Tower of Pisa"], 0.0),
        ("He studied at University of Oslo", ["the University of Oslo"], 1.0),  # articles removed
        ("Born in the U.S.A.", ["usa"], 1.0),  # punctuation removed
        ("BORN IN 1990", ["1990"], 1.0),  # case
        ("born in 1990", ["1"], 0.0),  # whole words only
        ("city10", ["city1"], 0.0),
        ("Lyon, I think", ["Paris", "Lyon"], 1.0),  # any reference
        ("Eiffel is a tower", ["eiffel tower"], 0.0),  # contiguous
        ("", ["Paris"], 0.0),  # empty response
        ("the end", ["The"], 0.0),  # a reference that normalises to nothing never matches
    ],
)
def test_contains_em_hand_worked(response, answers, expected):
    assert contains_em(response, answers) == expected


@pytest.mark.parametrize("metric", [rouge_l_recall, contains_em])
@pytest.mark.parametrize("answers", [[], "Paris", None])
def test_empty_or_malformed_answer_list_is_an_error(metric, answers):
    with pytest.raises(ReadaptError, match="non-empty list"):
        metric("Paris", answers)


def test_score_predictions_means_times_100():
    rows = [
        {"response": "Paris is the capital", "answers": ["Paris"]},  # R 1, EM 1
        {"response": "new york", "answers": ["new york city"]},  # R 2/3, EM 0
        {"response": "", "answers": ["x"]},  # 0, 0
        {"response": "a b", "answers": ["b c d e"]},  # R 1/4, EM 0
    ]
    summary, per_q = score_predictions(rows)
    assert summary["n"] == 4
    assert summary["rouge_l_recall"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 1 / 4) / 4)
    assert summary["contains_em"] == pytest.approx(25.0)
    assert [q["contains_em"] for q in per_q] == [100.0, 0.0, 0.0, 0.0]
    only, _ = score_predictions(rows, ["contains_em"])
    assert set(only) == {"contains_em", "n"}


def test_unknown_metric_name():
    with pytest.raises(ReadaptError, match="unknown metric.*rouge_l_recall, contains_em"):
        check_metrics(["rougeL"])
    with pytest.raises(ReadaptError):
        score_predictions([{"response": "a", "answers": ["a"]}], ["bleu"])
