"""readapt: weight arithmetic for open LLM families (RE-Adapt, LoRE-Adapt, partial adaptation, PortLLM).

The public API is a handful of typed functions; each CLI subcommand is a thin layer over one of them.

    readapt.extract(base, tuned, out)                        # RE-Adapter Δ = Θ − Φ          (delta.py)
    readapt.extract_lowrank(base, tuned, out, tau=0.5)       # LoRE-Adapter as a PEFT LoRA    (lowrank.py)
    readapt.compress(delta, out, tau=0.5); readapt.spectrum(...)                (lowrank.py, spectra.py)
    readapt.merge(base, out, [(delta, 0.5), (lora, 0.5)])    # Ω = Φ + Σ sᵢ·Ψᵢ, a HF folder   (merging.py)
    readapt.load_merged(base, [(delta, 0.5)])                # the same Ω in memory
    readapt.fold(base, out, [(lora, 0.5), (delta, 0.5)], rank=64)   # the same Ω as one PEFT LoRA  (folding.py)
    readapt.train(base, ["corpus.jsonl"], out)               # knowledge adapter (LoRA/DoRA)  (training.py)
    readapt.port(patch, new_base, out)                       # PortLLM                        (porting.py)
    readapt.evaluate(...), readapt.sweep(...), readapt.score(...)                          (evaluation.py)
    readapt.rouge_l_recall(...), readapt.contains_em(...)                                  (metrics.py)
    readapt.demo()                                           # the synthetic world            (demoworld/)

Modules import transformers/peft/matplotlib/bm25s lazily, so `import readapt` costs about one
`import torch`. No module is named like a function here: `readapt.merge` is the function and
`readapt.merging` its module, so `import readapt.merging as m` gives the module.
"""

from readapt._version import __version__
from readapt.errors import ReadaptError
from readapt.checkpoint import Checkpoint
from readapt.delta import extract
from readapt.merging import load_merged, merge
from readapt.lowrank import compress, extract_lowrank
from readapt.folding import fold
from readapt.spectra import spectrum
from readapt.training import train
from readapt.porting import port
from readapt.metrics import contains_em, rouge_l_recall
from readapt.evaluation import evaluate, score, sweep
from readapt.demoworld import demo

__all__ = ["__version__", "ReadaptError", "Checkpoint", "extract", "extract_lowrank", "compress", "spectrum",
           "merge", "load_merged", "fold", "train", "port", "evaluate", "sweep", "score", "rouge_l_recall",
           "contains_em", "demo"]
