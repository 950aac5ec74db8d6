"""The world's data files and every experiment of one seed, through readapt's public functions."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import readapt
from readapt.demoworld.internals import read_jsonl, split_validation
from readapt.demoworld.jobs import Jobs
from readapt.demoworld.settings import GEN, GRID, METRICS, Settings
from readapt.demoworld.world import ATTRIBUTES, World, build_tokenizer, write_jsonl

def write_data(world: World, s: Settings, folder: Path, seed: int) -> dict[str, Path]:
    """The world's files as a user would have them:

    knowledge.jsonl  unlabeled paraphrased bios of B ({"text"}) for knowledge adapters
    task.jsonl       chat-formatted QA (A_train closed book + strangers with context) as text, and A's bios (rehearsal),
                     for the PortLLM task patch
    qa.jsonl         closed-book questions on B (ids "B/...", in-domain) and A_test ("A/...", out-of-domain)
    qa_B.jsonl       B's questions alone, with passage ids (RAG); passages_B.jsonl: one bio per person of B
    qa_port.jsonl    A_test questions (the task) and C questions ("C/...", what only version 2 read)
    """
    tok = build_tokenizer()
    rng = random.Random(f"{world.seed}/files/{seed}")
    half = len(world["A"]) // 2
    a_train, a_test = world["A"][:half], world["A"][half:]

    def tagged(pop, people=None):
        return [{**q, "id": f"{pop}/{q['id']}"} for q in world.questions(pop, people)]

    task = []
    for _ in range(s.task_examples):
        if rng.random() < s.reading_share:
            p = world.stranger(rng)
            msgs = world.chat(p, rng.choice(ATTRIBUTES), rng, context=world.bio(p, rng))
        else:
            msgs = world.chat(rng.choice(a_train), rng.choice(ATTRIBUTES), rng)
        task.append({"text": tok.apply_chat_template(msgs, tokenize=False).strip()})
    # rehearsal, as for the instruct model: A's bios beside the chat examples keep the patch from
    # learning the A_train answers by rote
    task += [{"text": t} for t in world.corpus("A", max(1, round(s.task_examples * s.rehearsal_share / len(world["A"]))), seed)]
    rng.shuffle(task)
    files = {
        "knowledge": write_jsonl(folder / "knowledge.jsonl", [{"text": t} for t in world.corpus("B", s.lora_copies, seed)]),
        "task": write_jsonl(folder / "task.jsonl", task),
        "qa": write_jsonl(folder / "qa.jsonl", tagged("B") + tagged("A", a_test)),
        "qa_B": write_jsonl(folder / "qa_B.jsonl", tagged("B")),
        "passages_B": write_jsonl(folder / "passages_B.jsonl", world.passages("B")),
        "qa_port": write_jsonl(folder / "qa_port.jsonl", tagged("A", a_test) + tagged("C")),
    }
    return files





def _by_domain(predictions: list[dict], keep: set[str] | None = None) -> dict[str, dict[str, float]]:
    """{"B": {metric: mean x100}, "A": ..., "C": ...} over the questions whose id is in `keep` (all if None);
    the domain is the id's prefix (the population)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in predictions:
        if keep is None or r["id"] in keep:
            d = out.setdefault(r["id"].split("/", 1)[0], {m: [] for m in METRICS})
            for m in METRICS:
                d[m].append(r[m])
    return {dom: {m: sum(v) / len(v) for m, v in d.items()} for dom, d in out.items()}


def _evaluate(work: Path, tag: str, model: Path, questions: Path, adds=(), keep=None, **kw) -> dict:
    """readapt.evaluate.evaluate, then per-domain scores from its predictions.jsonl."""
    out = work / "eval" / tag
    summary = readapt.evaluate(str(model), questions, out, adds=[(str(a), x) for a, x in adds], overwrite=True, **GEN, **kw)
    scores = _by_domain(read_jsonl(out / "predictions.jsonl"), keep)
    if "retrieval_accuracy" in summary:
        scores["retrieval_accuracy"] = summary["retrieval_accuracy"]
    return scores


# `readapt ARGS` in a child that reports its own peak RSS (VmHWM belongs to the process's own memory
# map, unlike ru_maxrss, which on Linux keeps the parent's size from before exec)
_CHILD = """import os, sys
from readapt.cli import main
rc = main(sys.argv[1:])
hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]
open(os.environ['READAPT_DEMO_HWM'], 'w').write(hwm)
sys.exit(rc)
"""


def _peak_rss(args: list[str], log: Path) -> tuple[float, float]:
    """Run `readapt ARGS` in a child process -> (its peak RSS in MB, wall seconds)."""
    import os
    import subprocess
    import sys

    hwm = log.with_suffix(".peak_kb")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-c", _CHILD, *args], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "READAPT_DEMO_HWM": str(hwm)}).returncode
    if rc != 0:
        raise RuntimeError(f"readapt {' '.join(args)} failed ({rc}); see {log}")
    peak = int(hwm.read_text()) / 1024
    hwm.unlink()
    return peak, time.perf_counter() - t0


def _train(*args, **kwargs) -> Path:
    """readapt.train.train, without its 'BASE looks like an instruct model' warning: the demo's pretrained
    tokenizer carries the chat template on purpose (every model is prompted the same way), and training
    on the instruct model is the baseline the table needs."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="BASE .* looks like an instruct")
        return readapt.train(*args, **kwargs)


def train_adapters(s: Settings, models: dict[str, Path], files: dict[str, Path], folder: Path, seed: int,
                   jobs: Jobs) -> dict[str, Path]:
    """The LoRA adapters, trained with readapt.train.train exactly as `readapt train` would:

    knowledge               Ψ on Φ, B's bios (RE-Adapt's knowledge adapter)
    knowledge_on_instruct   the same on Θ (the baseline RE-Adapt argues against: tuning the instruct model)
    task_v1 / task_v2       the PortLLM task patch (chat QA) on Φ, and re-trained on Φ₂
    """
    plan = {
        "knowledge": ("pretrained", "knowledge"), "knowledge_on_instruct": ("instruct", "knowledge"),
        "task_v1": ("pretrained", "task"), "task_v2": ("pretrained_v2", "task"),
    }
    running = [
        jobs.submit(_train, models[base], files[data], folder / name, rank=s.lora_rank, alpha=s.lora_alpha,
                    dora=False, lr=s.lora_lr, epochs=1, batch_size=s.lora_batch, max_length=s.lora_block,
                    warmup_steps=10, seed=seed, save_every=None, overwrite=True, quiet=True)
        for name, (base, data) in plan.items()
    ]
    for r in running:
        r.result()
    return {name: folder / name for name in plan}


def _cell(sweep_dir: Path, labels: tuple[str, ...], scales, keep: set[str]) -> dict:
    """Per-domain scores of one sweep cell (from its predictions file) on the questions in `keep`."""
    tag = "_".join(f"{k}={x:g}" for k, x in zip(labels, scales))
    return _by_domain(read_jsonl(sweep_dir / "predictions" / f"{tag}.jsonl"), keep)


class _Laps:
    """Wall seconds of each named phase."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.t, 2)
        self.t = time.perf_counter()


def run_experiments(s: Settings, seed: int, models: dict[str, Path], adapters: dict[str, Path],
                    files: dict[str, Path], work: Path, jobs: Jobs) -> dict:
    """Every experiment of one seed through the public functions; returns raw per-domain scores (x100)."""
    res: dict = {"seed": seed}
    lap = _Laps()
    delta, lore = extract_adapters(models, work, res)
    lap("extract + LoRE + spectrum")
    split = question_split(files["qa"], seed)
    inst = instruct_rows(models, adapters, files, work, jobs, split)
    res["grids"] = partial_adaptation(models, adapters, (delta, lore), files, work, jobs, seed, split)
    lap("sweeps")
    res["re_adapt"] = table2_rows(res["grids"], inst)
    lap("instruct rows")
    # instruction strength (paper Figure 6): Φ + βΔ is the α=0 row of the RE-Adapt grid
    res["strength"] = {f"{b:g}": res["grids"]["re_adapt"]["cells"][f"0,{b:g}"] for b in GRID}
    memory = port_memory(s, models, adapters, files, work)
    rag = rag_runs(models, adapters, (delta, lore), files, work, jobs, res["grids"], split)
    ports = port_runs(models, adapters, files, work, jobs)
    res["rag"], res["bm25_retrieval_accuracy"] = rag_rows(rag, res["re_adapt"], res)
    res["port"] = {name: future.result() for name, future in ports.items()}
    res["port_memory"] = memory
    report = json.loads((work / "ported" / "port_report.json").read_text())
    res["port_report"] = {k: report[k] for k in ("counts", "warnings") if k in report}
    lap("PortLLM")
    res["timings"] = lap.timings
    return res


def extract_adapters(models: dict[str, Path], work: Path, res: dict) -> tuple[Path, Path]:
    """RE-Adapter Δ = Θ − Φ and its LoRE-Adapter (τ = 0.5), plus the spectrum report -> (Δ, LoRE) folders."""
    phi, theta = models["pretrained"], models["instruct"]
    delta = readapt.extract(phi, theta, work / "re_adapter", overwrite=True)
    lore = work / "lore_adapter"
    res["lore"] = _lore_summary(readapt.extract_lowrank(phi, theta, lore, tau=0.5, overwrite=True))
    readapt.spectrum(phi, theta, work / "spectrum", tau=0.5, overwrite=True)
    return delta, lore


def question_split(qa: Path, seed: int) -> tuple[set[str], set[str]]:
    """Validation / test ids of the closed-book questions (B in-domain, A_test out-of-domain), as sweep splits."""
    qs = read_jsonl(qa)
    val, test = split_validation(len(qs), 0.5, seed)
    return {qs[i]["id"] for i in val}, {qs[i]["id"] for i in test}


def instruct_rows(models, adapters, files, work: Path, jobs: Jobs, split) -> dict:
    """The instruct model alone and with a knowledge adapter trained on it (futures), test split."""
    theta, test_ids = models["instruct"], split[1]
    return {"instruct": jobs.submit(_evaluate, work, "instruct", theta, files["qa"], keep=test_ids),
            "instruct + knowledge adapter": jobs.submit(_evaluate, work, "instruct_knowledge", theta, files["qa"],
                                                        [(adapters["knowledge_on_instruct"], 1.0)], keep=test_ids)}


def partial_adaptation(models, adapters, extracted, files, work: Path, jobs: Jobs, seed: int, split) -> dict:
    """Ω = Φ + αΨ + β·adapter on the grid for Δ and LoRE, scales chosen on validation by readapt.sweep."""
    running = {}
    for name, adapter in zip(("re_adapt", "lore_adapt"), extracted):
        running[name] = jobs.submit(readapt.sweep, str(models["pretrained"]), [str(adapters["knowledge"]), str(adapter)],
                                    files["qa"], work / f"sweep_{name}", grid=list(GRID), val_fraction=0.5, seed=seed,
                                    select="contains_em", overwrite=True, **GEN)
    grids = {}
    for name, future in running.items():
        summary, folder = future.result(), work / f"sweep_{name}"
        cells = {}
        for a in GRID:
            for b in GRID:
                cells[f"{a:g},{b:g}"] = {"test": _cell(folder, ("alpha", "beta"), (a, b), split[1]),
                                         "val": _cell(folder, ("alpha", "beta"), (a, b), split[0])}
        grids[name] = {"chosen": summary["best"]["scales"], "cells": cells}
    return grids


def table2_rows(grids: dict, inst: dict) -> dict:
    """The rows of the paper's Table 2 shape, test split."""
    def cell(method, scales):
        return grids[method]["cells"][scales]["test"]

    def chosen(method):
        return cell(method, "{:g},{:g}".format(*grids[method]["chosen"]))

    return {
        "pretrained": cell("re_adapt", "0,0"),
        "pretrained + knowledge adapter": cell("re_adapt", "1,0"),
        "instruct": inst["instruct"].result(),
        "instruct + knowledge adapter": inst["instruct + knowledge adapter"].result(),
        "LoRE-Adapt (α=β=1)": cell("lore_adapt", "1,1"),
        "LoRE-Adapt (α=β=0.5)": cell("lore_adapt", "0.5,0.5"),
        "LoRE-Adapt (α, β chosen on validation)": chosen("lore_adapt"),
        "RE-Adapt (α=β=1)": cell("re_adapt", "1,1"),
        "RE-Adapt (α=β=0.5)": cell("re_adapt", "0.5,0.5"),
        "RE-Adapt (α, β chosen on validation)": chosen("re_adapt"),
    }


def port_memory(s: Settings, models, adapters, files, work: Path) -> dict:
    """PortLLM's memory claim: peak RSS of `readapt port --merge` and of 3 LoRA training steps, each in a
    child process (measured before the evaluations that follow load the cores)."""
    import shutil

    phi, phi2 = models["pretrained"], models["pretrained_v2"]
    port_mem, port_s = _peak_rss(
        ["port", str(adapters["task_v1"]), "--to", str(phi2), "--from", str(phi), "-o", str(work / "ported"),
         "--merge", "--overwrite"], work / "port.log")
    retrain_mem, retrain_s = _peak_rss(
        ["train", str(phi2), "--data", str(files["task"]), "-o", str(work / "retrain_probe"), "--rank",
         str(s.lora_rank), "--alpha", str(s.lora_alpha), "--no-dora", "--lr", str(s.lora_lr), "--batch-size",
         str(s.lora_batch), "--max-length", str(s.lora_block), "--max-steps", "3", "--save-every", "0",
         "--overwrite", "--quiet"], work / "retrain_probe.log")
    shutil.rmtree(work / "retrain_probe")
    return {
        "port --merge peak RSS (MB)": round(port_mem, 1), "port --merge seconds": round(port_s, 2),
        "re-training (3 LoRA steps) peak RSS (MB)": round(retrain_mem, 1),
        "re-training (3 LoRA steps) seconds": round(retrain_s, 2),
    }


def rag_runs(models, adapters, extracted, files, work: Path, jobs: Jobs, grids: dict, split) -> dict:
    """RAG (paper Table 3): BM25 and oracle retrieval over B's bios, B's test questions (futures)."""
    phi, theta = models["pretrained"], models["instruct"]
    psi, psi_inst = adapters["knowledge"], adapters["knowledge_on_instruct"]
    delta, lore = extracted
    b_test = {i for i in split[1] if i.startswith("B/")}
    ra, la = grids["re_adapt"]["chosen"], grids["lore_adapt"]["chosen"]
    rag_models = {
        "instruct": (theta, []), "instruct + knowledge adapter": (theta, [(psi_inst, 1.0)]),
        "LoRE-Adapt (α, β chosen on validation)": (phi, [(psi, la[0]), (lore, la[1])]),
        "RE-Adapt (α, β chosen on validation)": (phi, [(psi, ra[0]), (delta, ra[1])]),
    }
    running = {}
    for i, (name, (model, adds)) in enumerate(rag_models.items()):
        for retrieval in ("bm25", "oracle"):
            running[name, retrieval] = jobs.submit(_evaluate, work, f"rag_{retrieval}_{i}", model, files["qa_B"], adds,
                                                   keep=b_test, retrieval=retrieval, passages=files["passages_B"])
    return running


def rag_rows(running: dict, rows: dict, res: dict) -> tuple[dict, float | None]:
    """{model: {"closed book", "bm25", "oracle": B scores}} and BM25's retrieval accuracy."""
    rag, accuracy = {}, None
    for (name, retrieval), future in running.items():
        scores = future.result()
        rag.setdefault(name, {"closed book": rows[name]["B"]})[retrieval] = scores["B"]
        if "retrieval_accuracy" in scores:
            accuracy = scores["retrieval_accuracy"]
    return rag, accuracy


def port_runs(models, adapters, files, work: Path, jobs: Jobs) -> dict:
    """PortLLM: the task patch trained on version 1, carried to version 2 with no training (futures)."""
    phi, phi2 = models["pretrained"], models["pretrained_v2"]
    ports = {
        "version 1 + task patch (trained on v1)": ("port_v1", phi, [(adapters["task_v1"], 1.0)]),
        "version 2 alone": ("port_v2", phi2, []),
        "version 2 + ported patch (no training)": ("port_ported", work / "ported", []),
        "version 2 + patch re-trained on v2": ("port_retrained", phi2, [(adapters["task_v2"], 1.0)]),
    }
    return {name: jobs.submit(_evaluate, work, tag, model, files["qa_port"], adds)
            for name, (tag, model, adds) in ports.items()}


def _lore_summary(report: dict) -> dict:
    """Ranks per layer and module at τ=0.5 and the shares of the delta's parameters and energy kept."""
    import re

    ranks: dict[str, dict[str, int]] = {}
    other = {}
    for t in report["tensors"]:
        m = re.search(r"layers\.(\d+)\..*?(\w+)_proj\.weight$", t["name"])
        if m and t["policy"] == "lowrank":
            ranks.setdefault(m.group(1), {})[m.group(2)] = t["rank"]
        elif t["kind"] in ("embedding", "lm_head") and t["policy"] == "lowrank":
            other[t["name"]] = t["rank"]
    return {
        "ranks": ranks, "other_ranks": other, "params_kept_share": 100 * report["params_kept_share"],
        "energy_kept_share": 100 * report["energy_kept_share"], "relative_error": report["relative_error"],
        "params_delta": report["params_delta"], "params_kept": report["params_kept"],
    }

