"""The demo world, end to end: both papers' experiments on a CPU in minutes (`readapt demo`).

    demo("readapt-demo")                 # default world
    demo("readapt-demo", quick=True)     # a smaller world, the same pipeline (the test suite runs it)

1. A synthetic world (world.py) and three tiny Llama models trained here with a plain loop (models.py):
   Φ  "pretrained": next-token prediction on population A's bios,
   Θ  "instruct":   Φ fully fine-tuned on chat QA (A_train closed book + reading practice on strangers),
   Φ₂ "version 2":  Φ pre-trained further on more text (A's and C's bios).
   They are cached by world and settings (~/.cache/readapt/demo/<key>, cache.py), as Hugging Face folders.
2. Every method then runs through the public functions a user calls (experiments.py): readapt.train
   (knowledge adapters Ψ on B's bios), readapt.extract (Δ = Θ − Φ), readapt.extract_lowrank (LoRE-Adapt,
   τ=0.5), readapt.load_merged / readapt.evaluate / readapt.sweep (Φ + αΨ + βΔ, closed book, BM25 and
   oracle RAG), readapt.port (PortLLM: a task LoRA trained on Φ carried to Φ₂ with no training).
3. Tables (paper shapes), plots and a README go to the output folder (report.py); the summary says which
   of the papers' claims reproduced in this world.
"""

from readapt.demoworld.run import capacity_sweep, demo

__all__ = ["capacity_sweep", "demo"]
