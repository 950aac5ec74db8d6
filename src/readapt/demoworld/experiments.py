"""Every experiment of one seed, as jobs that call readapt's public functions exactly as a user would.

The jobs of a seed write into its run folder (`work`, see KEY in report.py for every folder name) and return
small dicts; `collect` assembles them into the seed's results. Scores are x100 per domain (the id prefix of
a question: "B" in-domain, "A" held-out out-of-domain, "C" read only by version 2) on the test half of the
closed-book questions unless a name says otherwise.
"""

from __future__ import annotations

import random
from pathlib import Path

import readapt.delta as delta
import readapt.evaluation as evaluation
import readapt.lowrank as lowrank
import readapt.merging as merging
import readapt.porting as porting
import readapt.spectra as spectra
import readapt.training as training
from readapt.demoworld.internals import read_jsonl, split_validation
from readapt.demoworld.jobs import tick
from readapt.demoworld.settings import GEN, GRID, METRICS, TAUS, Settings
from readapt.demoworld.world import World, build_tokenizer, write_jsonl

# --- the world's files ------------------------------------------------------------------------------------


def write_data(world: World, s: Settings, folder: Path, seed: int) -> None:
    """The world's files as a user would have them (the KEY in report.py describes each)."""
    from readapt.demoworld.models import chat_example

    tok = build_tokenizer()
    rng = random.Random(f"{world.seed}/files/{seed}")  # the task corpus; the knowledge corpus has its own stream
    a_test = world["A"][len(world["A"]) // 2 :]

    def tagged(pop, people=None):
        return [{**q, "id": f"{pop}/{q['id']}"} for q in world.questions(pop, people)]

    task = [{"text": tok.apply_chat_template(chat_example(world, rng, 0.0), tokenize=False).strip()}
            for _ in range(s.task_examples)]  # the task is closed-book QA: no reading rows
    # rehearsal, as for the instruct model: A's bios beside the chat examples keep the patch from learning
    # the A_train answers by rote
    task += [{"text": t} for t in world.corpus("A", max(1, round(s.task_examples / 2 / len(world["A"]))), seed)]
    rng.shuffle(task)
    knowledge = world.corpus("B", s.lora_copies, seed)
    if s.replay:
        copies = max(1, round(s.lora_copies * s.replay * len(world["B"]) / len(world["A"])))
        knowledge += world.corpus("A", copies, seed + 1)
        random.Random(f"{world.seed}/files/{seed}/knowledge").shuffle(knowledge)
    closed = tagged("B") + tagged("A", a_test)
    _, test = split_validation(len(closed), 0.5, seed)
    write_jsonl(folder / "knowledge.jsonl", [{"text": t} for t in knowledge])
    write_jsonl(folder / "task.jsonl", task)
    write_jsonl(folder / "qa.jsonl", closed)
    write_jsonl(folder / "qa_test.jsonl", [closed[i] for i in test])
    write_jsonl(folder / "qa_B_test.jsonl", [closed[i] for i in test if closed[i]["id"].startswith("B/")])
    write_jsonl(folder / "passages_B.jsonl", world.passages("B"))
    write_jsonl(folder / "qa_port.jsonl", tagged("A", a_test) + tagged("C"))


# --- scores -----------------------------------------------------------------------------------------------


def by_domain(predictions: list[dict], keep: set[str] | None = None) -> dict[str, dict[str, float]]:
    """{"B": {metric: mean x100}, "A": ..., "C": ...} over the questions whose id is in `keep` (all if None);
    the domain is the id's prefix (the population)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in predictions:
        if keep is None or r["id"] in keep:
            d = out.setdefault(r["id"].split("/", 1)[0], {m: [] for m in METRICS})
            for m in METRICS:
                d[m].append(r[m])
    return {dom: {m: sum(v) / len(v) for m, v in d.items()} for dom, d in out.items()}


def evaluate(work: Path, tag: str, model: Path, questions: Path, adds=(), **kw) -> dict:
    """readapt.evaluate into work/eval/<tag>, then per-domain scores from its predictions.jsonl."""
    out = work / "eval" / tag
    summary = evaluation.evaluate(str(model), questions, out, adds=[(str(a), x) for a, x in adds], overwrite=True,
                               **GEN, **kw)
    scores = by_domain(read_jsonl(out / "predictions.jsonl"))
    if "retrieval_accuracy" in summary:
        scores["retrieval_accuracy"] = summary["retrieval_accuracy"]
    return scores


def sweep(work: Path, name: str, base: Path, adds: list[Path], qa: Path, seed: int, grid=GRID) -> dict:
    """readapt.sweep over grid x grid with half the questions for validation -> {"grid", "chosen", "cells"},
    where cells["α,β"] = {"val": per-domain scores, "test": per-domain scores}."""
    folder = work / f"sweep_{name}"
    summary = evaluation.sweep(str(base), [str(a) for a in adds], qa, folder, grid=list(grid), val_fraction=0.5,
                            seed=seed, select="contains_em", overwrite=True, **GEN)
    qs = read_jsonl(qa)
    val, test = split_validation(len(qs), 0.5, seed)
    split = {"val": {qs[i]["id"] for i in val}, "test": {qs[i]["id"] for i in test}}
    cells = {}
    for a in grid:
        for b in grid:
            rows = read_jsonl(folder / "predictions" / f"alpha={a:g}_beta={b:g}.jsonl")
            cells[f"{a:g},{b:g}"] = {k: by_domain(rows, ids) for k, ids in split.items()}
    return {"grid": list(grid), "chosen": summary["best"]["scales"], "cells": cells}


def cell(grid: dict, a: float, b: float, split: str = "test") -> dict:
    return grid["cells"][f"{a:g},{b:g}"][split]


def chosen(grid: dict, split: str = "test") -> dict:
    return cell(grid, *grid["chosen"], split=split)


# --- adapters (cached with the models) --------------------------------------------------------------------


def adapter_settings(s: Settings, data: Path) -> dict:
    """readapt.train's settings (its keyword arguments; `readapt train` has a flag for each) for an adapter
    trained on `data`: the PortLLM task corpus (data/task.jsonl) has its own (`task_*`), the knowledge corpus
    `lora_rank`, `lora_alpha`, `lora_batch`, one epoch and readapt.train's default dropout."""
    if data.stem == "task":
        return {"rank": s.task_rank, "alpha": s.task_alpha, "batch_size": s.task_batch, "dropout": s.task_dropout,
                "epochs": s.task_epochs}
    return {"rank": s.lora_rank, "alpha": s.lora_alpha, "batch_size": s.lora_batch, "epochs": 1}


def train_adapter(s: Settings, seed: int, base: Path, data: Path, out: Path, dora: bool = False) -> Path:
    """A LoRA (or DoRA) adapter with readapt.train exactly as `readapt train` would, reporting each step; without
    its 'BASE looks like an instruct model' warning: the demo's pretrained tokenizer carries the chat template
    on purpose (every model is prompted the same way), and training on Θ is a baseline the tables need."""
    import warnings

    settings = adapter_settings(s, data)
    done = {"epoch": 0.0}

    def progress(record):  # all epochs are the whole job
        if "epoch" in record:
            tick((record["epoch"] - done["epoch"]) / settings["epochs"])
            done["epoch"] = record["epoch"]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="BASE .* looks like an instruct")
        return training.train(base, data, out, dora=dora, lr=s.lora_lr, max_length=s.lora_block, warmup_steps=10,
                              seed=seed, save_every=None, overwrite=True, quiet=True, callback=progress, **settings)


# --- extraction, knowledge probes, interference ----------------------------------------------------------


def extract(work: Path, phi: Path, theta: Path) -> dict:
    """RE-Adapter Δ = Θ − Φ, a LoRE-Adapter per τ of TAUS, and the spectrum report -> {τ: LoRE summary}."""
    delta.extract(phi, theta, work / "re_adapter", overwrite=True)
    lore = {}
    for tau in TAUS:
        report = lowrank.extract_lowrank(phi, theta, work / f"lore_adapter_tau{tau:g}", tau=tau, overwrite=True)
        lore[f"{tau:g}"] = lore_summary(report)
        tick(0.8 / len(TAUS))
    spectra.spectrum(phi, theta, work / "spectrum", tau=0.5, overwrite=True)
    return lore


def lore_summary(report: dict) -> dict:
    """Ranks per layer and module, and the shares of the delta's parameters and energy kept."""
    import re

    ranks: dict[str, dict[str, int]] = {}
    for t in report["tensors"]:
        m = re.search(r"layers\.(\d+)\..*?(\w+)_proj\.weight$", t["name"])
        if m and t["policy"] == "lowrank":
            ranks.setdefault(m.group(1), {})[m.group(2)] = t["rank"]
    return {"ranks": ranks, "params_kept_share": 100 * report["params_kept_share"],
            "energy_kept_share": 100 * report["energy_kept_share"], "relative_error": report["relative_error"]}


def knowledge(s: Settings, seed: int, phi: Path, theta: Path, psi: Path, delta: Path) -> dict:
    """Teacher-forced bio completion (models.bio_completion) of A and B under Φ, Θ, Φ+Ψ and Φ+Ψ+Δ, and how Ψ
    and Δ meet in weight space (readapt.interference, from load_merged: per layer cos(Ψ, Δ), ‖Ψ‖/‖Φ‖, ‖Δ‖/‖Φ‖)."""
    from readapt.demoworld.models import bio_completion
    from readapt.demoworld.world import make_world

    world, tok = make_world(seed, dict(s.sizes)), build_tokenizer()
    nets = {"pretrained": (phi, []), "instruct": (theta, []), "pretrained + Ψ": (phi, [(psi, 1.0)]),
            "pretrained + Ψ + Δ": (phi, [(psi, 1.0), (delta, 1.0)])}
    out = {}
    for name, (base, adds) in nets.items():
        net, _ = merging.load_merged(base, adds)
        for pop in "AB":
            out[f"{name} on {pop}"] = bio_completion(net, tok, world[pop])
        tick(0.2)
    return {"bio_completion": out, "interference": net.readapt_interference}


# --- PortLLM ---------------------------------------------------------------------------------------------


def port_drift(work: Path, k: int, phi: Path, v2: Path, patch: Path, retrained: Path, qa: Path) -> dict:
    """The task patch trained on Φ carried to Φ₂ after k steps of further pre-training (readapt.port, no
    training), against Φ₂ alone and a patch re-trained on Φ₂: scores and the port report's drift figures."""
    ported = work / f"ported_v2_{k}"
    report = porting.port(patch, v2, ported, from_=phi, overwrite=True)
    rows = {"version 2 alone": evaluate(work, f"port_v2_{k}_alone", v2, qa),
            "version 2 + ported patch": evaluate(work, f"port_v2_{k}_ported", v2, qa, [(ported, 1.0)]),
            "version 2 + re-trained patch": evaluate(work, f"port_v2_{k}_retrained", v2, qa, [(retrained, 1.0)])}
    return {"steps": k, **rows, "drift": (report.get("drift") or {}).get("total", {}), "counts": report["counts"]}


# `readapt ARGS` in a child that reports its own peak RSS (VmHWM belongs to the process's own memory
# map, unlike ru_maxrss, which on Linux keeps the parent's size from before exec)
_CHILD = """import os, sys
from readapt.cli import main
rc = main(sys.argv[1:])
hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]
open(os.environ['READAPT_DEMO_HWM'], 'w').write(hwm)
sys.exit(rc)
"""


def _peak_rss(args: list[str], log: Path) -> float:
    """Run `readapt ARGS` in a child process -> its peak RSS in MB."""
    import os
    import subprocess
    import sys

    hwm = log.with_suffix(".peak_kb")
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-c", _CHILD, *args], stdout=f, stderr=subprocess.STDOUT, check=False,
                            env={**os.environ, "READAPT_DEMO_HWM": str(hwm)}).returncode
    if rc != 0:
        raise RuntimeError(f"readapt {' '.join(args)} failed ({rc}); see {log}")
    peak = int(hwm.read_text()) / 1024
    hwm.unlink()
    return peak


def port_memory(s: Settings, work: Path, phi: Path, v2: Path, patch: Path, task: Path) -> dict:
    """PortLLM's memory claim: peak RSS of `readapt port --merge` and of 3 LoRA training steps on Φ₂, each in
    a child process (the merged model is written to work/ported_merged)."""
    import shutil

    (work / "logs").mkdir(exist_ok=True)
    port = _peak_rss(["port", str(patch), "--to", str(v2), "--from", str(phi), "-o", str(work / "ported_merged"),
                      "--merge", "--overwrite"], work / "logs" / "port_merge.log")
    tick(0.5)
    probe = work / "retrain_probe"
    flags = [x for k, v in adapter_settings(s, task).items() for x in (f"--{k.replace('_', '-')}", str(v))]
    retrain = _peak_rss(["train", str(v2), "--data", str(task), "-o", str(probe), "--no-dora", "--lr", str(s.lora_lr),
                         *flags, "--max-length", str(s.lora_block), "--max-steps", "3", "--save-every", "0",
                         "--overwrite", "--quiet"], work / "logs" / "retrain_probe.log")
    shutil.rmtree(probe)
    return {"port --merge peak RSS (MB)": round(port, 1), "re-training (3 LoRA steps) peak RSS (MB)": round(retrain, 1)}
