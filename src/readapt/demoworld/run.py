"""`readapt demo`: build (or reuse) every seed's models and experiments as one job graph, judge, report."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from readapt.errors import ReadaptError
from readapt.demoworld import checks as wc
from readapt.demoworld.cache import default_cache_dir
from readapt.demoworld.claims import all_claims
from readapt.demoworld.figures import plots
from readapt.checkpoint import check_output
from readapt.demoworld.internals import output_folder
from readapt.demoworld.jobs import run_jobs
from readapt.demoworld.plan import Seed, collect, experiment_jobs, training_jobs
from readapt.demoworld.readme import KEY, interference_text, readme
from readapt.demoworld.report import aggregate, format_tables
from readapt.demoworld.settings import FULL, QUICK, Settings
from readapt.demoworld.verdicts import RULE

SMOKE = "smoke test (--quick)"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def build(s: Settings, seeds: list[int], cache: Path, capacity: bool = False) -> list[dict]:
    """Train what is missing and run what was not run, for every seed at once -> per-seed results."""
    points = [Seed(s, seed, cache / s.key(seed)) for seed in seeds]
    jobs = [*(j for p in points for j in training_jobs(p, capacity)),  # training first: the long jobs
            *(j for p in points for j in experiment_jobs(p, capacity))]
    if jobs:
        _say(f"{len(jobs)} jobs to run for {s.label}, seeds {seeds} (cache {cache})")
    done = run_jobs(jobs, workers=min(2, len(os.sched_getaffinity(0))))
    return [collect(p, done, table2_only=capacity) for p in points]


def judge(per_seed: list[dict], smoke: bool) -> tuple[list[dict], list[dict]]:
    """(world checks, judged claims); in a smoke test every claim is not testable."""
    checks = wc.world_checks(per_seed)
    failed = wc.failed(checks) | ({SMOKE} if smoke else set())
    claims = [c.judge(failed, extra=(SMOKE,) if smoke else ()) for c in all_claims(per_seed)]
    return checks, claims


def _null_nan(x):
    """`x` with every NaN (a cell with no value: "n/a" in tables.md) as None, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: _null_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_null_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _write(tmp: Path, s: Settings, per_seed, checks, claims, seconds: float, smoke: bool, cache: Path) -> dict:
    """Every file of the output folder (the seed folders are copied from the cache)."""
    tables = aggregate(per_seed)
    chosen = {m: [r["grids"][m]["chosen"] for r in per_seed] for m in ("re_adapt", "lore_adapt")}
    figs = plots(tables, chosen, tmp)
    seeds = [r["seed"] for r in per_seed]
    for r in per_seed:
        root, dst = cache / s.key(r["seed"]), tmp / f"seed{r['seed']}"
        for src, to in ((Path(r["run_folder"]), dst), (root / "data", dst / "data")):
            shutil.copytree(src, to, ignore=shutil.ignore_patterns(".complete"), copy_function=_link_or_copy)
    (tmp / "tables.md").write_text(format_tables(tables, markdown=True))
    (tmp / "tables.json").write_text(json.dumps(_null_nan(tables), indent=2, allow_nan=False) + "\n")
    (tmp / "KEY.md").write_text(KEY)
    results = {"demo": "readapt", "quick": smoke, "seeds": seeds, "rule": RULE, "world_checks": checks,
               "claims": claims, "settings": asdict(s), "cache": str(cache), "wall_seconds": round(seconds, 1),
               "per_seed": per_seed}
    (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (tmp / "README.md").write_text(readme(s, checks, claims, tables, seeds, smoke, seconds, figs,
                                          interference_text(tables)))
    return tables


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link to the cached file (a warm run writes ~100 MB in no time), a copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _summary(checks: list[dict], claims: list[dict], tables: dict, smoke: bool) -> str:
    lines = [wc.format_checks(checks), ""]
    if smoke:
        lines += [("*** SMOKE TEST (--quick): the world is too small to test the papers' claims; every verdict "
                  "below is 'not testable'. Run `readapt demo` (without --quick) for the real verdicts. ***"), ""]
    lines += [format_tables({"closed_book": tables["closed_book"]}), f"Rule: {RULE}", "",
              "Claims of the papers in this world:"]
    lines += [f"  [{c['verdict']}] {c['claim']} ({c['paper']}): {c['evidence']}" for c in claims]
    return "\n".join(lines)


def demo(out: str | Path = "readapt-demo", quick: bool = False, seeds: int | None = None,
         cache_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Run the demo world end to end and write tables, plots, results.json and a README to `out`.

    Seeds 0..seeds-1 (default 3; 1 with `quick`, a smoke test whose verdicts are all not testable). Models,
    adapters and experiment results are cached under `cache_dir` (default ~/.cache/readapt/demo/<hash of
    settings and seed>). An existing `out` is replaced only if it holds a previous demo (or `overwrite`)."""
    seeds = (1 if quick else 3) if seeds is None else seeds
    if seeds < 1:
        raise ReadaptError(f"--seeds must be at least 1, got {seeds}")
    out, s, t0 = Path(out), QUICK if quick else FULL, time.perf_counter()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    check_output(out, overwrite or _previous_demo(out), [cache])  # before training, not after
    cache.mkdir(parents=True, exist_ok=True)
    with _quiet_torch():
        per_seed = build(s, list(range(seeds)), cache)
        checks, claims = judge(per_seed, quick)
        with output_folder(out, overwrite=overwrite or _previous_demo(out), inputs=[cache]) as tmp:
            tables = _write(tmp, s, per_seed, checks, claims, time.perf_counter() - t0, quick, cache)
    print(_summary(checks, claims, tables, quick))
    print(f"\nWrote {out} in {time.perf_counter() - t0:.0f} s (README.md, KEY.md, tables.md, results.json, "
          f"figures); cache: {cache}")
    return out


def _previous_demo(out: Path) -> bool:
    try:
        return json.loads((out / "results.json").read_text()).get("demo") == "readapt"
    except (OSError, ValueError, AttributeError):
        return False


class _quiet_torch:
    """One thread per process (tiny matrices: the second core runs a second job; a quick cold run took 208
    CPU-s with 2 threads, ~100 with 1), no transformers progress bars; both restored on exit."""

    def __enter__(self):
        from transformers.utils import logging

        self.threads = torch.get_num_threads()
        torch.set_num_threads(int(os.environ.get("READAPT_DEMO_THREADS", "1")))
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        torch.set_num_threads(self.threads)
        logging.enable_progress_bar()


def capacity_sweep(out: str | Path = "readapt-capacity", seeds: int | None = None, cache_dir: str | Path | None = None,
                   overwrite: bool = False) -> Path:
    """The default world at the model sizes of settings.CAPACITY: how the gap between RE-Adapt (scales chosen
    on validation) and the instruct model fine-tuned on B moves with capacity, in- and out-of-domain; with
    the 'room for both' check (what Ψ and Δ keep of each other's knowledge). Writes README.md and
    capacity.json to `out`."""
    from readapt.demoworld.readme import capacity_readme
    from readapt.demoworld.settings import CAPACITY

    seeds = 3 if seeds is None else seeds
    if seeds < 1:
        raise ReadaptError(f"--seeds must be at least 1, got {seeds}")
    out, t0 = Path(out), time.perf_counter()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    check_output(out, overwrite or _previous_demo(out), [cache])  # before training, not after
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    with _quiet_torch():
        for s in CAPACITY:
            rows.append(capacity_row(s, build(s, list(range(seeds)), cache, capacity=True)))
    with output_folder(out, overwrite=overwrite or _previous_demo(out), inputs=[cache]) as tmp:
        (tmp / "capacity.json").write_text(json.dumps({"demo": "readapt", "capacity": rows}, indent=2) + "\n")
        (tmp / "README.md").write_text(capacity_readme(rows, time.perf_counter() - t0))
    print(capacity_readme(rows, time.perf_counter() - t0))
    return out


def capacity_row(s: Settings, per_seed: list[dict]) -> dict:
    """One model size: parameters, the room-for-both check, and the closed-book contains-EM that matter, as
    'mean ± std' over seeds, and the per-seed values under "per_seed"."""
    from readapt.demoworld.models import model_config
    from readapt.demoworld.settings import EM
    from readapt.demoworld.verdicts import _pm
    from readapt.demoworld.world import vocabulary

    def em(row, dom):
        return [r["closed_book"][row][dom][EM] for r in per_seed]

    ft, ra = "instruct + knowledge adapter", "RE-Adapt (α, β chosen on validation)"

    def gap(dom):
        return [a - b for a, b in zip(em(ra, dom), em(ft, dom))]

    v = {"room for both": [wc._room(r) for r in per_seed], "instruct A": em("instruct", "A"),
         **{f"{row} {dom}": em(row, dom) for row in (ft, ra) for dom in "BA"},
         "RE-Adapt − fine-tuned, B": gap("B"), "RE-Adapt − fine-tuned, A": gap("A")}
    cfg = model_config(s, len(vocabulary()))
    params = cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * (
        4 * cfg.hidden_size ** 2 + 3 * cfg.hidden_size * cfg.intermediate_size)
    return {"model": s.label, "parameters": f"{params / 1e6:.2f}M", "room for both": _pm(v["room for both"]),
            "instruct A": _pm(v["instruct A"]),
            "fine-tuned instruct B / A": f"{_pm(v[ft + ' B'])} / {_pm(v[ft + ' A'])}",
            "RE-Adapt (chosen) B / A": f"{_pm(v[ra + ' B'])} / {_pm(v[ra + ' A'])}",
            **{k: _pm(v[k]) for k in ("RE-Adapt − fine-tuned, B", "RE-Adapt − fine-tuned, A")},
            "seeds": [r["seed"] for r in per_seed], "per_seed": {k: [round(x, 2) for x in xs] for k, xs in v.items()}}
