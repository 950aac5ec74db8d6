"""QA metrics of the RE-Adapt paper (section 5.3): Rouge-L recall and contains-EM, max over references.

    rouge_l_recall("Paris is the capital", ["Paris"])    # 1.0: every reference token is in the LCS
    contains_em("It is the Eiffel Tower.", ["eiffel tower"])  # 1.0
    score_predictions([{"id": "q1", "response": "...", "answers": ["..."]}, ...])  # means x100

Per question a metric is in [0, 1] and takes the max over the reference answers; a data set's score is
the mean over questions times 100 (the scale of the paper's tables).
"""

from __future__ import annotations

import functools
import re
import string
from typing import Callable, Iterable, Sequence

from readapt.errors import ReadaptError


@functools.cache
def _rouge_l():
    from rouge_score import rouge_scorer

    # rouge-score's default tokenizer: lower case, non-alphanumerics -> spaces; no stemming
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def _references(answers: Sequence[str]) -> Sequence[str]:
    if isinstance(answers, str) or not answers:
        raise ReadaptError(f"a question needs a non-empty list of reference answers, got {answers!r}")
    return answers


def rouge_l_recall(response: str, answers: Sequence[str]) -> float:
    """max_ref LCS(ref, response) / len(ref), tokens by rouge-score's RougeL tokenizer (no stemming).

    Recall, not F1 (RE-Adapt, 5.3): "the percentage of the longest common sub-sequence of the reference
    answer found in the model's response", so a long correct answer is not penalised for its length.
    A reference with no tokens (e.g. only punctuation) scores 0.
    """
    scorer = _rouge_l()
    return max(scorer.score(target=ref, prediction=response)["rougeL"].recall for ref in _references(answers))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def contains_em(response: str, answers: Sequence[str]) -> float:
    """1.0 if some normalised reference appears in the normalised response, as whole words, else 0.0.

    RE-Adapt's "exact match which looks for the exact reference answer anywhere in the response".
    Whole words: "1990" does not contain "1", "city10" does not contain "city1". A reference that
    normalises to nothing (e.g. "The") never matches.
    """
    resp = f" {normalize(response)} "
    return float(any((ref := normalize(a)) and f" {ref} " in resp for a in _references(answers)))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "rouge_l_recall": rouge_l_recall,
    "contains_em": contains_em,
}


def check_metrics(names: Iterable[str] | None) -> list[str]:
    """Validate metric names (None -> all); returns the list, raises ReadaptError on an unknown name."""
    names = list(METRICS) if names is None else list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ReadaptError(f"unknown metric name(s) {unknown or names}: choose from {', '.join(METRICS)}")
    return names


def score_predictions(rows: Iterable[dict], metrics: Iterable[str] | None = None) -> tuple[dict, list[dict]]:
    """Score rows {"response", "answers", ...}: returns (summary, per-question scores).

    summary = {metric: 100 * mean_q max_ref metric(response_q, ref), ..., "n": number of questions};
    per-question scores are also x100 so that their column mean is the summary.
    """
    names = check_metrics(metrics)
    per_q = [{m: 100.0 * METRICS[m](row["response"], row["answers"]) for m in names} for row in rows]
    n = len(per_q)
    summary = {m: (sum(s[m] for s in per_q) / n if n else 0.0) for m in names}
    summary["n"] = n
    return summary, per_q
