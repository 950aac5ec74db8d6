"""readapt: weight arithmetic for open LLM families (RE-Adapt, LoRE-Adapt, partial adaptation, PortLLM).

The public API is a handful of typed functions; each CLI subcommand is a thin layer over one of them.
Imports are lazy so that `import readapt` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "ReadaptError": "readapt.errors",
    "Checkpoint": "readapt.checkpoint",
    "extract": "readapt.delta",
    "merge": "readapt.merge",
    "load_merged": "readapt.merge",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'readapt' has no attribute {name!r}")


__all__ = ["__version__", *_API]
