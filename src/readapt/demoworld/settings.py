"""What determines the demo world's models and experiments: `Settings`, the two presets, the grids."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Settings:
    """Everything that determines the trained models (the cache key hashes it)."""

    sizes: tuple[tuple[str, int], ...] = (("A", 200), ("B", 100), ("C", 100))
    # tiny Llama (4 layers, hidden 128, 4 heads, MLP 512, tied embeddings, ~0.8M parameters)
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    mlp: int = 512
    # full-model training of Φ, Θ, Φ₂ (batch x block tokens per step, AdamW, warm-up + cosine decay)
    batch: int = 64
    block: int = 64
    pretrain_steps: int = 300
    pretrain_lr: float = 2e-3
    instruct_steps: int = 200
    instruct_lr: float = 1e-3
    reading_share: float = 0.5  # share of instruct examples that carry a bio as context (a stranger's)
    rehearsal_share: float = 0.5  # share of instruct steps that are A's bios again (see train_world_model)
    v2_steps: int = 200
    v2_lr: float = 1e-3
    # adapters trained with readapt.train (LoRA on all linear layers)
    lora_rank: int = 32
    lora_alpha: int = 64  # s = alpha / r = 2, as in the paper (r=64, alpha=128)
    lora_lr: float = 2e-3
    lora_copies: int = 150  # paraphrased bios of each person of B in the knowledge corpus (1 epoch)
    task_examples: int = 6000  # chat QA examples in the task corpus (PortLLM patch)
    lora_batch: int = 16  # blocks of lora_block tokens per step
    lora_block: int = 128
    version: int = 1  # bump when the training code changes: invalidates caches

    def key(self, seed: int) -> str:
        blob = json.dumps({**asdict(self), "seed": seed}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


QUICK = Settings(  # a smaller world and model: the same pipeline in ~2 minutes (numbers are noisier)
    sizes=(("A", 40), ("B", 20), ("C", 20)), layers=2, batch=32, pretrain_steps=120, pretrain_lr=3e-3,
    instruct_steps=100, v2_steps=50, lora_rank=16, lora_alpha=32, lora_copies=400, task_examples=2000, lora_block=64,
)
FULL = Settings()

METRICS = ("rouge_l_recall", "contains_em")
EM, RL = "contains_em", "rouge_l_recall"
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
GEN = dict(max_new_tokens=16, batch_size=128, quiet=True)  # answers are sentences of <= 10 words
MARGIN = 5.0  # points: one seed of 100 people per split cannot separate smaller differences
