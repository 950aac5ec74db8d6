"""Evaluation speed: BM25 over 100k synthetic passages, batched greedy QA generation with tiny models, and
the time and peak memory of `readapt score` on huge responses.

    python benchmarks/bench_eval.py                      # BM25 and generation, CPU
    python benchmarks/bench_eval.py --part score --score-sizes 402KB,10MB --share 0.05,0.0005
    python benchmarks/bench_eval.py --part generate --device cuda --sizes 1024x8 --batch-sizes 1,64,256
    python benchmarks/bench_eval.py --part bm25 --passages 1000000

BM25: passages of 40-120 words drawn from a Zipf-distributed 50k-word vocabulary; queries are 6 words
sampled from one passage, whose id is the gold id (reported: top-1 accuracy, as a sanity check).
Generation: readapt.generation.generate on chat prompts of the tests' word-level tokenizer, with a random
Llama of the demo world's size (4 layers, hidden 128) and of the tests' size (2 layers, hidden 16).
Score: a predictions file of one question whose response and reference are random words (1000-word
vocabulary), the reference taking `share` of the file; each run is a fresh process (peak RSS from
wait4), readapt's Rouge-L against rouge-score's own scorer (the implementation readapt used before its linear-memory Rouge-L), the
latter under an address-space cap so that its quadratic table fails instead of swapping.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def bench_bm25(n_passages: int, n_queries: int, seed: int = 0) -> None:
    from readapt.retrieval import bm25_search
    import bm25s

    rng = np.random.default_rng(seed)
    vocab = np.array([f"tok{i}" for i in range(50_000)])
    ranks = np.minimum(rng.zipf(1.2, size=n_passages * 120), len(vocab)) - 1
    lengths = rng.integers(40, 121, size=n_passages)
    t = time.perf_counter()
    texts, pos = [], 0
    for n in lengths:
        texts.append(" ".join(vocab[ranks[pos:pos + n]]))
        pos += n
    gold = rng.integers(0, n_passages, size=n_queries)
    queries = [" ".join(rng.choice(texts[g].split(), size=6)) for g in gold]
    print(f"bm25: built {n_passages} passages ({lengths.mean():.0f} words on average) "
          f"in {time.perf_counter() - t:.1f} s")

    # indexing and querying separately (bm25_search does both in one call)
    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    t1 = time.perf_counter()
    docs, _ = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=1, show_progress=False)
    t2 = time.perf_counter()
    acc = 100 * float(np.mean(docs[:, 0] == gold))
    print(f"bm25: index {n_passages} passages {t1 - t0:.2f} s; {n_queries} queries {t2 - t1:.2f} s "
          f"({1e3 * (t2 - t1) / n_queries:.2f} ms/query); top-1 accuracy {acc:.1f}%")
    t3 = time.perf_counter()
    hits = bm25_search(texts, queries, k=1)
    print(f"bm25: readapt.retrieval.bm25_search (index + {n_queries} queries) {time.perf_counter() - t3:.2f} s; "
          f"same hits: {[h[0] for h in hits] == docs[:, 0].tolist()}")


def bench_generate(device: str, hidden: int, layers: int, n_questions: int, max_new_tokens: int,
                   batch_sizes: list[int]) -> None:
    from tiny import VOCAB, tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from readapt.generation import generate
    from readapt.prompts import build_prompts

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(cfg).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)
    qs = [{"question": " ".join(f"w{j}" for j in rng.integers(0, 60, size=rng.integers(5, 20)))}
          for _ in range(n_questions)]
    prompts, _ = build_prompts(tok, qs, [None] * n_questions)
    prompt_tokens = sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts)
    print(f"generate: Llama {layers} layers, hidden {hidden}, {n_params / 1e6:.2f}M params, {device}, "
          f"{torch.get_num_threads()} threads; {n_questions} questions, {prompt_tokens / n_questions:.0f} prompt "
          f"tokens on average, {max_new_tokens} new tokens each")
    generate(model, tok, prompts[:4], max_new_tokens=2, batch_size=4, progress=False)  # warm up
    for bs in batch_sizes:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        responses = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=bs, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        new = sum(len(tok(r, add_special_tokens=False).input_ids) for r in responses)  # answer tokens, eos excluded
        print(f"generate: batch {bs:4d}: {dt:7.2f} s, {n_questions / dt:8.1f} questions/s, "
              f"{new / dt:9.0f} answer tokens/s ({new / n_questions:.1f} per answer)")


_SCORE = {
    "readapt": "from readapt.evaluation import score; s = score({path!r}, quiet=True); print(s['rouge_l_recall'], "
               "s.get('rouge_l_responses_cut', 0))",
    "rouge-score": "import json; from rouge_score import rouge_scorer; sc = rouge_scorer.RougeScorer(['rougeL']); "
                   "rows = [json.loads(l) for l in open({path!r})]; print(100 * sum(max(sc.score(a, r['response'])"
                   "['rougeL'].recall for a in r['answers']) for r in rows) / len(rows))",
}


def _measured(code: str, cap_bytes: int | None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, last output line) of `python -c code` in a fresh process."""
    def limit():
        if cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=limit, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return dt, usage.ru_maxrss / 1024, last if os.waitstatus_to_exitcode(status) == 0 else f"failed: {last[-80:]}"


def bench_score(sizes: list[str], shares: list[float], cap_gb: float, seed: int = 0) -> None:
    from readapt.checkpoint import parse_size

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(1000)])
    base_rss = _measured("import readapt.evaluation, rouge_score.rouge_scorer", None)[1]
    print(f"score: a Python with readapt.evaluation and rouge_score imported: {base_rss:.0f} MB peak RSS")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for share in shares:
                n_words = parse_size(size) // 5  # "w123 " is 5 bytes
                ref_words = max(1, int(n_words * share))
                words = vocab[rng.integers(0, len(vocab), size=n_words)]
                path = Path(tmp) / "predictions.jsonl"
                path.write_text(json.dumps({"id": "q", "response": " ".join(words[ref_words:]),
                                            "answers": [" ".join(words[:ref_words])]}) + "\n")
                kb = path.stat().st_size / 1e3
                for impl, code in _SCORE.items():
                    cap = int(cap_gb * 2**30) if impl == "rouge-score" else None
                    dt, rss, result = _measured(code.format(path=str(path)), cap)
                    print(f"score: {kb:8.0f} KB, reference {ref_words:6d} / response {n_words - ref_words:7d} words, "
                          f"{impl:11s}: {dt:7.2f} s, peak RSS {rss:7.0f} MB -> {result}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "bm25", "generate", "score"), default="all")
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--sizes", default="16x2,128x4", help="HIDDENxLAYERS models to time")
    ap.add_argument("--score-sizes", default="402KB,10MB", help="predictions file sizes for --part score")
    ap.add_argument("--share", default="0.05,0.0005", help="the reference's share of each file (--part score)")
    ap.add_argument("--cap-gb", type=float, default=4.0, help="address-space cap of the rouge-score runs")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.part in ("all", "bm25"):
        bench_bm25(a.passages, a.queries)
    if a.part in ("all", "generate"):
        for size in a.sizes.split(","):
            hidden, layers = map(int, size.split("x"))
            bench_generate(a.device, hidden, layers, a.questions, a.max_new_tokens,
                           [int(b) for b in a.batch_sizes.split(",")])
    if a.part == "score":
        bench_score(a.score_sizes.split(","), [float(x) for x in a.share.split(",")], a.cap_gb)


if __name__ == "__main__":
    main()
