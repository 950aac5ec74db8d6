"""`readapt demo`: run the world end to end for each seed (cached) and write the report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from readapt.demoworld.cache import _build_once, _cold_record, default_cache_dir, source_hash
from readapt.demoworld.experiments import run_experiments, train_adapters, write_data
from readapt.demoworld.jobs import Jobs
from readapt.demoworld.models import bio_completion, train_world_model
from readapt.demoworld.report import aggregate, claims, format_tables, plots, readme, world_check_failures
from readapt.demoworld.settings import FULL, MARGIN, QUICK, Settings
import readapt
from readapt.demoworld.internals import output_folder
from readapt.demoworld.world import build_tokenizer, make_world


def _say(msg: str) -> None:
    import sys

    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_seed(s: Settings, seed: int, cache: Path, jobs: Jobs) -> tuple[dict, Path]:
    """Train (or reuse) the models and adapters of one seed and run (or reuse) its experiments.

    Returns (results, folder of its artefacts)."""
    import shutil

    from transformers import AutoModelForCausalLM

    root = cache / s.key(seed)
    world = make_world(seed, dict(s.sizes))
    tok = build_tokenizer()
    wall = {}
    t0 = time.perf_counter()

    def models_and_checks(tmp: Path):
        _say(f"seed {seed}: training the pretrained model Φ on A's bios ({root})")
        train_world_model(s, seed, "pretrained", tmp)  # this process, all its threads
        _say(f"seed {seed}: training the instruct model Θ and version 2 Φ₂ from Φ")
        for r in [jobs.submit(train_world_model, s, seed, w, tmp) for w in ("instruct", "pretrained_v2")]:
            r.result()
        checks = {}
        for name, pops in (("pretrained", "A"), ("pretrained_v2", "AC"), ("instruct", "A")):
            m = AutoModelForCausalLM.from_pretrained(tmp / name, local_files_only=True)
            for pop in pops:
                checks[f"{name} on {pop}"] = bio_completion(m, tok, world[pop])
        (tmp / "bio_completion.json").write_text(json.dumps(checks, indent=2) + "\n")

    mroot = _build_once(root / "models", models_and_checks)
    models = {k: mroot / k for k in ("pretrained", "instruct", "pretrained_v2")}
    files_root = _build_once(root / "data", lambda tmp: write_data(world, s, tmp, seed))
    files = {p.stem: p for p in files_root.glob("*.jsonl")}
    wall["models"], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()

    def adapters_and_checks(tmp: Path):
        _say(f"seed {seed}: training 4 LoRA adapters with readapt.train")
        ad = train_adapters(s, models, files, tmp, seed, jobs)
        net, _ = readapt.load_merged(models["pretrained"], [(ad["knowledge"], 1.0)])
        checks = {"pretrained + knowledge adapter on B": bio_completion(net, tok, world["B"])}
        (tmp / "bio_completion.json").write_text(json.dumps(checks, indent=2) + "\n")

    aroot = _build_once(root / "adapters", adapters_and_checks)
    adapters = {k: aroot / k for k in ("knowledge", "knowledge_on_instruct", "task_v1", "task_v2")}
    wall["adapters"], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()

    def experiments(tmp: Path):
        _say(f"seed {seed}: experiments: extract, lowrank, spectrum, sweep, evaluate, port")
        res = run_experiments(s, seed, models, adapters, files, tmp, jobs)
        res["bio_completion"] = {**json.loads((mroot / "bio_completion.json").read_text()),
                                 **json.loads((aroot / "bio_completion.json").read_text())}
        (tmp / "results.json").write_text(json.dumps(res, indent=2) + "\n")

    run = _build_once(root / "runs" / source_hash(), experiments)
    for old in (root / "runs").iterdir():  # results of other code versions are stale: keep one
        if old != run and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    res = json.loads((run / "results.json").read_text())
    wall["experiments"] = round(time.perf_counter() - t0, 1)
    res["wall_seconds"], res["cache"] = wall, str(root)
    res["cold_build"] = {name: _cold_record(folder)
                         for name, folder in (("models", mroot), ("adapters", aroot), ("experiments", run))}
    return res, run


def demo(out: str | Path = "readapt-demo", quick: bool = False, seeds: int = 1, cache_dir: str | Path | None = None,
         overwrite: bool = False) -> Path:
    """Run the demo world end to end and write tables, plots and a README to `out`; returns `out`.

    Per seed (the world and every training use seeds 0..seeds-1): train or reuse Φ, Θ, Φ₂ and the LoRA
    adapters (cached under `cache_dir`, default ~/.cache/readapt/demo/<hash of settings and seed>), then run
    extract, lowrank, sweep/evaluate and port exactly as a user would, print the tables (mean ± std over
    seeds) and say which of the papers' claims reproduced. An existing `out` is replaced only if it holds a
    previous demo (or `overwrite`).
    """
    import os
    import shutil

    if seeds < 1:
        raise readapt.ReadaptError(f"--seeds must be at least 1, got {seeds}")
    out = Path(out)
    try:
        previous_demo = json.loads((out / "results.json").read_text()).get("demo") == "readapt"
    except (OSError, ValueError, AttributeError):
        previous_demo = False
    t0 = time.perf_counter()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    s = QUICK if quick else FULL
    threads = torch.get_num_threads()
    from transformers.utils import logging

    logging.disable_progress_bar()
    cores = len(os.sched_getaffinity(0))
    # tiny matrices: one thread per process, the second core runs a second job (measured here, on a
    # loaded 2-core machine: a quick cold run took 208 CPU-s with 2 threads, ~100 with 1)
    torch.set_num_threads(int(os.environ.get("READAPT_DEMO_THREADS", 1)))
    jobs = Jobs(min(2, cores))
    try:
        with output_folder(out, overwrite=overwrite or bool(previous_demo), inputs=[cache]) as tmp:
            per_seed, runs = [], []
            for seed in range(seeds):
                res, run = run_seed(s, seed, cache, jobs)
                per_seed.append(res)
                runs.append(run)
                shutil.copytree(run, tmp / f"seed{seed}", ignore=shutil.ignore_patterns(".complete"))
                shutil.copytree(cache / s.key(seed) / "data", tmp / f"seed{seed}" / "data",
                                ignore=shutil.ignore_patterns(".complete"))
            tables = aggregate(per_seed)
            verdicts = claims(tables, per_seed)
            failed = world_check_failures(tables)
            for c in verdicts if failed else ():  # a claim cannot be judged in a world that did not learn
                c["verdict"] = "not meaningful"
            figs = plots(tables, per_seed, runs, tmp)
            seconds = time.perf_counter() - t0
            text = format_tables(tables)
            summary = "\n".join(f"  [{c['verdict']}] {c['claim']}: {c['evidence']}" for c in verdicts)
            (tmp / "tables.md").write_text(format_tables(tables, markdown=True))
            (tmp / "tables.json").write_text(json.dumps(tables, indent=2) + "\n")
            (tmp / "results.json").write_text(json.dumps(
                {"demo": "readapt", "quick": quick, "seeds": seeds, "settings": asdict(s), "wall_seconds": round(seconds, 1),
                 "claims": verdicts, "per_seed": per_seed}, indent=2) + "\n")
            (tmp / "README.md").write_text(readme(tables, verdicts, per_seed, quick, seconds, figs))
    finally:
        jobs.close()
        torch.set_num_threads(threads)
        logging.enable_progress_bar()
    print(text)
    if failed:
        print("WORLD CHECKS FAILED, so no claim is judged (more steps, or the full demo, should fix it):\n  "
              + "\n  ".join(failed))
    print("Claims of the papers in this world (margin {:g} points):\n{}".format(MARGIN, summary))
    print(f"\nWrote {out} in {seconds:.0f} s (README.md, tables.md, results.json, figures); cache: {cache}")
    return out
