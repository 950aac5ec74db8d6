"""Evaluation speed: BM25 over 100k synthetic passages, and batched greedy QA generation with tiny models.

    python benchmarks/bench_eval.py                      # both parts, CPU
    python benchmarks/bench_eval.py --part generate --device cuda --sizes 1024x8 --batch-sizes 1,64,256
    python benchmarks/bench_eval.py --part bm25 --passages 1000000

BM25: passages of 40-120 words drawn from a Zipf-distributed 50k-word vocabulary; queries are 6 words
sampled from one passage, whose id is the gold id (reported: top-1 accuracy, as a sanity check).
Generation: readapt.evaluate.generate on chat prompts of the tests' word-level tokenizer, with a random
Llama of the demo world's size (4 layers, hidden 128) and of the tests' size (2 layers, hidden 16).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def bench_bm25(n_passages: int, n_queries: int, seed: int = 0) -> None:
    from readapt.evaluate import bm25_search
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
    print(f"bm25: readapt.evaluate.bm25_search (index + {n_queries} queries) {time.perf_counter() - t3:.2f} s; "
          f"same hits: {[h[0] for h in hits] == docs[:, 0].tolist()}")


def bench_generate(device: str, hidden: int, layers: int, n_questions: int, max_new_tokens: int,
                   batch_sizes: list[int]) -> None:
    from tiny import VOCAB, tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from readapt.evaluate import build_prompts, generate

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "bm25", "generate"), default="all")
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--sizes", default="16x2,128x4", help="HIDDENxLAYERS models to time")
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


if __name__ == "__main__":
    main()
