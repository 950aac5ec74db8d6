"""The demo's cache: where it lives, and the source hash that invalidates cached experiment results."""

from __future__ import annotations

import hashlib
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
