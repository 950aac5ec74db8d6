"""QA evaluation as in the RE-Adapt paper (Appendix B, sections 5.3-5.5): closed-book or with retrieval.

    evaluate("instruct/", "qa.jsonl", "results/")                                 # closed book
    evaluate("base/", "qa.jsonl", "results/", adds=[("knowledge/", 0.5), ("re_adapter/", 0.5)])
    evaluate("instruct/", "qa.jsonl", "results/", retrieval="bm25", passages="passages.jsonl")
    sweep("base/", ["knowledge/", "re_adapter/"], "qa.jsonl", "sweep/", val_fraction=0.5)
    score("predictions.jsonl")                     # answers generated elsewhere (vLLM, an API)

Protocol: the prompt comes from the model's own chat template (system "Answer the following question."
+ user "<question>?"; with context the system turn is "Answer the following question given this
context: <context>."; templates without a system role get the paper's Gemma/Mistral user-only prompts),
greedy decoding, top-1 BM25 passage or the gold ("oracle") passage, Rouge-L recall and contains-EM
(readapt.metrics) max over references, mean x100.

Chat templates with a reasoning switch get it turned off (`enable_thinking=False` when the template reads
that variable, as Qwen3's does: the answer, not a chain of thought, is scored); `chat_template_kwargs`
overrides. Without a chat template the prompt is "<instruction>\nQuestion: <q>?\nAnswer:" and generation
stops at the next "\nQuestion:" or blank line (PLAIN_STOP), which is cut from the answer. A score must not
depend on how the questions were batched: see `load_model` (float32 arithmetic on CPU) and `generate`.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from readapt.errors import ReadaptError
from readapt.metrics import check_metrics, score_predictions

SYSTEM = "Answer the following question."
SYSTEM_RAG = "Answer the following question given this context: {context}"
RETRIEVALS = ("none", "bm25", "oracle")
PLAIN_STOP = ("\nQuestion:", "\n\n")  # a pretrained model goes on with the next item of the list
REASONING_OFF = {"enable_thinking": False}  # template variable -> value that turns reasoning off


# --- data ----------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """JSON lines -> list of dicts; a bad line is a ReadaptError naming the file and line number."""
    from readapt.userfiles import lines

    path = Path(path)
    rows = []
    for lineno, row in lines(path):
        missing = [k for k in required if k not in row]
        if missing:
            raise ReadaptError(f"{path}:{lineno}: missing key(s) {missing}; each line needs {list(required)}")
        if "answers" in required and not (
            isinstance(row["answers"], list) and row["answers"] and all(isinstance(a, str) for a in row["answers"])
        ):
            raise ReadaptError(
                f"{path}:{lineno}: 'answers' must be a non-empty list of strings, got {row['answers']!r}"
            )
        row.setdefault("id", str(lineno))
        row["_line"] = lineno
        rows.append(row)
    if not rows:
        raise ReadaptError(f"{path}: no JSON lines in the file")
    return rows


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """Questions {"id", "question", "answers": [...], "passage_id"?}; the first `limit` only if given."""
    if limit is not None and limit < 1:
        raise ReadaptError(f"--limit must be a positive number of questions, got {limit}")
    rows = read_jsonl(path, ("question", "answers"))
    _check_strings(path, rows, "question")
    return rows[:limit]


def _check_strings(path, rows: list[dict], key: str) -> None:
    bad = next((r for r in rows if not isinstance(r[key], str)), None)
    if bad is not None:
        raise ReadaptError(f"{path}:{bad['_line']}: {key!r} must be a string, got {bad[key]!r}")


# --- retrieval -----------------------------------------------------------------------------------------


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
    _check_strings(passages, corpus, "text")
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


# --- prompts -------------------------------------------------------------------------------------------


def _ends(text: str, mark: str) -> str:
    text = text.strip()
    return text if text.endswith(("?", ".", "!")) else text + mark


def chat_template_kwargs(tokenizer, override: dict | None = None) -> dict:
    """The options passed to the chat template: for each variable of REASONING_OFF that the template source
    reads (Qwen3's `enable_thinking`), the value that turns reasoning off; then `override` on top ({} when the
    tokenizer has no chat template)."""
    import re

    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: apply_chat_template uses "default"
        template = template.get("default", "")
    if override is not None and not isinstance(override, dict):
        raise ReadaptError(f"chat template kwargs must be a JSON object such as {{\"enable_thinking\": true}}, "
                           f"got {override!r}")
    if not template:
        if override:
            warnings.warn(f"the tokenizer has no chat template: --chat-template-kwargs {json.dumps(override)} ignored")
        return {}
    found = {k: v for k, v in REASONING_OFF.items() if re.search(rf"\b{k}\b", template)}
    return {**found, **(override or {})}


def prompt_format(tokenizer, template_kwargs: dict | None = None) -> str:
    """'system' if the chat template renders a system turn, 'user' if it has no system role (raises, as
    Gemma's does, or drops it), 'plain' if the tokenizer has no chat template at all."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return "plain"
    probe = "readapt-probe-2c9f"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "?"}],
            tokenize=False, add_generation_prompt=True, **(template_kwargs or {}),
        )
    except TemplateError:
        return "user"
    return "system" if probe in text else "user"


def messages(question: str, context: str | None, fmt: str) -> list[dict]:
    """The paper's chat turns (Appendix B): Llama-3 style with a system role, Gemma/Mistral style without."""
    q = _ends(question, "?")
    if fmt == "system":
        system = SYSTEM if context is None else _ends(SYSTEM_RAG.format(context=context.strip()), ".")
        return [{"role": "system", "content": system}, {"role": "user", "content": q}]
    if context is None:
        return [{"role": "user", "content": q}]
    return [{"role": "user", "content": f"{SYSTEM_RAG.format(context=context.strip())}\nQuestion: {q}"}]


def build_prompts(tokenizer, questions: list[dict], contexts: list[str | None],
                  template_kwargs: dict | None = None) -> tuple[list[str], str]:
    """(prompt strings, format). 'plain' (no chat template) is "<instruction>\\nQuestion: <q>?\\nAnswer:".
    Chat prompts are apply_chat_template(..., **chat_template_kwargs(tokenizer, template_kwargs))."""
    template_kwargs = chat_template_kwargs(tokenizer, template_kwargs)
    fmt = prompt_format(tokenizer, template_kwargs)
    if fmt == "plain":
        warnings.warn("the tokenizer has no chat template: using a plain 'Question: ...? Answer:' prompt")
        prompts = []
        for q, c in zip(questions, contexts):
            head = SYSTEM if c is None else _ends(SYSTEM_RAG.format(context=c.strip()), ".")
            prompts.append(f"{head}\nQuestion: {_ends(q['question'], '?')}\nAnswer:")
        return prompts, fmt
    prompts = [
        tokenizer.apply_chat_template(messages(q["question"], c, fmt), tokenize=False, add_generation_prompt=True,
                                      **template_kwargs)
        for q, c in zip(questions, contexts)
    ]
    return prompts, fmt


# --- model and generation ------------------------------------------------------------------------------


def load_model(model: str, adds: Sequence[tuple[str, float]] = (), dtype: str | None = None,
               tokenizer: str | None = None, device: str | None = None):
    """(model, tokenizer) on `device`: MODEL + sum(scale_i * adapter_i) built in memory by
    readapt.merging.load_merged (MODEL as is without adds); `tokenizer` overrides MODEL's tokenizer.

    The weights are those of the checkpoint `readapt merge` would write (the checkpoint's dtype, or `dtype`).
    On CPU a bfloat16/float16 checkpoint computes in float32 unless `dtype` says otherwise: the same weights,
    and greedy answers that do not depend on the batch (bf16 rounding does, see `generate`). The price is
    twice the memory and time (SmolLM2, 30 questions, batch 16, one core: 33 s in float32, 11 s in bf16);
    `dtype="bfloat16"` takes it back, with a warning. On a GPU the checkpoint's dtype is kept (speed),
    with the same warning."""
    import torch
    from transformers import AutoTokenizer

    from readapt.merging import load_merged
    from readapt.numerics import parse_device

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no tokenizer in")
        net, tok = load_merged(model, list(adds), dtype=dtype)
    if tokenizer is not None or tok is None:
        source = tokenizer or model
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ReadaptError(
                f"no usable tokenizer in {source!r} ({type(err).__name__}); pass --tokenizer FOLDER_OR_ID "
                "(e.g. the model it was fine-tuned from)"
            ) from None
    device = parse_device(device, "auto")
    if dtype is None and device.type == "cpu" and net.dtype in (torch.bfloat16, torch.float16):
        net = net.float()  # exact upcast of the stored weights; float32 arithmetic
    return net.to(device).eval(), tok


def _stop_criteria(tokenizer, stop: Sequence[str]):
    """transformers' StopStringCriteria for `stop` (None without stop strings, or when it cannot read the
    tokenizer's vocabulary, as for word-level ones: the answers are cut all the same, only later)."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    if not stop:
        return None
    try:
        return StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop))])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _cut(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    return text[:min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))]


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16,
             add_special_tokens: bool = False, progress: bool = True, stop: Sequence[str] = ()) -> list[str]:
    """Greedy responses to `prompts`, batched with left padding (prompts sorted by length to pad little).

    Chat prompts already hold their special tokens (add_special_tokens=False); plain prompts get BOS.
    Generation ends at EOS or, with `stop`, once a row's text ends in a stop string (transformers'
    StopStringCriteria: no tokens are spent after it; for a vocabulary it cannot read, generation runs to
    max_new_tokens), and the response is cut before the first stop string either way.
    Batching is exact up to rounding: transformers builds position ids from the attention mask and masks the
    pad keys (SmolLM2, float32: a left-padded prompt's logits are within 4e-5 of its unpadded ones). But the
    kernels, and so the rounding, depend on the batch: SDPA takes its causal path without padding and its
    masked path with it, and a decoding step is a matrix-vector product alone and a matrix product in a
    batch. In bfloat16 that rounding (0.66 logits, padded vs alone) flips near-tied greedy choices: SmolLM2
    gave 16 of 30 answers different at batch 16 than at batch 1, and 3 of 6 even in batches of identical,
    unpadded prompts. In float32 (load_model's default on CPU) none changed; a half-precision model with
    more than one prompt per batch gets a warning.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1:
        raise ReadaptError(f"--max-new-tokens and --batch-size must be positive, got {max_new_tokens}, {batch_size}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ReadaptError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    # pure greedy: the model's generation_config only fills what is left unset here, so its sampling
    # settings and penalties (temperature, top_p, repetition_penalty, ...) are neutralised explicitly
    gen = GenerationConfig(
        do_sample=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
    )
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens).input_ids]
    gen.max_new_tokens = context_cap(model, max(lengths, default=0), max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: out-of-memory shows at once
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if model.dtype in (torch.bfloat16, torch.float16) and len(batches[0]) > 1:
        warnings.warn(f"generating in {str(model.dtype).removeprefix('torch.')} in batches of {batch_size}: its "
                      f"rounding depends on the batch (shape, padding), so greedy answers may change with "
                      f"--batch-size; --dtype float32 or --batch-size 1 gives batch-invariant scores", stacklevel=2)
    responses: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    criteria = _stop_criteria(tokenizer, stop)
    for idx in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=gen, stopping_criteria=criteria)  # [b, prompt_len + new]
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:]):
            responses[i] = _cut(tokenizer.decode(row, skip_special_tokens=True), stop).strip()
    return responses


def context_cap(model, longest_prompt: int, max_new_tokens: int) -> int:
    """max_new_tokens, clamped with a one-line warning to what the model's context leaves after the longest
    prompt: min(max_new_tokens, config.max_position_embeddings − longest_prompt). A prompt that already
    fills the context is an error; a model whose config gives no context length is not capped."""
    n_ctx = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(n_ctx, int) or longest_prompt + max_new_tokens <= n_ctx:
        return max_new_tokens
    room = n_ctx - longest_prompt
    if room < 1:
        raise ReadaptError(f"the longest prompt has {longest_prompt} tokens and fills the model's context "
                           f"(max_position_embeddings={n_ctx}): shorten the questions or passages (--top-k)")
    warnings.warn(f"--max-new-tokens {max_new_tokens} exceeds what the model's context leaves after the longest "
                  f"prompt ({n_ctx} - {longest_prompt} tokens): generating at most {room} tokens per answer")
    return room


# --- output --------------------------------------------------------------------------------------------


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """A plain aligned text table; floats with 2 decimals."""
    cells = [[f"{r.get(c):.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _inputs(*paths) -> list[Path]:
    return [Path(p) for p in paths if p is not None and Path(p).exists()]


def _settings(net, batch_size: int, template_kwargs: dict, stop: Sequence[str]) -> dict:
    """How the answers were generated (summary.json): what a score may depend on besides the model."""
    return {"dtype": str(net.dtype).removeprefix("torch."), "device": str(net.device), "batch_size": batch_size,
            "padding_side": "left", "chat_template_kwargs": template_kwargs, "stop_strings": list(stop)}


def _prediction_rows(questions, prompts, responses, retrieved, per_q) -> list[dict]:
    rows = []
    for q, p, r, ret, s in zip(questions, prompts, responses, retrieved, per_q):
        row = {"id": q["id"], "question": q["question"], "prompt": p, "response": r, "answers": q["answers"], **s}
        if ret is not None:
            row["retrieved_passage_id"] = ret[0] if len(ret) == 1 else ret
        if q.get("passage_id") is not None:
            row["passage_id"] = q["passage_id"]
        rows.append(row)
    return rows


# --- evaluate / sweep / score --------------------------------------------------------------------------


def evaluate(model: str, questions: str | Path, output: str | Path, *,
             adds: Sequence[tuple[str, float] | str] = (), retrieval: str = "none", passages: str | Path | None = None,
             top_k: int = 1, max_new_tokens: int = 64, batch_size: int = 16, limit: int | None = None,
             dtype: str | None = None, device: str | None = None, tokenizer: str | None = None,
             metrics: Sequence[str] | None = None, template_kwargs: dict | None = None, overwrite: bool = False,
             quiet: bool = False) -> dict:
    """Answer `questions` with MODEL (+ sum scale_i * adapter_i, merged in memory) and score the answers.

    adds: [(adapter, scale), ...] (a bare adapter path means scale 1), as for readapt.merging.merge.
    template_kwargs: options for the chat template over chat_template_kwargs' defaults (reasoning off),
    e.g. {"enable_thinking": True}.

    Writes OUTPUT/predictions.jsonl (id, prompt, response, answers, per-question scores x100, retrieved
    passage id) and OUTPUT/summary.json ({metric: 100 * mean_q max_ref metric, "n", retrieval accuracy,
    settings: dtype, device, batch size, padding side, template options, stop strings...}); returns the
    summary and prints it as a table unless `quiet`.
    """
    from readapt.checkpoint import output_folder

    names = check_metrics(metrics)
    adds = [(str(a), 1.0) if isinstance(a, (str, Path)) else (str(a[0]), float(a[1])) for a in adds]
    qs = load_questions(questions, limit)
    contexts, retrieved, stats = retrieve(qs, retrieval, passages, top_k)
    with output_folder(output, overwrite, inputs=_inputs(model, questions, passages, *(a for a, _ in adds))) as tmp:
        t0 = time.perf_counter()
        net, tok = load_model(model, adds, dtype, tokenizer, device)
        template_kwargs = chat_template_kwargs(tok, template_kwargs)
        prompts, fmt = build_prompts(tok, qs, contexts, template_kwargs)
        stop = PLAIN_STOP if fmt == "plain" else ()
        t1 = time.perf_counter()
        responses = generate(net, tok, prompts, max_new_tokens, batch_size, fmt == "plain", progress=not quiet,
                             stop=stop)
        t2 = time.perf_counter()
        rows = ({"response": r, "answers": q["answers"]} for q, r in zip(qs, responses))
        summary, per_q = score_predictions(rows, names)
        summary.update(stats)
        summary.update(
            model=str(model), adds=[list(a) for a in adds], questions=str(questions), retrieval=retrieval,
            passages=None if passages is None else str(passages), top_k=top_k if retrieval == "bm25" else None,
            prompt_format=fmt, max_new_tokens=max_new_tokens, **_settings(net, batch_size, template_kwargs, stop),
            load_seconds=round(t1 - t0, 3),
            generate_seconds=round(t2 - t1, 3), questions_per_second=round(len(qs) / max(t2 - t1, 1e-9), 3),
        )
        _write_jsonl(tmp / "predictions.jsonl", _prediction_rows(qs, prompts, responses, retrieved, per_q))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(format_table([summary], [*names, *(k for k in stats if k != "retrieval_n"), "n"]))
        print(f"predictions and summary.json in {output}")
    return summary


def parse_grid(text: str) -> list[float]:
    """'0,0.25,0.5' -> [0.0, 0.25, 0.5]."""
    try:
        grid = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ReadaptError(f"--grid {text!r}: expected comma-separated numbers such as 0,0.25,0.5,0.75,1") from None
    if not grid or len(set(grid)) != len(grid):
        raise ReadaptError(f"--grid {text!r}: needs at least one value and no repeats")
    return grid


def split_validation(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(validation indices, test indices): a seeded shuffle, round(val_fraction * n) of them to validation."""
    if not 0 <= val_fraction < 1:
        raise ReadaptError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return [], list(range(n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = round(val_fraction * n)
    if k < 1 or k >= n:
        raise ReadaptError(f"--val-fraction {val_fraction} of {n} questions leaves an empty split; use more questions")
    return sorted(order[:k]), sorted(order[k:])


def _heatmaps(folder: Path, cells: list[dict], grid: list[float], n_adapters: int, names: list[str],
              splits: list[str], labels: list[str], best: list[float]) -> None:
    """One PNG per metric: a scale_1 x scale_2 heatmap (1 x len(grid) for one adapter) per split, the
    chosen cell framed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = grid if n_adapters == 2 else [None]
    for m in names:
        fig, axes = plt.subplots(1, len(splits), figsize=(1.2 + 1.1 * len(grid) * len(splits), 1.5 + 0.8 * len(rows)),
                                 squeeze=False)
        for ax, split in zip(axes[0], splits):
            z = np.array([[c[f"{split}_{m}"] for c in cells if n_adapters == 1 or c["scales"][0] == a] for a in rows])
            im = ax.imshow(z, cmap="viridis", origin="lower", aspect="auto", vmin=0, vmax=100)
            for (i, j), v in np.ndenumerate(z):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w" if v < 50 else "k")
            i, j = (grid.index(best[0]) if n_adapters == 2 else 0), grid.index(best[-1])
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            ax.set_xticks(range(len(grid)), [f"{g:g}" for g in grid])
            ax.set_xlabel(f"{labels[-1]} (scale of {Path(cells[0]['adapters'][-1]).name})")
            if n_adapters == 2:
                ax.set_yticks(range(len(grid)), [f"{g:g}" for g in grid])
                ax.set_ylabel(f"{labels[0]} (scale of {Path(cells[0]['adapters'][0]).name})")
            else:
                ax.set_yticks([])
            ax.set_title(f"{m} x100, {split}")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(folder / f"heatmap_{m}.png", dpi=100)
        plt.close(fig)


def sweep(base: str, adds: Sequence[str], questions: str | Path, output: str | Path, *,
          grid: Sequence[float] | str = (0.0, 0.25, 0.5, 0.75, 1.0), val_fraction: float = 0.0, seed: int = 0,
          select: str = "contains_em", retrieval: str = "none", passages: str | Path | None = None, top_k: int = 1,
          max_new_tokens: int = 64, batch_size: int = 16, limit: int | None = None, dtype: str | None = None,
          device: str | None = None, tokenizer: str | None = None, metrics: Sequence[str] | None = None,
          template_kwargs: dict | None = None, overwrite: bool = False, quiet: bool = False) -> dict:
    """Partial adaptation grid (RE-Adapt section 3, Figure 6): Omega = base + alpha * adds[0] (+ beta * adds[1])
    for every (alpha, beta) in grid x grid ("0,0.5,1" or a list), merged in memory, evaluated like `evaluate`.

    With val_fraction > 0 a seeded share of the questions is held out for choosing: the best cell maximises
    `select` on the validation split and is reported on the other (test) questions. Writes OUTPUT/cells.csv
    (every cell, every split), OUTPUT/heatmap_<metric>.png, OUTPUT/predictions/<cell>.jsonl and
    OUTPUT/summary.json (the chosen scales; rouge_l_recall, contains_em and n on the test split; the
    generation settings as in `evaluate`).
    The model is built once; each cell rewrites its parameters with readapt.merging.copy_merged (base and
    adapters re-read, only the tensors the adapters touch, one at a time: exact, and the memory of one model).
    """
    from readapt.checkpoint import Checkpoint, output_folder
    from readapt.addends import open_addend
    from readapt.merging import copy_merged
    from readapt.numerics import parse_dtype

    names = check_metrics(metrics)
    check_metrics([select])
    if not 1 <= len(adds) <= 2:
        raise ReadaptError(f"sweep takes one or two --add adapters (alpha, beta), got {len(adds)}")
    for a in adds:
        head, sep, _ = str(a).rpartition(":")
        if sep and not Path(a).exists() and Path(head).exists():
            raise ReadaptError(f"sweep --add {a}: give the adapter without a scale ({head}); --grid supplies the scales")
    grid = parse_grid(grid) if isinstance(grid, str) else parse_grid(",".join(map(str, grid)))
    qs = load_questions(questions, limit)
    val, test = split_validation(len(qs), val_fraction, seed)
    if not val:
        warnings.warn("--val-fraction is 0: the scales are chosen and reported on the same questions; hold out a "
                      "validation split (e.g. --val-fraction 0.3) for an unbiased score", stacklevel=2)
    splits = {"val": val, "test": test} if val else {"all": test}
    contexts, retrieved, stats = retrieve(qs, retrieval, passages, top_k)
    labels = ["alpha", "beta"][: len(adds)]
    cells: list[dict] = []
    with output_folder(output, overwrite, inputs=_inputs(base, questions, passages, *adds)) as tmp:
        (tmp / "predictions").mkdir()
        ckpt = Checkpoint.open(base)
        addends = [open_addend(a, ckpt) for a in adds]  # checked before the (slow) model load
        net, tok = load_model(base, (), dtype, tokenizer, device)
        template_kwargs = chat_template_kwargs(tok, template_kwargs)
        prompts, fmt = build_prompts(tok, qs, contexts, template_kwargs)
        stop = PLAIN_STOP if fmt == "plain" else ()
        for scales in itertools.product(grid, repeat=len(adds)):
            t0 = time.perf_counter()
            # Omega = Phi + alpha * Psi + beta * Delta, every tensor recomputed from the files (exact, no drift
            # from cell to cell) and copied into the one model: memory of one model, nothing rebuilt
            copy_merged(net, ckpt, list(zip(addends, scales)), parse_dtype(dtype))
            t1 = time.perf_counter()
            responses = generate(net, tok, prompts, max_new_tokens, batch_size, fmt == "plain", progress=not quiet,
                                 stop=stop)
            t2 = time.perf_counter()
            rows = [{"response": r, "answers": q["answers"]} for q, r in zip(qs, responses)]
            _, per_q = score_predictions(rows, names)
            cell = {"adapters": [str(a) for a in adds], "scales": list(scales), **dict(zip(labels, scales))}
            for split, idx in splits.items():
                for m in names:
                    cell[f"{split}_{m}"] = sum(per_q[i][m] for i in idx) / len(idx)
            cell.update(merge_seconds=round(t1 - t0, 3), generate_seconds=round(t2 - t1, 3))
            cells.append(cell)
            tag = "_".join(f"{k}={s:g}" for k, s in zip(labels, scales))
            rows = _prediction_rows(qs, prompts, responses, retrieved, per_q)
            _write_jsonl(tmp / "predictions" / f"{tag}.jsonl", rows)
            if not quiet:
                print(tag, " ".join(f"{k}={cell[k]:.2f}" for k in cell if k.endswith(tuple(names))), file=sys.stderr)
        choose = "val" if val else "all"
        best = max(cells, key=lambda c: c[f"{choose}_{select}"])  # first cell wins ties
        report = "test" if val else "all"
        summary = {m: best[f"{report}_{m}"] for m in names}
        summary.update(
            n=len(splits[report]), n_val=len(val), select=select, chosen_on=choose, reported_on=report,
            best={k: best[k] for k in ("scales", *labels)}, adapters=[str(a) for a in adds], base=str(base),
            grid=grid, val_fraction=val_fraction, seed=seed, retrieval=retrieval, prompt_format=fmt, **stats,
            max_new_tokens=max_new_tokens, **_settings(net, batch_size, template_kwargs, stop), cells=cells,
        )
        if not val:
            summary["note"] = "no --val-fraction: scales chosen and reported on the same questions (optimistic)"
        columns = [*labels, *(f"{s}_{m}" for s in splits for m in names)]
        with (tmp / "cells.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*columns, "merge_seconds", "generate_seconds"], extrasaction="ignore")
            w.writeheader()
            w.writerows(cells)
        _heatmaps(tmp, cells, grid, len(adds), names, list(splits), labels, best["scales"])
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(format_table(cells, columns))
        print(f"best by {choose}_{select}: " + ", ".join(f"{k}={best[k]:g}" for k in labels)
              + f"; on {report} ({summary['n']} questions): " + ", ".join(f"{m}={summary[m]:.2f}" for m in names))
    return summary


def score(predictions: str | Path, output: str | Path | None = None, metrics: Sequence[str] | None = None,
          overwrite: bool = False, quiet: bool = False) -> dict:
    """Score JSON lines {"id", "response", "answers": [...]} generated anywhere; same metrics as `evaluate`.

    Returns {metric: 100 * mean_q max_ref metric, "n"}; with `output`, also writes OUTPUT/summary.json.
    """
    names = check_metrics(metrics)
    rows = read_jsonl(predictions, ("response", "answers"))
    _check_strings(predictions, rows, "response")
    summary, _ = score_predictions(rows, names)
    summary["predictions"] = str(predictions)
    if output is not None:
        from readapt.checkpoint import output_folder

        with output_folder(output, overwrite, inputs=_inputs(predictions)) as tmp:
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(format_table([summary], [*names, "n"]))
    return summary
