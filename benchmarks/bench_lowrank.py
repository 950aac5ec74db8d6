"""LoRE-Adapt benchmarks on the synthetic 168M-parameter float32 Llama pair (benchmarks/make_pair.py).

    python benchmarks/bench_lowrank.py svd       [--work DIR] [--rank 32] [--tau 0.5] [--layers N]
    python benchmarks/bench_lowrank.py mergekit  [--work DIR] [--mergekit /work/mk-venv/bin/mergekit-extract-lora]

svd: per 2-D tensor of Δ = INSTRUCT − BASE, time of each factorization path (exact torch.linalg.svd, gram,
randomized) at a fixed rank, and its error ‖Δ − BA‖_F relative to the exact optimum sqrt(Σ_{i>k} σᵢ²);
plus the τ rule (exact vs gram: same ranks?). Both summed over the model.

mergekit: side by side, each as its own process under `/usr/bin/time -v` (wall time, peak RSS):
`mergekit-extract-lora --max-rank 32` (mergekit 0.1.5, separate venv) and
`readapt extract BASE INSTRUCT -o OUT --rank 32` (defaults: embeddings and lm_head low rank), and
`... --embeddings dense --lm-head dense` (what mergekit writes for them: full copies). Error: the relative
Frobenius error ‖Δ − Ψ‖/‖Δ‖ over the decoder's linear weights (low rank in all three), with Ψ read from
each adapter folder by readapt.addends.LoraAdapter (which honours rank_pattern/alpha_pattern).
Prints a table and writes DIR/bench_lowrank_<part>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def ensure_pair(work: Path) -> tuple[Path, Path]:
    base, inst = work / "pair" / "base", work / "pair" / "instruct"
    if not (base / "config.json").is_file() or not (inst / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "make_pair.py"), str(work / "pair")], check=True)
    return base, inst


def matrices(base: Path, inst: Path):
    from readapt.checkpoint import Checkpoint, Pair

    pair = Pair(Checkpoint.open(base), Checkpoint.open(inst))
    for n in pair.names:
        if len(pair.base.shape(n)) == 2:
            yield n, pair.delta(n)


def bench_svd(work: Path, rank: int, tau: float, layers: int | None = None) -> dict:
    from readapt.factorize import factorize, rank_at

    base, inst = ensure_pair(work)
    methods = ("exact", "gram", "randomized")
    t_tot = {m: 0.0 for m in methods}
    err2 = {m: 0.0 for m in methods}
    opt2 = energy = 0.0
    tau_same, tau_total, tau_t = 0, 0, {"exact": 0.0, "gram": 0.0}
    rows = []
    for name, D in matrices(base, inst):
        if layers is not None and ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= layers:
            continue
        row = {"tensor": name, "shape": list(D.shape)}
        sigma = None
        for m in methods:
            s = time.perf_counter()
            f = factorize(D, rank=rank, svd=m)
            dt = time.perf_counter() - s
            e = float((D - f.B @ f.A).double().norm()) ** 2  # true error, not the reported one
            t_tot[m] += dt
            err2[m] += e
            row[m] = {"s": round(dt, 4), "err": math.sqrt(e)}
            if m == "exact":
                sigma = f.sigma.double()
        o = float(sigma[rank:].square().sum())
        opt2 += o
        energy += float(sigma.square().sum())
        row["optimum"] = math.sqrt(o)
        for m in ("exact", "gram"):
            s = time.perf_counter()
            f = factorize(D, tau=tau, svd=m)
            tau_t[m] += time.perf_counter() - s
            row[f"rank_tau_{m}"] = f.rank
        tau_same += row["rank_tau_exact"] == row["rank_tau_gram"] == rank_at(sigma, tau)
        tau_total += 1
        rows.append(row)
        print(f"{name:45s} " + " ".join(f"{m} {row[m]['s']:.3f}s" for m in methods), flush=True)
    out = {
        "rank": rank, "threads": torch.get_num_threads(), "tensors": len(rows),
        "seconds": {m: round(t_tot[m], 2) for m in methods},
        "speedup_vs_exact": {m: round(t_tot["exact"] / t_tot[m], 2) for m in methods},
        "relative_error": {m: math.sqrt(err2[m] / energy) for m in methods},
        "relative_optimum": math.sqrt(opt2 / energy),
        "excess_over_optimum": {m: math.sqrt(err2[m] / opt2) - 1 for m in methods},
        "tau": tau, "tau_seconds": {m: round(v, 2) for m, v in tau_t.items()},
        "tau_same_rank_as_exact": f"{tau_same}/{tau_total}", "rows": rows,
    }
    print(f"\nrank {rank} over {len(rows)} tensors, {torch.get_num_threads()} threads")
    print(f"{'method':<11} {'seconds':>8} {'speedup':>8} {'rel. error':>11} {'excess over optimum':>20}")
    for m in methods:
        print(f"{m:<11} {out['seconds'][m]:>8.2f} {out['speedup_vs_exact'][m]:>7.2f}x "
              f"{out['relative_error'][m]:>11.6f} {out['excess_over_optimum'][m]:>20.2e}")
    print(f"τ={tau}: exact {out['tau_seconds']['exact']:.2f}s, gram {out['tau_seconds']['gram']:.2f}s; "
          f"same rank in {out['tau_same_rank_as_exact']} tensors")
    return out


def timed(cmd: list[str], log: Path) -> dict:
    """Run cmd under /usr/bin/time -v; wall seconds, peak RSS (GB), exit code."""
    s = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - s
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    el = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    secs = wall
    if el:
        parts = [float(x) for x in el.group(1).split(":")]
        secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(secs, 2),
            "peak_rss_gb": round(int(rss.group(1)) / 1e6, 3) if rss else None}


def adapter_error(base: Path, inst: Path, adapter: Path) -> dict:
    """‖Δ − Ψ‖/‖Δ‖ over the decoder linear weights, and whether every one of them got a low-rank term."""
    from readapt.addends import LoraAdapter
    from readapt.checkpoint import Checkpoint, Pair

    pair = Pair(Checkpoint.open(base), Checkpoint.open(inst))
    b = pair.base
    ad = LoraAdapter(adapter)
    err2 = en2 = 0.0
    covered = total = 0
    for n in b.names:
        if ".layers." not in n or len(b.shape(n)) != 2:
            continue
        D = pair.delta(n)
        psi = ad.delta(n, b.read(n).float())
        total += 1
        covered += psi is not None
        r = D if psi is None else D - psi
        err2 += float(r.double().square().sum())
        en2 += float(D.double().square().sum())
    return {"relative_error_linear": math.sqrt(err2 / en2), "linear_tensors_adapted": f"{covered}/{total}",
            "adapter_mb": round(sum(p.stat().st_size for p in adapter.glob("*.safetensors")) / 1e6, 1)}


def bench_mergekit(work: Path, rank: int, mergekit: str) -> dict:
    base, inst = ensure_pair(work)
    readapt = shutil.which("readapt") or str(Path(sys.executable).parent / "readapt")
    runs = {
        "mergekit": [mergekit, "--model", str(inst), "--base-model", str(base), "--out-path", str(work / "mk"),
                     "--max-rank", str(rank), "--quiet"],
        "readapt": [readapt, "extract", str(base), str(inst), "-o", str(work / "ra"), "--rank", str(rank)],
        "readapt_dense_emb": [readapt, "extract", str(base), str(inst), "-o", str(work / "ra_dense"), "--rank",
                              str(rank), "--embeddings", "dense", "--lm-head", "dense"],
    }
    out = {"rank": rank, "nproc": os.cpu_count(), "load_before": os.getloadavg()}
    for name, cmd in runs.items():
        folder = Path(cmd[cmd.index("--out-path") + 1] if "--out-path" in cmd else cmd[cmd.index("-o") + 1])
        shutil.rmtree(folder, ignore_errors=True)
        res = timed(cmd, work / f"{name}.log")
        if res["rc"] == 0:
            res.update(adapter_error(base, inst, folder))
        out[name] = res
        print(name, json.dumps(res), flush=True)
    out["load_after"] = os.getloadavg()
    mk, ra = out["mergekit"], out["readapt"]
    if mk["rc"] == 0 and ra["rc"] == 0:
        print(f"\nreadapt / mergekit: time {ra['seconds'] / mk['seconds']:.2f}, peak RSS "
              f"{ra['peak_rss_gb'] / mk['peak_rss_gb']:.2f}; linear-layer error {ra['relative_error_linear']:.4f} "
              f"vs {mk['relative_error_linear']:.4f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("svd", "mergekit"))
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "lowrank")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--layers", type=int, default=None, help="svd: only decoder layers below this (and "
                    "embeddings, lm_head); default all")
    ap.add_argument("--mergekit", default="/work/mk-venv/bin/mergekit-extract-lora")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    res = bench_svd(a.work, a.rank, a.tau, a.layers) if a.part == "svd" else bench_mergekit(a.work, a.rank, a.mergekit)
    (a.work / f"bench_lowrank_{a.part}.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
