"""The demo's cache: where it lives, the source hash that invalidates results, build-once folders."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

def default_cache_dir() -> Path:
    """$READAPT_DEMO_CACHE, else $XDG_CACHE_HOME/readapt/demo, else ~/.cache/readapt/demo."""
    import os

    if os.environ.get("READAPT_DEMO_CACHE"):
        return Path(os.environ["READAPT_DEMO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "readapt" / "demo"


def source_hash() -> str:
    """Hash of readapt's own source: cached results are recomputed whenever any module changes."""
    h = hashlib.sha256()
    package = Path(__file__).parent.parent
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + f.read_bytes())
    return h.hexdigest()[:12]


def _build_once(folder: Path, build) -> Path:
    """`folder` if it is complete, else `build(tmp)` into a temporary sibling renamed to `folder` at the end."""
    import os
    import shutil

    if (folder / ".complete").exists():
        return folder
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        build(tmp)
        (tmp / ".complete").write_text(json.dumps({  # how long the cold build took, and how busy the machine was
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.perf_counter() - t0, 1),
            "load_average": round(os.getloadavg()[0], 1), "cores": len(os.sched_getaffinity(0))}) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _cold_record(folder: Path) -> dict:
    """What `_build_once` recorded when it built `folder` (NaN for caches written before it recorded)."""
    import os

    try:
        return json.loads((folder / ".complete").read_text())
    except ValueError:
        return {"seconds": math.nan, "load_average": math.nan, "cores": len(os.sched_getaffinity(0))}

