"""readapt: weight arithmetic for open LLM families (RE-Adapt, LoRE-Adapt, partial adaptation, PortLLM).

The public API is a handful of typed functions; each CLI subcommand is a thin layer over one of them.

    readapt.extract(base, tuned, out)                       # RE-Adapter Δ = Θ − Φ
    readapt.merge(base, out, [(delta, 0.5), (lora, 0.5)])   # Ω = Φ + Σ sᵢ·Ψᵢ, a HF model folder
    readapt.load_merged(base, [(delta, 0.5)])               # the same Ω in memory

Modules import transformers/peft/matplotlib lazily, so `import readapt` costs about one `import torch`.
"""

__version__ = "0.1.0"

from readapt.errors import ReadaptError  # noqa: E402
from readapt.checkpoint import Checkpoint  # noqa: E402
from readapt.delta import extract  # noqa: E402
from readapt.merge import load_merged, merge  # noqa: E402

__all__ = ["__version__", "ReadaptError", "Checkpoint", "extract", "merge", "load_merged"]
