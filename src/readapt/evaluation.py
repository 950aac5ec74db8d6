"""QA evaluation as in the RE-Adapt paper (Appendix B, sections 5.3-5.5): closed-book or with retrieval.

    evaluate("instruct/", "qa.jsonl", "results/")                                 # closed book
    evaluate("base/", "qa.jsonl", "results/", adds=[("knowledge/", 0.5), ("re_adapter/", 0.5)])
    evaluate("instruct/", "qa.jsonl", "results/", retrieval="bm25", passages="passages.jsonl")
    sweep("base/", ["knowledge/", "re_adapter/"], "qa.jsonl", "sweep/", val_fraction=0.5)
    score("predictions.jsonl")                     # answers generated elsewhere (vLLM, an API)

Protocol: the prompt comes from the model's own chat template (readapt.prompts), greedy decoding
(readapt.generation), the top-1 BM25 passage or the gold ("oracle") passage (readapt.retrieval),
Rouge-L recall and contains-EM (readapt.metrics) max over references, mean x100. A score must not depend
on how the questions were batched: see generation.load_model (float32 arithmetic on CPU) and generate.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from readapt.addends import Addend, open_addend
from readapt.checkpoint import Checkpoint, ReadOptions, output_folder
from readapt.errors import ReadaptError
from readapt.generation import generate, load_model
from readapt.merging import copy_merged
from readapt.metrics import check_metrics, score_predictions
from readapt.numerics import parse_dtype
from readapt.prompts import PLAIN_STOP, build_prompts, chat_template_kwargs
from readapt.retrieval import retrieve
from readapt.userfiles import check_strings, read_jsonl


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """Questions {"id", "question", "answers": [...], "passage_id"?}; the first `limit` only if given."""
    if limit is not None and limit < 1:
        raise ReadaptError(f"--limit must be a positive number of questions, got {limit}")
    rows = read_jsonl(path, ("question", "answers"))
    check_strings(path, rows, "question")
    return rows[:limit]


def evaluate(model: str, questions: str | Path, output: str | Path, *,
             adds: Sequence[tuple[str, float] | str] = (), retrieval: str = "none", passages: str | Path | None = None,
             top_k: int = 1, max_new_tokens: int = 64, batch_size: int = 16, limit: int | None = None,
             dtype: str | None = None, device: str | None = None, tokenizer: str | None = None,
             metrics: Sequence[str] | None = None, template_kwargs: dict | None = None, overwrite: bool = False,
             quiet: bool = False, allow_pickle: bool = False, read: ReadOptions | None = None) -> dict:
    """Answer `questions` with MODEL (+ sum scale_i * adapter_i, merged in memory) and score the answers.

    adds: [(adapter, scale), ...] (a bare adapter path means scale 1), as for readapt.merging.merge.
    template_kwargs: options for the chat template over chat_template_kwargs' defaults (reasoning off),
    e.g. {"enable_thinking": True}.

    Writes OUTPUT/predictions.jsonl (id, prompt, response, answers, per-question scores x100, retrieved
    passage id) and OUTPUT/summary.json ({metric: 100 * mean_q max_ref metric, "n", retrieval accuracy,
    settings: dtype, device, batch size, padding side, template options, stop strings...}); returns the
    summary and prints it as a table unless `quiet`.
    """
    names = check_metrics(metrics)
    adds = [(str(a), 1.0) if isinstance(a, (str, Path)) else (str(a[0]), float(a[1])) for a in adds]
    qs = load_questions(questions, limit)
    contexts, retrieved, stats = retrieve(qs, retrieval, passages, top_k)
    with output_folder(output, overwrite, inputs=_inputs(model, questions, passages, *(a for a, _ in adds))) as tmp:
        t0 = time.perf_counter()
        net, tok = load_model(model, adds, dtype, tokenizer, device, ReadOptions.of(read, allow_pickle))
        prompts, fmt, template_kwargs, stop = _prompts(tok, qs, contexts, template_kwargs)
        t1 = time.perf_counter()
        responses = generate(net, tok, prompts, max_new_tokens, batch_size, fmt == "plain", progress=not quiet,
                             stop=stop)
        t2 = time.perf_counter()
        summary, per_q = score_predictions(_scored(qs, responses), names)
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


def sweep(base: str, adds: Sequence[str], questions: str | Path, output: str | Path, *,
          grid: Sequence[float] | str = (0.0, 0.25, 0.5, 0.75, 1.0), val_fraction: float = 0.0, seed: int = 0,
          select: str = "contains_em", retrieval: str = "none", passages: str | Path | None = None, top_k: int = 1,
          max_new_tokens: int = 64, batch_size: int = 16, limit: int | None = None, dtype: str | None = None,
          device: str | None = None, tokenizer: str | None = None, metrics: Sequence[str] | None = None,
          template_kwargs: dict | None = None, overwrite: bool = False, quiet: bool = False,
          allow_pickle: bool = False, read: ReadOptions | None = None) -> dict:
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
    names = check_metrics(metrics)
    check_metrics([select])
    _check_sweep_adds(adds)
    grid = parse_grid(grid) if isinstance(grid, str) else parse_grid(",".join(map(str, grid)))
    qs = load_questions(questions, limit)
    val, test = split_validation(len(qs), val_fraction, seed)
    if not val:
        warnings.warn("--val-fraction is 0: the scales are chosen and reported on the same questions; hold out a "
                      "validation split (e.g. --val-fraction 0.3) for an unbiased score", stacklevel=2)
    contexts, retrieved, stats = retrieve(qs, retrieval, passages, top_k)
    read = ReadOptions.of(read, allow_pickle)
    with output_folder(output, overwrite, inputs=_inputs(base, questions, passages, *adds)) as tmp:
        (tmp / "predictions").mkdir()
        ckpt = Checkpoint.open(base, read)
        addends = [open_addend(a, ckpt, read=read) for a in adds]  # checked before the (slow) model load
        net, tok = load_model(base, (), dtype, tokenizer, device, read)
        prompts, fmt, template_kwargs, stop = _prompts(tok, qs, contexts, template_kwargs)
        g = _Grid(net, tok, ckpt, addends, [str(a) for a in adds], ["alpha", "beta"][: len(adds)], qs, retrieved,
                  prompts, fmt, stop, {"val": val, "test": test} if val else {"all": test}, names,
                  parse_dtype(dtype), max_new_tokens, batch_size, quiet, tmp)
        cells = [g.cell(scales) for scales in itertools.product(grid, repeat=len(adds))]
        summary = g.summary(cells, select)
        summary.update(base=str(base), grid=grid, val_fraction=val_fraction, seed=seed, retrieval=retrieval,
                       prompt_format=fmt, **stats, max_new_tokens=max_new_tokens,
                       **_settings(net, batch_size, template_kwargs, stop), cells=cells)
        if not val:
            summary["note"] = "no --val-fraction: scales chosen and reported on the same questions (optimistic)"
        g.write(cells, grid, summary)
    if not quiet:
        print(format_table(cells, g.columns))
        print(f"best by {summary['chosen_on']}_{select}: " + ", ".join(f"{k}={summary['best'][k]:g}" for k in g.labels)
              + f"; on {summary['reported_on']} ({summary['n']} questions): "
              + ", ".join(f"{m}={summary[m]:.2f}" for m in names))
    return summary


def _check_sweep_adds(adds: Sequence[str]) -> None:
    if not 1 <= len(adds) <= 2:
        raise ReadaptError(f"sweep takes one or two --add adapters (alpha, beta), got {len(adds)}")
    for a in adds:
        head, sep, _ = str(a).rpartition(":")
        if sep and not Path(a).exists() and Path(head).exists():
            raise ReadaptError(f"sweep --add {a}: give the adapter without a scale ({head}); --grid supplies the scales")


@dataclass
class _Grid:
    """What every cell of a sweep shares: the one model (rewritten per cell), its base and addends, the
    questions, prompts and splits, and the output folder."""

    net: Any
    tok: Any
    ckpt: Checkpoint
    addends: list[Addend]
    adapters: list[str]
    labels: list[str]
    qs: list[dict]
    retrieved: list
    prompts: list[str]
    fmt: str
    stop: Sequence[str]
    splits: dict[str, list[int]]
    names: list[str]
    dtype: Any
    max_new_tokens: int
    batch_size: int
    quiet: bool
    folder: Path

    @property
    def columns(self) -> list[str]:
        return [*self.labels, *(f"{s}_{m}" for s in self.splits for m in self.names)]

    def cell(self, scales: tuple[float, ...]) -> dict:
        """Omega = Phi + alpha * Psi + beta * Delta, every tensor recomputed from the files (exact, no drift from
        cell to cell) and copied into the one model; its answers scored per split and written."""
        t0 = time.perf_counter()
        copy_merged(self.net, self.ckpt, list(zip(self.addends, scales)), self.dtype)
        t1 = time.perf_counter()
        responses = generate(self.net, self.tok, self.prompts, self.max_new_tokens, self.batch_size,
                             self.fmt == "plain", progress=not self.quiet, stop=self.stop)
        t2 = time.perf_counter()
        _, per_q = score_predictions(list(_scored(self.qs, responses)), self.names)
        cell = {"adapters": self.adapters, "scales": list(scales), **dict(zip(self.labels, scales))}
        for split, idx in self.splits.items():
            for m in self.names:
                cell[f"{split}_{m}"] = sum(per_q[i][m] for i in idx) / len(idx)
        cell.update(merge_seconds=round(t1 - t0, 3), generate_seconds=round(t2 - t1, 3))
        tag = "_".join(f"{k}={s:g}" for k, s in zip(self.labels, scales))
        _write_jsonl(self.folder / "predictions" / f"{tag}.jsonl",
                     _prediction_rows(self.qs, self.prompts, responses, self.retrieved, per_q))
        if not self.quiet:
            print(tag, " ".join(f"{k}={cell[k]:.2f}" for k in cell if k.endswith(tuple(self.names))), file=sys.stderr)
        return cell

    def summary(self, cells: list[dict], select: str) -> dict:
        """The best cell by `select` on the validation split (first wins ties), reported on the test split."""
        choose = "val" if "val" in self.splits else "all"
        best = max(cells, key=lambda c: c[f"{choose}_{select}"])
        report = "test" if choose == "val" else "all"
        summary = {m: best[f"{report}_{m}"] for m in self.names}
        summary.update(n=len(self.splits[report]), n_val=len(self.splits.get("val", [])), select=select,
                       chosen_on=choose, reported_on=report, best={k: best[k] for k in ("scales", *self.labels)},
                       adapters=self.adapters)
        return summary

    def write(self, cells: list[dict], grid: list[float], summary: dict) -> None:
        """cells.csv, one heatmap per metric, summary.json."""
        with (self.folder / "cells.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*self.columns, "merge_seconds", "generate_seconds"],
                               extrasaction="ignore")
            w.writeheader()
            w.writerows(cells)
        _heatmaps(self.folder, cells, grid, len(self.addends), self.names, list(self.splits), self.labels,
                  summary["best"]["scales"])
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


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


def score(predictions: str | Path, output: str | Path | None = None, metrics: Sequence[str] | None = None,
          overwrite: bool = False, quiet: bool = False) -> dict:
    """Score JSON lines {"id", "response", "answers": [...]} generated anywhere; same metrics as `evaluate`.

    Returns {metric: 100 * mean_q max_ref metric, "n"}; with `output`, also writes OUTPUT/summary.json.
    """
    names = check_metrics(metrics)
    rows = read_jsonl(predictions, ("response", "answers"))
    check_strings(predictions, rows, "response")
    summary, _ = score_predictions(rows, names)
    summary["predictions"] = str(predictions)
    if output is not None:
        with output_folder(output, overwrite, inputs=_inputs(predictions)) as tmp:
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(format_table([summary], [*names, "n"]))
    return summary


def _prompts(tok, qs: list[dict], contexts: list, template_kwargs: dict | None):
    """(prompts, format, the chat template options used, stop strings) for the questions."""
    template_kwargs = chat_template_kwargs(tok, template_kwargs)
    prompts, fmt = build_prompts(tok, qs, contexts, template_kwargs)
    return prompts, fmt, template_kwargs, PLAIN_STOP if fmt == "plain" else ()


def _scored(qs: list[dict], responses: list[str]):
    return ({"response": r, "answers": q["answers"]} for q, r in zip(qs, responses))


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
