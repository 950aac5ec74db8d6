"""Fold benchmark (issue 15): `readapt merge --as-lora` against the jobs it replaces, on the synthetic 168M pair.

    python benchmarks/bench_fold.py [--work benchmarks/_work/fold] [--rank 64] [--layers 8 16] [--repeat 1]

On make_pair.py's float32 Llama pair (hidden 1024, intermediate 2816, vocab 32000, 8 layers: 168M parameters,
0.67 GB; --layers 16 doubles the decoder), with two rank-64 LoRAs on every linear layer of the base
(bench_port.make_adapter, seeds 0 and 1, lora_alpha 128), each job in its own process under /usr/bin/time -v
(wall seconds, peak RSS):

    merge                  readapt merge BASE --add L1:0.5 --add L2:0.5 -o OUT            (a full model folder)
    fold exact             ... --as-lora                                                   (rank 128, no SVD)
    fold --rank 128        ... --as-lora --rank 128                                        (QR + core SVD per module)
    fold LoRA + instruct   readapt merge BASE --add L1:0.5 --add INSTRUCT:0.5 -o OUT --as-lora --rank 64
    extract --rank 64      readapt extract BASE INSTRUCT -o OUT --rank 64                  (the LoRE job alone)

and, from the reports, each fold's relative error ‖Ω − Ω̂‖/‖Ω − Φ‖ and adapter size. Peak RSS at 8 and 16
layers shows whether the fold's memory grows with depth. Then the same merge and folds inside one process
that has imported transformers and PEFT already (what the fold costs beyond that fixed import). Wall and
CPU (user + system) seconds: on a loaded machine torch's two threads wait ~16 ms for each other on every op,
so `--threads 1` shows what the jobs cost without that. Prints a table; writes WORK/bench_fold[_tN].json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_lowrank import timed  # noqa: E402
from bench_port import make_adapter  # noqa: E402


def cpu_seconds(log: Path) -> float:
    """User + system CPU seconds from a /usr/bin/time -v log (less sensitive to a loaded machine than wall time)."""
    text = log.read_text()
    return round(sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", text).group(1)) for k in ("User", "System")),
                 2)


def setup(work: Path, layers: int, rank: int) -> tuple[Path, Path, Path, Path]:
    """The pair with `layers` decoder layers and two rank-`rank` LoRAs on its base (built once, reused)."""
    pair = work / f"pair{layers}"
    if not (pair / "instruct" / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "make_pair.py"), str(pair), "--layers", str(layers)], check=True)
    loras = []
    for seed in (0, 1):
        folder = work / f"lora{layers}-r{rank}-s{seed}"
        if not (folder / "adapter_config.json").is_file():
            make_adapter(pair / "base", folder, rank, dora=False, seed=seed)
        loras.append(folder)
    return pair / "base", pair / "instruct", loras[0], loras[1]


def jobs(work: Path, layers: int, rank: int) -> dict[str, tuple[list[str], Path]]:
    base, inst, l1, l2 = setup(work, layers, rank)
    readapt = shutil.which("readapt") or str(Path(sys.executable).parent / "readapt")
    out = work / f"out{layers}"
    two = ["merge", str(base), "--add", f"{l1}:0.5", "--add", f"{l2}:0.5"]
    return {
        "merge": ([readapt, *two, "-o", str(out / "merge")], out / "merge"),
        "fold exact": ([readapt, *two, "-o", str(out / "exact"), "--as-lora"], out / "exact"),
        f"fold --rank {2 * rank}": ([readapt, *two, "-o", str(out / "fold"), "--as-lora", "--rank", str(2 * rank)],
                                    out / "fold"),
        f"fold LoRA + instruct --rank {rank}": ([readapt, "merge", str(base), "--add", f"{l1}:0.5", "--add",
                                                f"{inst}:0.5", "-o", str(out / "fold_delta"), "--as-lora",
                                                "--rank", str(rank)], out / "fold_delta"),
        f"extract --rank {rank}": ([readapt, "extract", str(base), str(inst), "-o", str(out / "extract"), "--rank",
                                    str(rank)], out / "extract"),
    }


def measure(work: Path, layers: int, rank: int, repeat: int) -> dict:
    rows = {}
    for name, (cmd, folder) in jobs(work, layers, rank).items():
        runs = []
        for _ in range(repeat):
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.run(["sync"])
            res = timed(cmd, work / "job.log")
            if res["rc"] != 0:
                raise RuntimeError(f"{name} failed:\n{(work / 'job.log').read_text()[-3000:]}")
            res["cpu_seconds"] = cpu_seconds(work / "job.log")
            runs.append(res)
        row = {"seconds": [r["seconds"] for r in runs], "cpu_seconds": [r["cpu_seconds"] for r in runs],
               "peak_rss_gb": [r["peak_rss_gb"] for r in runs], "cmd": runs[0]["cmd"]}
        for report in ("fold_report.json", "lore_report.json"):
            if (folder / report).is_file():
                rep = json.loads((folder / report).read_text())
                row["relative_error"] = rep["relative_error"]
                row["adapter_mb"] = round((folder / "adapter_model.safetensors").stat().st_size / 1e6, 1)
                low = [t for t in rep["tensors"] if t["policy"] == "lowrank" and t["rank"] > 0]
                row["modules_from_factors"] = f"{sum(t.get('from_factors', False) for t in low)}/{len(low)}"
        rows[name] = row
        print(f"{layers:>2} layers  {name:32s} wall {row['seconds']} s  CPU {row['cpu_seconds']} s  "
              f"{row['peak_rss_gb']} GB  "
              f"{'' if 'relative_error' not in row else 'rel. error %.4g' % row['relative_error']}", flush=True)
    return rows


def _warm(work: Path, layers: int, rank: int) -> dict:
    """In one process that has imported transformers and PEFT already (a Python session that also loads or
    serves models): wall and CPU seconds of fold(--rank 2r) and of merge of the same two LoRAs."""
    import time

    import peft  # noqa: F401  (what the fold's classification and PEFT check import)

    from readapt.folding import fold
    from readapt.loreplan import meta_model
    from readapt.merging import merge

    base, _, l1, l2 = setup(work, layers, rank)
    meta_model(json.loads((base / "config.json").read_text()))  # the model class imported
    adds, out = [(l1, 0.5), (l2, 0.5)], work / f"out{layers}" / "warm"
    row = {}
    for name, job in (("merge", lambda: merge(base, out, adds, overwrite=True)),
                      (f"fold --rank {2 * rank}", lambda: fold(base, out, adds, rank=2 * rank, overwrite=True)),
                      ("fold exact", lambda: fold(base, out, adds, overwrite=True))):
        w, c = time.perf_counter(), time.process_time()
        job()
        row[name] = {"seconds": round(time.perf_counter() - w, 2), "cpu_seconds": round(time.process_time() - c, 2)}
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    if sys.argv[1:2] == ["_warm"]:
        print(json.dumps(_warm(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "fold")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each job (OMP_NUM_THREADS; default: "
                    "torch's own choice)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    out = {"nproc": os.cpu_count(), "threads": a.threads, "load_before": os.getloadavg(), "rank": a.rank}
    for layers in a.layers:
        out[f"layers_{layers}"] = measure(a.work, layers, a.rank, a.repeat)
        child = subprocess.run([sys.executable, __file__, "_warm", str(a.work), str(layers), str(a.rank)],
                               capture_output=True, text=True, check=True)
        out[f"layers_{layers}_warm"] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{layers:>2} layers, transformers and PEFT already imported: {out[f'layers_{layers}_warm']}")
    out["load_after"] = os.getloadavg()
    (a.work / f"bench_fold{'' if a.threads is None else f'_t{a.threads}'}.json").write_text(
        json.dumps(out, indent=2) + "\n")
    print(f"load average before {out['load_before']}, after {out['load_after']}")


if __name__ == "__main__":
    main()
