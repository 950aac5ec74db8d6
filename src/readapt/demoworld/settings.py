"""What determines the demo world's models and experiments: `Settings`, the presets, the grids."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Settings:
    """Everything that determines the trained models (the cache key hashes it)."""

    sizes: tuple[tuple[str, int], ...] = (("A", 100), ("B", 50), ("C", 50))
    # half the people (A 50, B 25, C 25; Φ 400 steps, 750 task examples): every world check failed (README)
    # tiny Llama (tied embeddings). Smaller, for speed (cold demo, seeds 0-2, README): 3 layers 14.9 min, but the task
    # patch learned 65.2 (fails); hidden 112, MLP 448: 18.1 min in a slow hour, reading 61.0 (fails)
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    mlp: int = 512
    # full-model training of Φ, Θ, Φ₂ (AdamW, warm-up + cosine decay; batches drawn fresh from the world)
    batch: int = 16  # rows of `block` tokens per pre-training step
    block: int = 64
    pretrain_steps: int = 600
    pretrain_lr: float = 2e-3
    # Θ phase 1: reading only (strangers with their bio as context); phase 2: reading and closed-book A_train QA.
    # 600 + 200 steps against 800 + 300, seeds 0-2, in 27% less time: held-out A 90.0, 92.8, 97.8 (was 92.0, 93.8,
    # 100), oracle reading 100, 99.0, 97.3 (100, 100, 99.1), room for both 86.5, 78.9, 85.9 (81.2, 79.4, 85.4; both
    # with version 6's Ψ; with version 7's: 84.9, 77.4, 85.9). 600 + 300, in 9% less time: held-out A 93.0, 96.9,
    # room 84.4, 78.9 (seeds 0-1)
    read_steps: int = 600
    instruct_steps: int = 200
    instruct_batch: int = 16  # chat examples per step
    instruct_lr: float = 1e-3
    instruct_lr2: float = 1e-3  # phase 2 (its own warm-up and decay)
    reading_share: float = 0.5  # phase 2 share of chat examples that carry a stranger's bio as context
    distill_rows: int = 8  # rows of bios per Θ step on which Θ is pulled towards Φ's predictions (models._anchor)
    distill_weight: float = 1.0  # weight of that KL term in phase 1
    distill_weight2: float = 4.0  # and in phase 2
    instruct_frozen: tuple[str, ...] = ("mlp",)  # parameters (by name) instruction tuning leaves as Φ has them
    # version 2 = Φ pre-trained further on A's and C's bios: snapshots. Relative weight drift (seed 0) after 2, 5,
    # 10, 20, 200 steps: 0.4%, 1.6%, 4.5%, 8.7%, 18%; a 5-epoch task patch ported there keeps held-out A at 91,
    # 92, 79.5, 67, 51 (on Φ: 90.5). 5 steps is the small drift where porting holds.
    v2_steps: tuple[int, ...] = (5, 20, 200)
    v2_lr: float = 1e-3
    # adapters trained with readapt.train (all linear layers)
    lora_rank: int = 64  # the paper's r=64, alpha=128 (s = 2). At r=32 Δ erased more of Ψ: room for both on
    lora_alpha: int = 128  # seeds 0-2 75.7, 82.3, 77.6 (mean 78.5, fails 80); r=64 83.3, 84.5, 88.4 (79.5, 83.0,
    # 85.9 since version 6 reordered Ψ's text); r=8 64 (seed 0)
    lora_lr: float = 2e-3
    lora_copies: int = 75  # paraphrased bios of each person of B in the knowledge corpus (1 epoch)
    replay: float = 0.5  # A's bios in the knowledge corpus, as a share of B's (see world.py: without, Ψ erases A)
    task_examples: int = 1500  # closed-book chat QA examples on A_train in the task corpus (PortLLM patch)
    # the task patch: small steps, no dropout. Held-out A, seeds 0-2 (contains-EM; Φ alone 30.5, 48.5, 46): batch
    # 16 with reading rows 25, 11.5, 18; closed book only, batch 2: 58.5, 40.5, 51 (batch 4: 48, 38.5, 42.5), and
    # dropout 0: 49, 39, 68 (training seed 0; the demo's seeds: 49, 40, 49.5) in 13 s a patch instead of 17.
    # Seed 0, batch 16: 3 epochs 52.5, 6 epochs 63.5; loss on the answer only: no better (45.5 at 3 epochs).
    # It answered every question about a person with one of its facts, whichever was asked; it needs more steps,
    # not more rank or data: rank 16, alpha 64, 5 epochs: 90.5, 71, 88.5 (75-86 s a patch, two at once); 3 epochs
    # at lr 5e-3: 59.5, 68; 5 epochs on a fifth of the corpus: 41, 32; without A's bios: 66, 38.5; attention only,
    # 2 epochs: 52.5, 49.
    task_batch: int = 2
    task_dropout: float = 0.0
    task_rank: int = 16
    task_alpha: int = 64
    task_epochs: int = 5
    # the knowledge adapters learn by optimizer steps: half the corpus (75 copies instead of 150) in batches of 8
    # instead of 16 is as many steps in half the time. Ψ (LoRA; seeds 0-2, the first half of version 7's corpus):
    # B learned 94.5, 95.5, 97.5 (96, 95, 99.5), room for both 86.8, 78.5, 87.2 (84.9, 77.4, 85.9), 40-42 s (82-97);
    # DoRA B 94.5, 95, 96.5; in the demo (version 8): B 96, 95.5, 99, room 86.5, 78.0, 80.8. A quarter in batches
    # of 4: room 75.1, 80.0, 81.1 (fails); 100 copies in batches of 16 (fewer steps): 78.7, 77.6, 85.6
    lora_batch: int = 8  # blocks of lora_block tokens per step
    lora_block: int = 128
    version: int = 8  # bump when the training code changes: invalidates caches

    def key(self, seed: int) -> str:
        blob = json.dumps({**asdict(self), "seed": seed}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{self.layers} layers, hidden {self.hidden}"


FULL = Settings()
QUICK = replace(  # a smaller world and model: the same pipeline in about 2 minutes; a smoke test (see run.py)
    FULL, sizes=(("A", 40), ("B", 20), ("C", 20)), layers=2, pretrain_steps=150, pretrain_lr=3e-3, read_steps=100,
    instruct_steps=100, v2_steps=(5, 40), lora_rank=16, lora_alpha=32, lora_copies=50, task_examples=600,
    lora_block=64,
)
CAPACITY = (  # `readapt demo --capacity-sweep`: the default world at three model sizes (0.15M, 1.08M, 2.41M weights)
    replace(FULL, layers=2, hidden=64, heads=2, mlp=256),
    FULL,
    replace(FULL, hidden=192, mlp=768),
)

METRICS = ("rouge_l_recall", "contains_em")
EM, RL = "contains_em", "rouge_l_recall"
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # RE-Adapt's (α, β) sweep (and Figure 6: its α=0 row)
COARSE = (0.0, 0.5, 1.0)  # the DoRA-Ψ and LoRE sweeps: their claims read the chosen cell, α=β=0.5 and α=β=1
TAUS = (0.3, 0.5, 0.7, 0.9, 0.99)  # LoRE-Adapt energy thresholds of the τ curve
SELECT = ("the (α, β) cell with the highest contains-EM on the validation half of the closed-book questions "
          "(B in-domain and held-out A together, one vote per question; B and A have equally many)")
GEN = {"max_new_tokens": 16, "batch_size": 128, "quiet": True}  # answers are sentences of <= 10 words
