"""Memory and time of reading a hostile safetensors header.

    python benchmarks/bench_header.py [--work benchmarks/_work/header] [--mb 99] [--src OTHER/src]

Builds (once) a folder whose `model.safetensors` has a header of about --mb MB (just under the 100 MB
cap by default): 1.5 million one-element float32 tensors, valid in every respect, the worst case of
many small JSON objects. Then times, each in a fresh process under `/usr/bin/time -v` (wall clock and
peak RSS, `import readapt` included):

    import            python -c "import readapt.checkpoint"         (the floor)
    open              Checkpoint.open(folder): parse and validate the header
    safetensors       safetensors.safe_open(file).keys(): the reference parser (Rust)
    over-cap          Checkpoint.open on the same file with its header length set 1 byte over the cap

CPU seconds (user + system) are reported beside wall seconds: on a shared machine they vary less.
--src runs the same code against another readapt source tree (e.g. an older commit exported with
`git archive`), for before/after figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(folder: Path, mb: float) -> Path:
    """A valid safetensors file whose JSON header is about `mb` MB (many 1-element F32 tensors)."""
    f = folder / "model.safetensors"
    if f.is_file():
        return f
    folder.mkdir(parents=True, exist_ok=True)
    entry = len('"t0000000":{"dtype":"F32","shape":[1],"data_offsets":[00000000,00000000]},')
    n = int(mb * 1e6 * 0.995) // entry
    parts = ['{"__metadata__":{"format":"pt"}']
    parts += [f',"t{i:07d}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(n)]
    raw = ("".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    with open(f, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        out.write(b"\0" * (4 * n))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return f


def over_cap(src: Path, folder: Path) -> Path:
    """The same file with the header length field set to the cap + 1 (the file is long enough)."""
    f = folder / "model.safetensors"
    if not f.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        data = bytearray(src.read_bytes())
        data[:8] = struct.pack("<Q", 100_000_001)
        f.write_bytes(bytes(data) + b" " * max(0, 100_000_009 - len(data)))
    return f


def timed(code: str, src: Path | None) -> tuple[float, float, float, str]:
    """(wall s, CPU s, peak RSS GB, last line of output) of `python -c code` under /usr/bin/time -v."""
    env = {**os.environ, "PYTHONPATH": str(src)} if src else None
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", r.stderr).group(1)) for k in ("User", "System"))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    out = (r.stdout.strip().splitlines() or ["?"])[-1]
    return h * 3600 + m * 60 + s, cpu, rss / 1e6, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "header")
    ap.add_argument("--mb", type=float, default=99.0)
    ap.add_argument("--src", type=Path, default=None, help="readapt source tree to import instead (PYTHONPATH)")
    a = ap.parse_args()
    f = build(a.work / "ok", a.mb)
    big = over_cap(f, a.work / "over")
    header_mb = struct.unpack("<Q", f.read_bytes()[:8])[0] / 1e6
    opening = ("from readapt.checkpoint import Checkpoint\nfrom readapt.errors import ReadaptError\n"
               "try:\n    print(len(Checkpoint.open({!r}).names), 'tensors')\n"
               "except ReadaptError as e:\n    print(str(e)[:120])")
    runs = {
        "import": "import readapt.checkpoint; print('ok')",
        "open": opening.format(str(f.parent)),
        "safetensors": f"from safetensors import safe_open\nwith safe_open({str(f)!r}, 'pt') as s: "
                       f"print(len(list(s.keys())), 'tensors')",
        "over-cap": opening.format(str(big.parent)),
    }
    print(f"header: {header_mb:.1f} MB in {f}")
    print("| run | wall s | CPU s | peak RSS GB | result |\n|---|---|---|---|---|")
    for name, code in runs.items():
        wall, cpu, rss, out = timed(code, a.src)
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {rss:.2f} | {out} |")


if __name__ == "__main__":
    main()
