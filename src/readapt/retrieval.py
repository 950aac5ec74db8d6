"""Retrieval for open-book QA (RE-Adapt, sections 5.4-5.5): the top BM25 passage, or the gold ("oracle") one.

    contexts, retrieved_ids, stats = retrieve(questions, "bm25", "passages.jsonl", top_k=1)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from readapt.errors import ReadaptError
from readapt.userfiles import check_strings, read_jsonl

RETRIEVALS = ("none", "bm25", "oracle")


def bm25_search(texts: Sequence[str], queries: Sequence[str], k: int = 1) -> list[list[int]]:
    """Indices of the top-k texts for each query by BM25 (bm25s, Lucene variant, English stop words)."""
    import logging

    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its own logger to DEBUG
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)
    query_tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
    docs, _ = retriever.retrieve(query_tokens, k=min(k, len(texts)), show_progress=False)
    return docs.tolist()  # [n_queries, k]


def retrieve(questions: list[dict], retrieval: str, passages: str | Path | None, top_k: int = 1):
    """(contexts, retrieved passage ids, stats): contexts[i] is None closed-book, else the passages joined.

    stats has retrieval_accuracy (gold passage ranked first, x100) and, for k > 1, retrieval_hit_at_k,
    over the questions that carry a passage_id.
    """
    if retrieval not in RETRIEVALS:
        raise ReadaptError(f"--retrieval {retrieval!r}: choose one of {', '.join(RETRIEVALS)}")
    n = len(questions)
    if retrieval == "none":
        return [None] * n, [None] * n, {}
    if passages is None:
        raise ReadaptError(f"--retrieval {retrieval} needs --passages PASSAGES.jsonl (lines {{\"id\", \"text\"}})")
    if top_k < 1:
        raise ReadaptError(f"--top-k must be at least 1, got {top_k}")
    corpus = read_jsonl(passages, ("id", "text"))
    check_strings(passages, corpus, "text")
    ids = [str(p["id"]) for p in corpus]
    by_id = {pid: i for i, pid in enumerate(ids)}
    if len(by_id) != len(ids):
        dup = next(pid for pid in ids if ids.count(pid) > 1)
        raise ReadaptError(f"{passages}: passage id {dup!r} appears more than once; ids must be unique")
    gold = [str(q["passage_id"]) if q.get("passage_id") is not None else None for q in questions]
    if retrieval == "oracle":
        bad = [q for q, g in zip(questions, gold) if g not in by_id]
        if bad:
            q = bad[0]
            raise ReadaptError(
                f"--retrieval oracle: {len(bad)} question(s) have no passage_id found in {passages}, "
                f"first: id {q['id']!r} (line {q['_line']}, passage_id {q.get('passage_id')!r}); "
                "add the ids or use --retrieval bm25"
            )
        hits = [[by_id[g]] for g in gold]
    else:
        hits = bm25_search([p["text"] for p in corpus], [q["question"] for q in questions], top_k)
    contexts = ["\n\n".join(corpus[j]["text"].strip() for j in h) for h in hits]
    retrieved = [[ids[j] for j in h] for h in hits]
    stats = {}
    scored = [(g, r) for g, r in zip(gold, retrieved) if g is not None]
    if retrieval == "bm25" and scored:
        stats["retrieval_accuracy"] = 100.0 * sum(r[0] == g for g, r in scored) / len(scored)
        if top_k > 1:
            stats["retrieval_hit_at_k"] = 100.0 * sum(g in r for g, r in scored) / len(scored)
        stats["retrieval_n"] = len(scored)
    return contexts, retrieved, stats
