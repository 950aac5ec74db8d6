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

from readapt.demoworld.jobs import tick
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


def _chat_rows(world: World, tok, msgs_list: list[list[dict]]) -> tuple[torch.Tensor, ...]:
    """(input_ids, labels, attention_mask) [n, T] of chat examples: loss on the assistant turn (and its EOS)."""
    rows, labels = [], []
    for msgs in msgs_list:
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


def chat_example(world: World, rng: random.Random, reading_share: float) -> list[dict]:
    """One instruct example: with probability `reading_share` a question about a stranger (world.stranger)
    with its bio as context (reading), else a closed-book question about a person of A_train."""
    if rng.random() < reading_share:
        p = world.stranger(rng)
        return world.chat(p, rng.choice(ATTRIBUTES), rng, context=world.bio(p, rng))
    a_train = world["A"][: len(world["A"]) // 2]
    return world.chat(rng.choice(a_train), rng.choice(ATTRIBUTES), rng)


def _instruct_batches(world: World, s: Settings, tok, rng: random.Random, reading_share: float):
    """Chat batches of `s.instruct_batch` examples (chat_example)."""
    def batches():
        return _chat_rows(world, tok, [chat_example(world, rng, reading_share) for _ in range(s.instruct_batch)])
    return batches


def _anchor(world: World, s: Settings, tok, rng: random.Random, teacher, weight: float):
    """The plain-text anchor of instruction tuning: `s.distill_rows` rows of bios (A's or, as often, strangers'),
    on which the model is pulled towards `teacher`'s (Φ's) next-token distributions."""
    def blocks():
        pool = world["A"] if rng.random() < 0.5 else [world.stranger(rng) for _ in range(64)]
        return _bio_blocks(world, pool, tok, rng, s.distill_rows, s.block)
    return teacher, blocks, weight


def train_model(model, batches, steps: int, lr: float, desc: str, log: list, share: float = 1.0, snapshots=None,
                anchor=None):
    """Full-model AdamW on `batches()` -> (input_ids, labels, attention_mask), warm-up then cosine decay.

    With `anchor` = (teacher, blocks(), w) the loss is CE + w · KL(teacher ‖ model), the KL averaged over the
    tokens of `blocks()` (plain text): the model keeps the teacher's predictions where the task does not need
    them changed. Reports `share / steps` of the running job per step (jobs.tick); `snapshots` {step: fn(model)}
    are called after those steps. Returns the model in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _schedule(i, steps, max(1, steps // 20)))
    model.train()
    for step in range(steps):
        ids, labels, mask = batches()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        record = {"model": desc, "step": step, "loss": round(loss.item(), 4)}
        if anchor:
            teacher, blocks, w = anchor
            x = blocks()
            with torch.no_grad():
                t = teacher(input_ids=x).logits.log_softmax(-1)
            kl = (t.exp() * (t - model(input_ids=x).logits.log_softmax(-1))).sum(-1).mean()
            loss = loss + w * kl
            record["kl"] = round(kl.item(), 4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.append(record)
        tick(share / steps)
        if snapshots and step + 1 in snapshots:
            snapshots[step + 1](model.eval())
            model.train()
    return model.eval()


def _save(model, tok, folder: Path) -> Path:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train_world_model(s: Settings, seed: int, which: str, models: Path) -> Path:
    """Train one of the world's models into `models / which` (the model in `model/`, or the snapshots
    `step_<k>/` of version 2; the loss log beside them in training_log.jsonl):

    pretrained     Φ  from scratch on A's bios. 600 steps: Φ completes 100% of A's facts on seeds 0 and 1 (400
                      steps: 98% and 72%, which sank seed 1's held-out A to 66%; now 92-94%) and leaves more
                      room for Ψ and Δ (seed 0: 66 -> 76, seed 1: 58 -> 80); 1000 steps: room 74 on seed 0.
    instruct       Θ  Φ fine-tuned on chat QA (loss on the answer) in two phases: `read_steps` of reading
                      only (a stranger's bio as context: nothing to recall, so the model must learn to copy),
                      then `instruct_steps` mixing reading with closed-book A_train questions. The MLPs (where
                      the facts are; `instruct_frozen`) stay Φ's, and at every step `distill_rows` rows of plain
                      bios (A's or strangers') pull Θ towards Φ's next-token predictions (a KL anchor, `_anchor`):
                      plain text keeps its base-model behaviour, as in a large model whose instruction tuning is
                      small next to its pre-training.
                      Measured on seed 0 (oracle reading and closed-book held-out A: contains-EM; B's facts:
                      bio completion under Φ+Ψ+Δ, of 94% under Φ+Ψ; "ROOM" = the world check):
                      - reading is a late phase change: teacher-forced reading of B was 5% after 200 reading
                        steps, 49% after 400 (the former default; 20-48% after phase 2), 93% after 500 and
                        100% after 600 of an 800-step phase; hence read_steps=800 (oracle 97%, held-out A 96%
                        with the former rehearsal rows). A 600-step phase (its own schedule) reads as well
                        (oracle 97-100% on seeds 0-2, settings.read_steps). Mixing from the start never learns
                        to read (5%).
                      - Δ erases B: with rehearsal rows of A's bios (LM loss) instead of the anchor, B fell to
                        33% under Φ+Ψ+Δ (ROOM 35). Δ lowers A's bio completion only 3 points (Φ+Δ 94 vs Φ 98):
                        A is rehearsed, B cannot be, so this is erasure, not a format shift. Without any
                        rehearsal held-out A fell to 42% (Δ erases every population's recall). The KL anchor
                        instead, weight 1 in both phases: oracle 100%, held-out A 97%, B 56.5% under Φ+Ψ+Δ
                        (ROOM 60), RE-Adapt α=β=1 on B 53% (21% with rehearsal); weight 4 in both: ROOM 76
                        (B 71.5%) but oracle 48% (the anchor slows the reading phase change); weight 1 then 4
                        (the default): oracle 100%, held-out A 97%, B 63% (ROOM 67), Δ 0.21 of Φ per layer.
                        Which part of Δ erases B (B under Φ+Ψ+Δ restricted to one part of Δ, seed 0, 400
                        pre-training steps): embeddings none (94%), attention all of it (40.5%), in layer 0
                        (56%; layers 1-3 alone >= 90%), q/k and v/o alike (65.5, 64.5). With 600 steps it is
                        spread over layers 0-1, mostly v/o (74.5; q/k 92). Reading needs layer 0's attention
                        (frozen: reading 5%), so reading and B's recall compete for early attention, and the
                        anchor cannot protect the name composition of people Φ never saw.
                        With Ψ at rank 32 room for both stayed short of 80, and width did not fix it: 78.5 ±
                        3.4 at hidden 128, 79.6 ± 4.5 at hidden 192 (capacity sweep, seeds 0-2, 2026-12-02);
                        Ψ at the paper's rank 64 did (83.3, 84.5, 88.4; rank 8: 64 on seed 0): a Ψ of higher
                        rank keeps more of B under Δ (settings.lora_rank).
                      - tried and rejected: an anchor on hidden states (relative L2 per layer) besides the KL:
                        weight 1 changes nothing (ROOM 65), weight 20 ROOM 79 but reading 7%; layer 0 and the
                        MLPs frozen: ROOM 75.5, reading 5%; Θ's embeddings frozen (reading plateaus at 55% after 800 steps;
                        3% after 400), embeddings at 0.1x the learning rate (oracle 72%, held-out A 84%, ROOM
                        57), reading contexts with 0-2 distractor bios (oracle 6%), a Ψ on the MLPs only or
                        trained 2 epochs (B under Φ+Ψ+Δ 38% either way: a stronger Ψ is erased all the same),
                        MLPs trained (Δ 0.31 of Φ per layer instead of 0.19; B 29% instead of 40%).
                      - tried for Φ: pre-training on "stranger documents" (30% of documents: a stranger's bio,
                        then its facts restated in other paraphrases) so that Φ reads before instruction
                        tuning. After 800 steps Φ predicted 2.5-5% of the restated values (chance level) and
                        completed 43% of A's facts (98% without them after 400): not learned at this size.
    pretrained_v2  Φ₂ Φ pre-trained further on A's and C's bios ("more text"), saved after each of
                      `v2_steps` steps (version drift growing with k)
    Each job has its own seeds, so jobs give the same model in any order or process."""
    from transformers import AutoModelForCausalLM

    world, tok = make_world(seed, dict(s.sizes)), build_tokenizer()
    torch.manual_seed(int(hashlib.sha256(f"{seed}/{which}".encode()).hexdigest()[:8], 16))
    rng = random.Random(f"{seed}/training/{which}")
    log: list[dict] = []
    out = models / which

    def lm(people):
        def batches():
            x = _bio_blocks(world, people, tok, rng, s.batch, s.block)
            return x, x, None
        return batches

    if which == "pretrained":
        model = AutoModelForCausalLM.from_config(model_config(s, len(tok)))
        _save(train_model(model, lm(world["A"]), s.pretrain_steps, s.pretrain_lr, which, log), tok, out / "model")
    elif which == "instruct":
        model = AutoModelForCausalLM.from_pretrained(models / "pretrained" / "model", local_files_only=True)
        for name, param in model.named_parameters():
            param.requires_grad_(not any(part in name for part in s.instruct_frozen))
        teacher = AutoModelForCausalLM.from_pretrained(models / "pretrained" / "model", local_files_only=True).eval()
        total = s.read_steps + s.instruct_steps
        for steps, share, lr, w, desc in ((s.read_steps, 1.0, s.instruct_lr, s.distill_weight, "reading"),
                                          (s.instruct_steps, s.reading_share, s.instruct_lr2, s.distill_weight2, "mixed")):
            anchor = _anchor(world, s, tok, rng, teacher, w) if s.distill_rows else None
            train_model(model, _instruct_batches(world, s, tok, rng, share), steps, lr, f"instruct ({desc})", log,
                        steps / total, anchor=anchor)
        _save(model, tok, out / "model")
    elif which == "pretrained_v2":
        model = AutoModelForCausalLM.from_pretrained(models / "pretrained" / "model", local_files_only=True)
        snaps = {k: (lambda m, k=k: _save(m, tok, out / f"step_{k}")) for k in s.v2_steps}
        train_model(model, lm(world["A"] + world["C"]), max(s.v2_steps), s.v2_lr, which, log, snapshots=snaps)
    else:
        raise ValueError(which)
    with open(out / "training_log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    return out


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

