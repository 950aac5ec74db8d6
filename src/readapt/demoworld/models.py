"""The world's tiny models (Φ pretrained, Θ instruct, Φ₂ version 2) and their training loop.

Not readapt.train: these are full-model trainings from scratch (or from Φ) with per-example label masks
(loss on the assistant turn only) on batches sampled fresh from the world at every step, not a LoRA
adapter on a fixed corpus. Also the world checks' teacher-forced bio-completion probe.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import torch

from readapt.demoworld.settings import Settings
from readapt.demoworld.world import ATTRIBUTES, World, build_tokenizer, make_world

def model_config(s: Settings, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.mlp, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _bio_blocks(world: World, people, tok, rng: random.Random, batch: int, block: int) -> torch.Tensor:
    """[batch, block] token ids: freshly paraphrased bios of random `people`, EOS between, packed."""
    need, ids = batch * block, []
    while len(ids) < need:
        texts = [world.bio(rng.choice(people), rng) for _ in range(64)]
        for row in tok(texts, add_special_tokens=False)["input_ids"]:
            ids += row + [tok.eos_token_id]
    return torch.tensor(ids[:need]).view(batch, block)


def _chat_batch(world: World, s: Settings, tok, rng: random.Random, batch: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, labels, attention_mask) [batch, T]: chat QA, loss on the assistant turn (and its EOS).

    A share `reading_share` of examples ask about a stranger (world.stranger) with its bio as context
    (reading practice); the rest ask about A_train closed book."""
    rows, labels = [], []
    a_train = world["A"][: len(world["A"]) // 2]
    for _ in range(batch):
        if rng.random() < s.reading_share:
            p = world.stranger(rng)
            msgs = world.chat(p, rng.choice(ATTRIBUTES), rng, context=world.bio(p, rng))
        else:
            msgs = world.chat(rng.choice(a_train), rng.choice(ATTRIBUTES), rng)
        prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        rows.append(f_ids)
        labels.append([-100] * len(p_ids) + f_ids[len(p_ids) :])
    T = max(map(len, rows))
    pad = tok.pad_token_id
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    lab = torch.tensor([l + [-100] * (T - len(l)) for l in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return ids, lab, mask


def train_model(model, batches, steps: int, lr: float, desc: str, log: list | None = None):
    """Full-model AdamW training on `batches()` -> (input_ids, labels, attention_mask); returns the model."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _schedule(i, steps, max(1, steps // 20)))
    model.train()
    import multiprocessing

    worker = multiprocessing.current_process().name != "MainProcess"  # no interleaved bars from workers
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0, disable=worker)
    for step in bar:
        ids, labels, mask = batches()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log is not None:
            log.append({"model": desc, "step": step, "loss": round(loss.item(), 4)})
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def train_world_model(s: Settings, seed: int, which: str, folder: Path) -> Path:
    """Train one of the world's models with the plain loop above and save it to `folder / which`:

    pretrained     Φ  from scratch on A's bios
    instruct       Θ  Φ fine-tuned on chat QA (loss on the answer): A_train closed book, and strangers with
                      their bio as context; a share `rehearsal_share` of steps are A's bios again: without
                      them the tiny model forgets what it read and learns the A_train answers by rote
                      (measured on held-out A: 44% after 50 chat-only steps, 30% after 100, 20% after 300;
                      89% after 100 steps with rehearsal, 94% after 200). A large model keeps its knowledge
                      through instruction tuning; rehearsal stands in for that here.
    pretrained_v2  Φ₂ Φ pre-trained further on A's and C's bios ("more text")
    Each job has its own seeds, so jobs give the same model in any order or process.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    world, tok = make_world(seed, dict(s.sizes)), build_tokenizer()
    torch.manual_seed(int(hashlib.sha256(f"{seed}/{which}".encode()).hexdigest()[:8], 16))
    rng = random.Random(f"{seed}/training/{which}")
    log: list[dict] = []

    def lm(people):
        def batches():
            x = _bio_blocks(world, people, tok, rng, s.batch, s.block)
            return x, x, None
        return batches

    if which == "pretrained":
        model = AutoModelForCausalLM.from_config(model_config(s, len(tok)))
        train_model(model, lm(world["A"]), s.pretrain_steps, s.pretrain_lr, which, log)
    elif which == "instruct":
        model = AutoModelForCausalLM.from_pretrained(folder / "pretrained", local_files_only=True)
        def batches():
            if rng.random() < s.rehearsal_share:
                return lm(world["A"])()
            return _chat_batch(world, s, tok, rng, s.batch)

        train_model(model, batches, s.instruct_steps, s.instruct_lr, which, log)
    elif which == "pretrained_v2":
        model = AutoModelForCausalLM.from_pretrained(folder / "pretrained", local_files_only=True)
        train_model(model, lm(world["A"] + world["C"]), s.v2_steps, s.v2_lr, which, log)
    else:
        raise ValueError(which)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(folder / which)
    tok.save_pretrained(folder / which)
    with open(folder / which / "training_log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    return folder / which


# --- world-quality checks (not the papers' metrics: quick teacher-forced probes) ------------------------

_PROBES = {  # unambiguous prefixes whose next words are the value
    "city": "The birth city of {n} is", "year": "The birth year of {n} is",
    "university": "{n} studied at", "employer": "{n} works for",
}


@torch.no_grad()
def bio_completion(model, tok, people) -> float:
    """% of (person, attribute) facts whose value the model predicts greedily (teacher-forced) after a
    bio prefix such as "The birth city of F L is"."""
    hits = total = 0
    for a in ATTRIBUTES:
        prefix = [tok(_PROBES[a].format(n=p.name), add_special_tokens=False)["input_ids"] for p in people]
        value = [tok(p.value(a), add_special_tokens=False)["input_ids"] for p in people]
        ids = torch.tensor([x + v for x, v in zip(prefix, value)])  # same length within an attribute
        pred = model(input_ids=ids).logits.argmax(-1)
        n = len(prefix[0])
        hits += (pred[:, n - 1 : ids.shape[1] - 1] == ids[:, n:]).all(-1).sum().item()
        total += len(people)
    return 100.0 * hits / total

