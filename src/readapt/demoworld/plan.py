"""Which jobs a demo run needs, for every seed, and in what order (jobs.run_jobs runs them).

A seed's folder in the cache (cache/<key of settings and seed>, see report.KEY):

    models/pretrained/model, models/instruct/model, models/pretrained_v2/step_<k>   (+ training_log.jsonl)
    data/            the world's files
    adapters/<name>  LoRA/DoRA adapters trained with readapt.train
    runs/<source hash>/  every experiment (results.json when complete)

Each folder is built once, in place, and marked complete (`.complete`, with its cold build time); an
incomplete one is rebuilt. A job exists only for what is not yet built, so a warm run has no jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from readapt.demoworld import experiments as ex
from readapt.demoworld.cache import source_hash
from readapt.demoworld.jobs import Job
from readapt.demoworld.settings import COARSE, GRID, TAUS, Settings


def build_once(folder: Path, build, *args) -> Path:
    """`folder` if it is complete, else `build(folder, *args)` in place, then the `.complete` mark (what
    the cold build took and how busy the machine was)."""
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    build(folder, *args)
    _mark_complete(folder, round(time.perf_counter() - t0, 1))
    return folder


def _mark_complete(folder: Path, seconds: float | None = None) -> None:
    (folder / ".complete").write_text(json.dumps({
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds,
        "load_average": round(os.getloadavg()[0], 1), "cores": len(os.sched_getaffinity(0))}) + "\n")


def complete(folder: Path) -> bool:
    return (folder / ".complete").exists()


@dataclass(frozen=True)
class Seed:
    """The paths of one seed's models, adapters, data and run (`code`: the source hash, taken once)."""

    s: Settings
    seed: int
    root: Path
    code: str = field(default_factory=source_hash)

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, which: str) -> Path:
        return self.models / which / "model"

    def v2(self, k: int) -> Path:
        return self.models / "pretrained_v2" / f"step_{k}"

    def adapter(self, name: str) -> Path:
        return self.root / "adapters" / name

    @property
    def data(self) -> Path:
        return self.root / "data"

    def file(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

    @property
    def run(self) -> Path:
        return self.root / "runs" / self.code

    def tag(self, name: str) -> str:
        return f"seed {self.seed}: {name}"


# --- training jobs ---------------------------------------------------------------------------------------


def _train_world(folder: Path, s: Settings, seed: int, which: str) -> None:
    from readapt.demoworld.models import train_world_model

    train_world_model(s, seed, which, folder.parent)


def _write_data(folder: Path, s: Settings, seed: int) -> None:
    from readapt.demoworld.world import make_world

    ex.write_data(make_world(seed, dict(s.sizes)), s, folder, seed)


def _train_adapter(folder: Path, s: Settings, seed: int, base: Path, data: Path, dora: bool) -> None:
    ex.train_adapter(s, seed, base, data, folder, dora=dora)


# cost of each job in seconds of one core at the default size (progress and ETA only; training jobs as measured
# in a cold default demo on a quiet 2-core machine, 2026-12-02; the 5-epoch task patches and the 800-step
# instruct model scaled from a slower machine's 67-82 s and 171-200 s, the knowledge adapters halved with their
# corpus (batches of 8), 2026-12-03)
COST = {"pretrained": 60, "instruct": 130, "pretrained_v2": 20, "data": 3, "knowledge": 31, "knowledge_dora": 45,
        "knowledge_on_instruct": 32, "task_v1": 55, "task_v2": 55, "extract": 8, "probes": 8, "sweep": 40,
        "eval": 2.5, "port": 8, "memory": 12}


def training_jobs(p: Seed, table2_only: bool = False) -> list[Job]:
    """Φ, Θ, Φ₂ snapshots, the data files and the adapters that are not yet built (`table2_only`: what the
    closed-book table needs: Φ, Θ, the data, Ψ on Φ and on Θ)."""
    if table2_only:
        keep = {p.tag(n) for n in ("pretrained", "instruct", "data", "knowledge", "knowledge_on_instruct")}
        return [j for j in training_jobs(p) if j.name in keep]
    s, seed, jobs = p.s, p.seed, []

    def add(name, folder, fn, args, needs=(), cost_key=None):
        if not complete(folder):
            scale = (s.hidden / 128) ** 2 * s.layers / 4  # per-step cost grows with the matrices
            jobs.append(Job(p.tag(name), build_once, (folder, fn, *args), tuple(p.tag(n) for n in needs
                                                                                 if not _done(p, n)),
                            COST[cost_key or name] * scale))

    add("pretrained", p.models / "pretrained", _train_world, (s, seed, "pretrained"))
    add("instruct", p.models / "instruct", _train_world, (s, seed, "instruct"), ("pretrained",))
    add("pretrained_v2", p.models / "pretrained_v2", _train_world, (s, seed, "pretrained_v2"), ("pretrained",))
    add("data", p.data, _write_data, (s, seed))
    plan = {"knowledge": ("pretrained", "knowledge", False), "knowledge_dora": ("pretrained", "knowledge", True),
            "knowledge_on_instruct": ("instruct", "knowledge", False), "task_v1": ("pretrained", "task", False)}
    for name, (base, data, dora) in plan.items():
        add(name, p.adapter(name), _train_adapter, (s, seed, p.model(base), p.file(data), dora), (base, "data"))
    for k in s.v2_steps:
        add(f"task_v2_{k}", p.adapter(f"task_v2_{k}"), _train_adapter, (s, seed, p.v2(k), p.file("task"), False),
            ("pretrained_v2", "data"), "task_v2")
    return jobs


def _done(p: Seed, name: str) -> bool:
    """Whether the training job `name` of seed `p` is already built (then nothing waits for it)."""
    if name in ("pretrained", "instruct", "pretrained_v2"):
        return complete(p.models / name)
    return complete(p.data) if name == "data" else complete(p.adapter(name))


TABLE2 = ("extract", "probes", "sweep_re_adapt", "eval_instruct", "eval_instruct_knowledge")


# --- experiment jobs ---------------------------------------------------------------------------------------


def _scaled_eval(work, tag, base, qa, adds, grid, **kw):
    """evaluate `base` + α·adds[0] + β·adds[1] at the (α, β) chosen on validation in `grid` (a sweep result)."""
    a, b = grid["chosen"]
    return ex.evaluate(work, tag, base, qa, [(adds[0], a), (adds[1], b)], **kw)


def experiment_jobs(p: Seed, table2_only: bool = False) -> list[Job]:
    """Every experiment of seed `p` (none when its run is complete); results are keyed by job name.
    `table2_only`: just what the closed-book table needs (the capacity sweep)."""
    if complete(p.run):
        return []
    if table2_only:
        return [j for j in experiment_jobs(p) if j.name.split(": ", 1)[1] in TABLE2]
    s, work, jobs = p.s, p.run, []
    phi, theta, psi = p.model("pretrained"), p.model("instruct"), p.adapter("knowledge")
    delta, lore5, qa_test = work / "re_adapter", work / "lore_adapter_tau0.5", p.file("qa_test")
    trained = {"pretrained", "instruct", "pretrained_v2", "data", "knowledge", "knowledge_dora",
               "knowledge_on_instruct", "task_v1", *(f"task_v2_{k}" for k in s.v2_steps)}

    def add(name, fn, args, needs=(), cost="eval", inputs=(), scale=1.0, **kw):
        deps = tuple(p.tag(n) for n in needs if n not in trained or not _done(p, n))
        jobs.append(Job(p.tag(name), fn, args, deps, COST[cost] * scale * (s.hidden / 128) ** 2,
                        tuple(p.tag(n) for n in inputs), kw))

    shutil.rmtree(work, ignore_errors=True)  # an incomplete run (interrupted) starts over
    work.mkdir(parents=True)
    add("extract", ex.extract, (work, phi, theta), ("pretrained", "instruct"), "extract")
    add("probes", ex.knowledge, (s, p.seed, phi, theta, psi, delta), ("extract", "knowledge"), "probes")
    for name, adds, knows, grid in (("re_adapt", [psi, delta], "knowledge", GRID),
                                    ("re_adapt_dora", [p.adapter("knowledge_dora"), delta], "knowledge_dora", COARSE),
                                    ("lore_adapt", [psi, lore5], "knowledge", COARSE)):
        add(f"sweep_{name}", ex.sweep, (work, name, phi, adds, p.file("qa"), p.seed, grid), ("extract", knows, "data"),
            "sweep", scale=len(grid) ** 2 / len(GRID) ** 2)
    add("eval_instruct", ex.evaluate, (work, "instruct", theta, qa_test), ("instruct", "data"))
    add("eval_instruct_knowledge", ex.evaluate, (work, "instruct_knowledge", theta, qa_test,
                                            [(p.adapter("knowledge_on_instruct"), 1.0)]), ("knowledge_on_instruct", "data"))
    for tau in TAUS:
        add(f"lore_tau{tau:g}", _scaled_eval, (work, f"lore_tau{tau:g}", phi, qa_test,
                                               [psi, work / f"lore_adapter_tau{tau:g}"]), inputs=("sweep_re_adapt",))
    _rag_jobs(p, add)
    add("port_v1", ex.evaluate, (work, "port_v1", phi, p.file("qa_port"), [(p.adapter("task_v1"), 1.0)]),
        ("task_v1", "data"))
    add("port_v1_alone", ex.evaluate, (work, "port_v1_alone", phi, p.file("qa_port")), ("pretrained", "data"))
    for k in s.v2_steps:
        add(f"port_{k}", ex.port_drift, (work, k, phi, p.v2(k), p.adapter("task_v1"), p.adapter(f"task_v2_{k}"),
                                         p.file("qa_port")), ("task_v1", f"task_v2_{k}", "pretrained_v2", "data"), "port")
    k = max(s.v2_steps)
    add("memory", ex.port_memory, (s, work, phi, p.v2(k), p.adapter("task_v1"), p.file("task")),
        ("task_v1", "pretrained_v2", "data"), "memory")
    return jobs


def _rag_jobs(p: Seed, add) -> None:
    """Table 3: BM25 and oracle passages for Θ, Θ + Ψ_inst, and RE-/LoRE-Adapt at their chosen scales."""
    work, phi, theta = p.run, p.model("pretrained"), p.model("instruct")
    qa = p.file("qa_B_test")
    for r in ("bm25", "oracle"):
        kw = {"retrieval": r, "passages": p.file("passages_B")}
        add(f"rag_{r}_instruct", ex.evaluate, (work, f"rag_{r}_instruct", theta, qa), ("instruct", "data"), **kw)
        add(f"rag_{r}_instruct_knowledge", ex.evaluate,
            (work, f"rag_{r}_instruct_knowledge", theta, qa, [(p.adapter("knowledge_on_instruct"), 1.0)]),
            ("knowledge_on_instruct", "data"), **kw)
        add(f"rag_{r}_re_adapt", _scaled_eval, (work, f"rag_{r}_re_adapt", phi, qa,
                                                [p.adapter("knowledge"), work / "re_adapter"]),
            inputs=("sweep_re_adapt",), **kw)
        add(f"rag_{r}_lore_adapt", _scaled_eval, (work, f"rag_{r}_lore_adapt", phi, qa,
                                                  [p.adapter("knowledge"), work / "lore_adapter_tau0.5"]),
            inputs=("sweep_lore_adapt",), **kw)


# --- one seed's results ------------------------------------------------------------------------------------


def collect(p: Seed, done: dict, table2_only: bool = False) -> dict:
    """Assemble the seed's results from its jobs' (`done`, keyed by job name), write them to the run folder
    and mark it complete; a complete run's results are read back instead. `table2_only`: the closed-book
    rows and the knowledge probes alone, not written."""
    if complete(p.run):
        return {**json.loads((p.run / "results.json").read_text()), "run_folder": str(p.run)}
    r = {n.split(": ", 1)[1]: v for n, v in done.items() if n.startswith(p.tag(""))}
    if table2_only:
        grids = {k: r["sweep_re_adapt"] for k in ("re_adapt", "re_adapt_dora", "lore_adapt")}  # only RE-Adapt's used
        return {"seed": p.seed, "knowledge": r["probes"]["bio_completion"], "grids": grids,
                "closed_book": closed_book_rows(grids, r["eval_instruct"], r["eval_instruct_knowledge"])}
    grids = {k: r[f"sweep_{k}"] for k in ("re_adapt", "re_adapt_dora", "lore_adapt")}
    res = {"seed": p.seed, "settings_key": p.s.key(p.seed), "knowledge": r["probes"]["bio_completion"],
           "interference": r["probes"]["interference"], "grids": grids,
           "closed_book": closed_book_rows(grids, r["eval_instruct"], r["eval_instruct_knowledge"]),
           "strength": {f"{b:g}": grids["re_adapt"]["cells"][f"0,{b:g}"] for b in GRID},
           "lore": {t: {**v, "scores": r[f"lore_tau{t}"]} for t, v in r["extract"].items()},
           "rag": rag_rows(r), "port": {"version 1 alone": r["port_v1_alone"],
                                        "version 1 + task patch": r["port_v1"],
                                        "drift": [r[f"port_{k}"] for k in p.s.v2_steps]},
           "memory": r["memory"]}
    res["bm25_retrieval_accuracy"] = r["rag_bm25_instruct"].get("retrieval_accuracy")
    (p.run / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    _mark_complete(p.run)
    return {**res, "run_folder": str(p.run)}


def closed_book_rows(grids: dict, instruct: dict, instruct_knowledge: dict) -> dict:
    """The rows of the paper's Table 2 shape (test split), with the reviewers' baselines."""
    re, dora, lore = grids["re_adapt"], grids["re_adapt_dora"], grids["lore_adapt"]
    return {
        "pretrained": ex.cell(re, 0, 0),
        "pretrained + knowledge adapter": ex.cell(re, 1, 0),
        "instruct": instruct,
        "instruct + knowledge adapter": instruct_knowledge,
        "Φ + 0.5Δ (no knowledge adapter)": ex.cell(re, 0, 0.5),
        "RE-Adapt (α=β=1)": ex.cell(re, 1, 1),
        "RE-Adapt (α=β=0.5)": ex.cell(re, 0.5, 0.5),
        "RE-Adapt (α, β chosen on validation)": ex.chosen(re),
        "RE-Adapt, DoRA Ψ (α=β=0.5)": ex.cell(dora, 0.5, 0.5),
        "RE-Adapt, DoRA Ψ (α, β chosen on validation)": ex.chosen(dora),
        "LoRE-Adapt τ=0.5 (α=β=1)": ex.cell(lore, 1, 1),
        "LoRE-Adapt τ=0.5 (α=β=0.5)": ex.cell(lore, 0.5, 0.5),
        "LoRE-Adapt τ=0.5 (α, β chosen on validation)": ex.chosen(lore),
    }


def rag_rows(r: dict) -> dict:
    """{model: {"bm25": B scores, "oracle": B scores}} (B's test questions)."""
    names = {"instruct": "instruct", "instruct_knowledge": "instruct + knowledge adapter",
             "re_adapt": "RE-Adapt (α, β chosen on validation)", "lore_adapt": "LoRE-Adapt τ=0.5 (α, β chosen on validation)"}
    return {label: {ret: r[f"rag_{ret}_{key}"]["B"] for ret in ("bm25", "oracle")} for key, label in names.items()}
