"""Speed and memory of the checkpoint engine: extract and merge, next to `cat` and mergekit.

    python benchmarks/bench_checkpoint.py [--work benchmarks/_work] [--mergekit /path/to/venv] [--repeat 3]
                                          [--readapt NAME=COMMAND ...]   # several readapt builds, paired

Builds (once) the synthetic float32 Llama pair of benchmarks/make_pair.py at 8 layers (168M parameters)
and at 16 layers (the "model doubles" check), then times each command with `/usr/bin/time -v` (wall
clock and peak RSS, memory-mapped pages included):

    cat            reading the input bytes once (the I/O floor)
    extract        readapt extract BASE INSTRUCT -o DELTA
    merge-delta    readapt merge BASE --add DELTA:1 -o OUT
    merge-0.5      readapt merge BASE --add INSTRUCT:0.5 -o OUT    (the instruction-strength dial)
    mergekit-0.5   mergekit-yaml task_arithmetic, weight 0.5       (if a mergekit venv is given/found)

Throughput = (bytes read + bytes written) / wall time. Runs are interleaved round-robin so that the
comparison sees the same machine load; each run starts after `sync`; the table reports the median of
--repeat runs. With --readapt (repeatable), each readapt job runs once per named command in the same
round robin (e.g. `--readapt main=/other/venv/bin/readapt --readapt new=readapt`): a paired comparison.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_pair import make_pair  # noqa: E402


def timed(cmd: list[str] | str) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one command under /usr/bin/time -v, after `sync`, so that the
    previous run's dirty pages are not written back (and throttled) during this one."""
    subprocess.run(["sync"], check=True)
    shell = isinstance(cmd, str)
    full = f"/usr/bin/time -v {cmd}" if shell else ["/usr/bin/time", "-v", *cmd]
    r = subprocess.run(full, shell=shell, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"command failed: {cmd}\n{r.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return h * 3600 + m * 60 + s, rss / 1e6


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "_work")
    ap.add_argument("--mergekit", type=Path, default=Path("/work/mk-venv"), help="venv with mergekit 0.1.5")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--readapt", action="append", default=[], metavar="NAME=COMMAND",
                    help="a readapt command to time (repeat to compare builds; default: the one on PATH)")
    a = ap.parse_args()
    builds = dict(b.split("=", 1) for b in a.readapt) or {"": shutil.which("readapt") or f"{sys.executable} -m readapt"}
    mk = a.mergekit / "bin" / "mergekit-yaml"
    rows = []
    for layers in a.layers:
        pair = a.work / f"pair{layers}"
        if not (pair / "instruct" / "config.json").exists():
            make_pair(pair, layers=layers)
        base, inst, delta, out = pair / "base", pair / "instruct", a.work / "delta", a.work / "out"
        nb = size(base)
        cfg = a.work / "mergekit.yml"
        cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {inst}\n"
                       f"    parameters:\n      weight: 0.5\ndtype: float32\n")
        jobs = {"cat": (f"cat {' '.join(str(p) for p in sorted(base.glob('*.safetensors')) + sorted(inst.glob('*.safetensors')))} > /dev/null", 2 * nb)}
        for build, readapt in builds.items():
            tag = f"{build} " if build else ""
            jobs |= {
                f"{tag}extract": (f"{readapt} extract {base} {inst} -o {delta} --overwrite", 3 * nb),
                f"{tag}merge-delta": (f"{readapt} merge {base} --add {delta}:1 -o {out} --overwrite", 3 * nb),
                f"{tag}merge-0.5": (f"{readapt} merge {base} --add {inst}:0.5 -o {out} --overwrite", 3 * nb),
            }
        if mk.exists():
            jobs["mergekit-0.5"] = (f"{mk} {cfg} {a.work / 'mk-out'} --allow-crimes", 3 * nb)
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in jobs}
        for _ in range(a.repeat):
            for name, (cmd, _) in jobs.items():
                if name == "mergekit-0.5":
                    shutil.rmtree(a.work / "mk-out", ignore_errors=True)
                runs[name].append(timed(cmd))
        for name, (cmd, moved) in jobs.items():
            wall = statistics.median(w for w, _ in runs[name])
            rss = statistics.median(r for _, r in runs[name])
            rows.append((layers, nb / 1e9, name, wall, rss, moved / 1e9 / wall,
                         min(w for w, _ in runs[name]), max(w for w, _ in runs[name])))
    print("| layers | checkpoint GB | job | wall s (median) | wall min–max | peak RSS GB | GB/s read+written |")
    print("|---|---|---|---|---|---|---|")
    for layers, gb, name, wall, rss, tput, lo, hi in rows:
        print(f"| {layers} | {gb:.2f} | {name} | {wall:.2f} | {lo:.2f}–{hi:.2f} | {rss:.2f} | {tput:.2f} |")


if __name__ == "__main__":
    main()
