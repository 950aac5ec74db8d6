"""The demo world, end to end: both papers' experiments on a CPU (`readapt demo`).

    demo("readapt-demo")                 # default world, seeds 0, 1, 2
    demo("readapt-demo", quick=True)     # a smoke test: a smaller world, the same pipeline, one seed
    capacity_sweep("readapt-capacity")   # the closed-book experiments at three model sizes

1. A synthetic world (world.py) and three tiny Llama models trained here with a plain loop (models.py):
   Φ  "pretrained": next-token prediction on population A's bios,
   Θ  "instruct":   Φ tuned on chat QA (reading first, then closed book on A_train; MLPs as Φ's),
   Φ₂ "version 2":  Φ pre-trained further on A's and C's bios, saved at several step counts (drift).
2. Every method then runs through the public functions a user calls (experiments.py): readapt.train
   (knowledge adapters Ψ, LoRA and DoRA, on B's bios), readapt.extract (Δ = Θ − Φ), readapt.extract_lowrank
   (LoRE-Adapt at several τ), readapt.sweep / readapt.evaluate (Φ + αΨ + βΔ, closed book, BM25 and oracle
   RAG), readapt.port (PortLLM: a task LoRA trained on Φ carried to each Φ₂ with no training).
3. plan.py lists these as jobs for every seed; jobs.py runs them on two single-threaded worker processes
   with one progress bar; everything is cached (~/.cache/readapt/demo/<key>).
4. checks.py measures whether this world can test each claim (world checks); claims.py states the papers'
   comparisons; verdicts.py judges them by one rule over seeds; report.py, figures.py and readme.py write
   the tables, figures, README, KEY and results.json.
"""

from readapt.demoworld.run import capacity_sweep, demo

__all__ = ["capacity_sweep", "demo"]
