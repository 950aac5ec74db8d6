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
import warnings
from typing import Callable, Iterable, Sequence

from readapt.errors import ReadaptError


RESPONSE_ALLOWANCE = 2048  # Rouge-L reads at most 10 x (longest reference) + this many response tokens


@functools.cache
def _tokenize():
    from rouge_score import tokenizers

    # rouge-score's default tokenizer: lower case, non-alphanumerics -> spaces; no stemming
    return tokenizers.DefaultTokenizer(use_stemmer=False).tokenize


def _references(answers: Sequence[str]) -> Sequence[str]:
    if isinstance(answers, str) or not answers:
        raise ReadaptError(f"a question needs a non-empty list of reference answers, got {answers!r}")
    return answers


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of token lists a and b, bit-parallel (Allison & Dix 1986;
    Hyyrö 2004): with M[t] the bit set {i : a[i] = t} and V = 2^len(a) − 1, for each token t of b

        U = V & M[t];   V = ((V + U) | (V − U)) mod 2^len(a);     LCS = len(a) − popcount(V)

    V encodes one row of the LCS table (bit i cleared where the row steps up), so memory is len(a) bits
    and time len(b)·len(a)/64 word operations; rouge-score's `_lcs_table` holds all len(a)·len(b) cells
    as Python ints (a 2 MB pair took gigabytes). Equal to it on every pair: tests/test_metrics.py."""
    masks: dict[str, int] = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = v = (1 << len(a)) - 1
    for t in b:
        u = v & masks.get(t, 0)
        if u:
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _head_tokens(text: str, limit: int) -> tuple[list[str], bool]:
    """(the first `limit` tokens of text, whether it has more), tokenizing only a prefix that holds them:
    lower() and the token rule work character by character, so a prefix can only cut its last token."""
    tokenize, size = _tokenize(), 8 * limit + 64
    while True:
        tokens = tokenize(text[:size])
        if len(tokens) > limit or size >= len(text):
            return tokens[:limit], len(tokens) > limit
        size *= 4


def rouge_l(response: str, answers: Sequence[str]) -> tuple[float, bool]:
    """(Rouge-L recall, whether the response was cut): see rouge_l_recall."""
    refs = [_tokenize()(r) for r in _references(answers)]
    resp, cut = _head_tokens(response, 10 * max(map(len, refs)) + RESPONSE_ALLOWANCE)
    return max(lcs_length(r, resp) / len(r) if r and resp else 0.0 for r in refs), cut


def rouge_l_recall(response: str, answers: Sequence[str]) -> float:
    """max_ref LCS(ref, response) / len(ref), tokens by rouge-score's RougeL tokenizer (no stemming).

    Recall, not F1 (RE-Adapt, 5.3): "the percentage of the longest common sub-sequence of the reference
    answer found in the model's response", so a long correct answer is not penalised for its length.
    A reference with no tokens (e.g. only punctuation) scores 0.

    Bounds: the response is read up to its first 10·L + 2048 tokens (L: the longest reference's tokens;
    a model that rambles is cut there, and score_predictions counts the cut responses), and the LCS is
    bit-parallel (lcs_length): per question O(L) memory and O(L·(10·L + 2048)/64) word operations,
    whatever the response's length. Below the cut the value is rouge-score's, exactly.
    """
    return rouge_l(response, answers)[0]


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

    summary = {metric: 100 * mean_q max_ref metric(response_q, ref), ..., "n": number of questions, and when
    there are any, "rouge_l_responses_cut": how many responses were longer than Rouge-L reads (see
    rouge_l_recall; a warning says so too)}; per-question scores are also x100 so that their column mean is the
    summary.
    """
    names = check_metrics(metrics)
    per_q, cut = [], 0
    for row in rows:
        scores = {}
        for m in names:
            if m == "rouge_l_recall":
                value, was_cut = rouge_l(row["response"], row["answers"])
                cut += was_cut
            else:
                value = METRICS[m](row["response"], row["answers"])
            scores[m] = 100.0 * value
        per_q.append(scores)
    n = len(per_q)
    summary = {m: (sum(s[m] for s in per_q) / n if n else 0.0) for m in names}
    summary["n"] = n
    if cut:
        summary["rouge_l_responses_cut"] = cut
        warnings.warn(f"{cut} of {n} response(s) exceed 10x their longest reference + {RESPONSE_ALLOWANCE} "
                      f"tokens: Rouge-L read only that many of their tokens")
    return summary, per_q
