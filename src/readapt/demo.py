"""The demo world, end to end: both papers' experiments on a CPU in minutes (`readapt demo`).

    demo("readapt-demo")                 # default world, <= 10 min cold on 2 cores, seconds when cached
    demo("readapt-demo", quick=True)     # a smaller world, the same pipeline (the test suite runs it)

1. A synthetic world (readapt.world) and three tiny Llama models trained here with a plain loop:
   Φ  "pretrained": next-token prediction on population A's bios,
   Θ  "instruct":   Φ fully fine-tuned on chat QA (A_train closed book + reading practice on strangers),
   Φ₂ "version 2":  Φ pre-trained further on more text (A's and C's bios).
   They are cached by world and settings (~/.cache/readapt/demo/<key>), as Hugging Face folders.
2. Every method then runs through the public functions a user calls: readapt.train (knowledge
   adapters Ψ on B's bios), readapt.delta.extract (Δ = Θ − Φ), readapt.lowrank (LoRE-Adapt, τ=0.5),
   readapt.merge.load_merged / readapt.evaluate (Φ + αΨ + βΔ, closed book, BM25 and oracle RAG),
   readapt.port (PortLLM: a task LoRA trained on Φ carried to Φ₂ with no training).
3. Tables (paper shapes), plots and a README go to the output folder; the summary says which of the
   papers' claims reproduced in this world.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from readapt.userfiles import read_jsonl
from readapt.world import ATTRIBUTES, World, build_tokenizer, make_world

# --- settings ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything that determines the trained models (the cache key hashes it)."""

    sizes: tuple[tuple[str, int], ...] = (("A", 200), ("B", 100), ("C", 100))
    # tiny Llama (DESIGN.md: 4 layers, hidden 128, 4 heads, MLP 512, tied embeddings, ~0.8M parameters)
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


# --- the world's tiny models ---------------------------------------------------------------------------


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


# --- two cores: independent jobs in two single-threaded worker processes --------------------------------


def _single_thread() -> None:
    from transformers.utils import logging

    torch.set_num_threads(1)
    logging.disable_progress_bar()  # no "Loading weights" bars from the workers


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class Jobs:
    """Run independent jobs on `workers` single-threaded processes (tiny models use one core far better
    than two threads share it); with one worker, jobs run in this process as they are submitted."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_single_thread)

    def submit(self, fn, *args, **kwargs):
        return self.pool.submit(fn, *args, **kwargs) if self.pool else _Done(fn(*args, **kwargs))

    def close(self):
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


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


# --- data files (DESIGN.md's JSONL contracts) -----------------------------------------------------------


def write_data(world: World, s: Settings, folder: Path, seed: int) -> dict[str, Path]:
    """The world's files as a user would have them:

    knowledge.jsonl  unlabeled paraphrased bios of B ({"text"}) for knowledge adapters
    task.jsonl       chat-formatted QA (A_train closed book + strangers with context) as text, and A's bios (rehearsal),
                     for the PortLLM task patch
    qa.jsonl         closed-book questions on B (ids "B/...", in-domain) and A_test ("A/...", out-of-domain)
    qa_B.jsonl       B's questions alone, with passage ids (RAG); passages_B.jsonl: one bio per person of B
    qa_port.jsonl    A_test questions (the task) and C questions ("C/...", what only version 2 read)
    """
    from readapt.world import write_jsonl

    tok = build_tokenizer()
    rng = random.Random(f"{world.seed}/files/{seed}")
    half = len(world["A"]) // 2
    a_train, a_test = world["A"][:half], world["A"][half:]

    def tagged(pop, people=None):
        return [{**q, "id": f"{pop}/{q['id']}"} for q in world.questions(pop, people)]

    task = []
    for _ in range(s.task_examples):
        if rng.random() < s.reading_share:
            p = world.stranger(rng)
            msgs = world.chat(p, rng.choice(ATTRIBUTES), rng, context=world.bio(p, rng))
        else:
            msgs = world.chat(rng.choice(a_train), rng.choice(ATTRIBUTES), rng)
        task.append({"text": tok.apply_chat_template(msgs, tokenize=False).strip()})
    # rehearsal, as for the instruct model: A's bios beside the chat examples keep the patch from
    # learning the A_train answers by rote
    task += [{"text": t} for t in world.corpus("A", max(1, round(s.task_examples * s.rehearsal_share / len(world["A"]))), seed)]
    rng.shuffle(task)
    files = {
        "knowledge": write_jsonl(folder / "knowledge.jsonl", [{"text": t} for t in world.corpus("B", s.lora_copies, seed)]),
        "task": write_jsonl(folder / "task.jsonl", task),
        "qa": write_jsonl(folder / "qa.jsonl", tagged("B") + tagged("A", a_test)),
        "qa_B": write_jsonl(folder / "qa_B.jsonl", tagged("B")),
        "passages_B": write_jsonl(folder / "passages_B.jsonl", world.passages("B")),
        "qa_port": write_jsonl(folder / "qa_port.jsonl", tagged("A", a_test) + tagged("C")),
    }
    return files


# --- the experiments ------------------------------------------------------------------------------------

METRICS = ("rouge_l_recall", "contains_em")
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
GEN = dict(max_new_tokens=16, batch_size=128, quiet=True)  # answers are sentences of <= 10 words


def _by_domain(predictions: list[dict], keep: set[str] | None = None) -> dict[str, dict[str, float]]:
    """{"B": {metric: mean x100}, "A": ..., "C": ...} over the questions whose id is in `keep` (all if None);
    the domain is the id's prefix (the population)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in predictions:
        if keep is None or r["id"] in keep:
            d = out.setdefault(r["id"].split("/", 1)[0], {m: [] for m in METRICS})
            for m in METRICS:
                d[m].append(r[m])
    return {dom: {m: sum(v) / len(v) for m, v in d.items()} for dom, d in out.items()}


def _evaluate(work: Path, tag: str, model: Path, questions: Path, adds=(), keep=None, **kw) -> dict:
    """readapt.evaluate.evaluate, then per-domain scores from its predictions.jsonl."""
    from readapt.evaluation import evaluate

    out = work / "eval" / tag
    summary = evaluate(str(model), questions, out, adds=[(str(a), x) for a, x in adds], overwrite=True, **GEN, **kw)
    scores = _by_domain(read_jsonl(out / "predictions.jsonl"), keep)
    if "retrieval_accuracy" in summary:
        scores["retrieval_accuracy"] = summary["retrieval_accuracy"]
    return scores


# `readapt ARGS` in a child that reports its own peak RSS (VmHWM belongs to the process's own memory
# map, unlike ru_maxrss, which on Linux keeps the parent's size from before exec)
_CHILD = """import os, sys
from readapt.cli import main
rc = main(sys.argv[1:])
hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]
open(os.environ['READAPT_DEMO_HWM'], 'w').write(hwm)
sys.exit(rc)
"""


def _peak_rss(args: list[str], log: Path) -> tuple[float, float]:
    """Run `readapt ARGS` in a child process -> (its peak RSS in MB, wall seconds)."""
    import os
    import subprocess
    import sys

    hwm = log.with_suffix(".peak_kb")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-c", _CHILD, *args], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "READAPT_DEMO_HWM": str(hwm)}).returncode
    if rc != 0:
        raise RuntimeError(f"readapt {' '.join(args)} failed ({rc}); see {log}")
    peak = int(hwm.read_text()) / 1024
    hwm.unlink()
    return peak, time.perf_counter() - t0


def _train(*args, **kwargs) -> Path:
    """readapt.train.train, without its 'BASE looks like an instruct model' warning: the demo's pretrained
    tokenizer carries the chat template on purpose (every model is prompted the same way), and training
    on the instruct model is the baseline the table needs."""
    import warnings

    from readapt.training import train

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="BASE .* looks like an instruct")
        return train(*args, **kwargs)


def train_adapters(s: Settings, models: dict[str, Path], files: dict[str, Path], folder: Path, seed: int,
                   jobs: Jobs) -> dict[str, Path]:
    """The LoRA adapters, trained with readapt.train.train exactly as `readapt train` would:

    knowledge               Ψ on Φ, B's bios (RE-Adapt's knowledge adapter)
    knowledge_on_instruct   the same on Θ (the baseline RE-Adapt argues against: tuning the instruct model)
    task_v1 / task_v2       the PortLLM task patch (chat QA) on Φ, and re-trained on Φ₂
    """
    plan = {
        "knowledge": ("pretrained", "knowledge"), "knowledge_on_instruct": ("instruct", "knowledge"),
        "task_v1": ("pretrained", "task"), "task_v2": ("pretrained_v2", "task"),
    }
    running = [
        jobs.submit(_train, models[base], files[data], folder / name, rank=s.lora_rank, alpha=s.lora_alpha,
                    dora=False, lr=s.lora_lr, epochs=1, batch_size=s.lora_batch, max_length=s.lora_block,
                    warmup_steps=10, seed=seed, save_every=None, overwrite=True, quiet=True)
        for name, (base, data) in plan.items()
    ]
    for r in running:
        r.result()
    return {name: folder / name for name in plan}


def _cell(sweep_dir: Path, labels: tuple[str, ...], scales, keep: set[str]) -> dict:
    """Per-domain scores of one sweep cell (from its predictions file) on the questions in `keep`."""
    tag = "_".join(f"{k}={x:g}" for k, x in zip(labels, scales))
    return _by_domain(read_jsonl(sweep_dir / "predictions" / f"{tag}.jsonl"), keep)


def run_experiments(s: Settings, seed: int, models: dict[str, Path], adapters: dict[str, Path],
                    files: dict[str, Path], work: Path, jobs: Jobs) -> dict:
    """Every experiment of one seed through the public functions; returns raw per-domain scores (x100)."""
    import shutil

    from readapt.delta import extract
    from readapt.evaluation import split_validation, sweep
    from readapt.lowrank import extract_lowrank
    from readapt.spectra import spectrum

    phi, theta, phi2 = models["pretrained"], models["instruct"], models["pretrained_v2"]
    psi, psi_inst = adapters["knowledge"], adapters["knowledge_on_instruct"]
    res: dict = {"seed": seed}
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name):
        nonlocal t
        timings[name] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()

    # RE-Adapter Δ = Θ − Φ and its LoRE-Adapter (τ = 0.5), plus the spectrum report
    delta = extract(phi, theta, work / "re_adapter", overwrite=True)
    lore = work / "lore_adapter"
    res["lore"] = _lore_summary(extract_lowrank(phi, theta, lore, tau=0.5, overwrite=True))
    spectrum(phi, theta, work / "spectrum", tau=0.5, overwrite=True)
    lap("extract + LoRE + spectrum")

    # validation / test split of the closed-book questions (B in-domain, A_test out-of-domain)
    qs = read_jsonl(files["qa"])
    val, test = split_validation(len(qs), 0.5, seed)
    val_ids, test_ids = {qs[i]["id"] for i in val}, {qs[i]["id"] for i in test}

    # partial adaptation Ω = Φ + αΨ + βΔ on the grid, scales chosen on validation (RE-Adapt and LoRE-Adapt)
    grids, running = {}, {}
    for name, adapter in (("re_adapt", delta), ("lore_adapt", lore)):
        running[name] = jobs.submit(sweep, str(phi), [str(psi), str(adapter)], files["qa"], work / f"sweep_{name}",
                                    grid=list(GRID), val_fraction=0.5, seed=seed, select="contains_em",
                                    overwrite=True, **GEN)
    inst = {"instruct": jobs.submit(_evaluate, work, "instruct", theta, files["qa"], keep=test_ids),
            "instruct + knowledge adapter": jobs.submit(_evaluate, work, "instruct_knowledge", theta, files["qa"],
                                                        [(psi_inst, 1.0)], keep=test_ids)}
    for name, future in running.items():
        summary, folder = future.result(), work / f"sweep_{name}"
        cells = {}
        for a in GRID:
            for b in GRID:
                cells[f"{a:g},{b:g}"] = {"test": _cell(folder, ("alpha", "beta"), (a, b), test_ids),
                                         "val": _cell(folder, ("alpha", "beta"), (a, b), val_ids)}
        grids[name] = {"chosen": summary["best"]["scales"], "cells": cells}
    lap("sweeps")
    res["grids"] = grids
    rows = {
        "pretrained": grids["re_adapt"]["cells"]["0,0"]["test"],
        "pretrained + knowledge adapter": grids["re_adapt"]["cells"]["1,0"]["test"],
        "instruct": inst["instruct"].result(),
        "instruct + knowledge adapter": inst["instruct + knowledge adapter"].result(),
        "LoRE-Adapt (α=β=1)": grids["lore_adapt"]["cells"]["1,1"]["test"],
        "LoRE-Adapt (α=β=0.5)": grids["lore_adapt"]["cells"]["0.5,0.5"]["test"],
        "LoRE-Adapt (α, β chosen on validation)":
            grids["lore_adapt"]["cells"]["{:g},{:g}".format(*grids["lore_adapt"]["chosen"])]["test"],
        "RE-Adapt (α=β=1)": grids["re_adapt"]["cells"]["1,1"]["test"],
        "RE-Adapt (α=β=0.5)": grids["re_adapt"]["cells"]["0.5,0.5"]["test"],
        "RE-Adapt (α, β chosen on validation)":
            grids["re_adapt"]["cells"]["{:g},{:g}".format(*grids["re_adapt"]["chosen"])]["test"],
    }
    res["re_adapt"] = rows
    lap("instruct rows")

    # instruction strength (paper Figure 6): Φ + βΔ is the α=0 row of the RE-Adapt grid
    res["strength"] = {f"{b:g}": grids["re_adapt"]["cells"][f"0,{b:g}"] for b in GRID}

    # PortLLM: the task patch trained on version 1, carried to version 2 with no training (peak memory
    # measured in child processes, before the evaluations below load the cores)
    port_mem, port_s = _peak_rss(
        ["port", str(adapters["task_v1"]), "--to", str(phi2), "--from", str(phi), "-o", str(work / "ported"),
         "--merge", "--overwrite"], work / "port.log")
    retrain_mem, retrain_s = _peak_rss(
        ["train", str(phi2), "--data", str(files["task"]), "-o", str(work / "retrain_probe"), "--rank",
         str(s.lora_rank), "--alpha", str(s.lora_alpha), "--no-dora", "--lr", str(s.lora_lr), "--batch-size",
         str(s.lora_batch), "--max-length", str(s.lora_block), "--max-steps", "3", "--save-every", "0",
         "--overwrite", "--quiet"], work / "retrain_probe.log")
    shutil.rmtree(work / "retrain_probe")
    # RAG (paper Table 3): BM25 and oracle retrieval over B's bios, B's test questions
    b_test = {i for i in test_ids if i.startswith("B/")}
    ra, la = grids["re_adapt"]["chosen"], grids["lore_adapt"]["chosen"]
    rag_models = {
        "instruct": (theta, []), "instruct + knowledge adapter": (theta, [(psi_inst, 1.0)]),
        "LoRE-Adapt (α, β chosen on validation)": (phi, [(psi, la[0]), (lore, la[1])]),
        "RE-Adapt (α, β chosen on validation)": (phi, [(psi, ra[0]), (delta, ra[1])]),
    }
    rag, running = {}, {}
    for i, (name, (model, adds)) in enumerate(rag_models.items()):
        for retrieval in ("bm25", "oracle"):
            running[name, retrieval] = jobs.submit(_evaluate, work, f"rag_{retrieval}_{i}", model, files["qa_B"], adds,
                                                   keep=b_test, retrieval=retrieval, passages=files["passages_B"])
    ports = {
        "version 1 + task patch (trained on v1)": ("port_v1", phi, [(adapters["task_v1"], 1.0)]),
        "version 2 alone": ("port_v2", phi2, []),
        "version 2 + ported patch (no training)": ("port_ported", work / "ported", []),
        "version 2 + patch re-trained on v2": ("port_retrained", phi2, [(adapters["task_v2"], 1.0)]),
    }
    port_runs = {name: jobs.submit(_evaluate, work, tag, model, files["qa_port"], adds)
                 for name, (tag, model, adds) in ports.items()}
    for (name, retrieval), future in running.items():
        scores = future.result()
        rag.setdefault(name, {"closed book": rows[name]["B"]})[retrieval] = scores["B"]
        if "retrieval_accuracy" in scores:
            res["bm25_retrieval_accuracy"] = scores["retrieval_accuracy"]
    res["rag"] = rag
    res["port"] = {name: future.result() for name, future in port_runs.items()}
    res["port_memory"] = {
        "port --merge peak RSS (MB)": round(port_mem, 1), "port --merge seconds": round(port_s, 2),
        "re-training (3 LoRA steps) peak RSS (MB)": round(retrain_mem, 1),
        "re-training (3 LoRA steps) seconds": round(retrain_s, 2),
    }
    report = json.loads((work / "ported" / "port_report.json").read_text())
    res["port_report"] = {k: report[k] for k in ("counts", "warnings") if k in report}
    lap("PortLLM")
    res["timings"] = timings
    return res


def _lore_summary(report: dict) -> dict:
    """Ranks per layer and module at τ=0.5 and the shares of the delta's parameters and energy kept."""
    import re

    ranks: dict[str, dict[str, int]] = {}
    other = {}
    for t in report["tensors"]:
        m = re.search(r"layers\.(\d+)\..*?(\w+)_proj\.weight$", t["name"])
        if m and t["policy"] == "lowrank":
            ranks.setdefault(m.group(1), {})[m.group(2)] = t["rank"]
        elif t["kind"] in ("embedding", "lm_head") and t["policy"] == "lowrank":
            other[t["name"]] = t["rank"]
    return {
        "ranks": ranks, "other_ranks": other, "params_kept_share": 100 * report["params_kept_share"],
        "energy_kept_share": 100 * report["energy_kept_share"], "relative_error": report["relative_error"],
        "params_delta": report["params_delta"], "params_kept": report["params_kept"],
    }


# --- caching --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$READAPT_DEMO_CACHE, else $XDG_CACHE_HOME/readapt/demo, else ~/.cache/readapt/demo."""
    import os

    if os.environ.get("READAPT_DEMO_CACHE"):
        return Path(os.environ["READAPT_DEMO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "readapt" / "demo"


def source_hash() -> str:
    """Hash of readapt's own source: cached results are recomputed whenever any module changes."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def _build_once(folder: Path, build) -> Path:
    """`folder` if it is complete, else `build(tmp)` into a temporary sibling renamed to `folder` at the end."""
    import os
    import shutil

    if (folder / ".complete").exists():
        return folder
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        build(tmp)
        (tmp / ".complete").write_text(json.dumps({  # how long the cold build took, and how busy the machine was
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.perf_counter() - t0, 1),
            "load_average": round(os.getloadavg()[0], 1), "cores": len(os.sched_getaffinity(0))}) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _cold_record(folder: Path) -> dict:
    """What `_build_once` recorded when it built `folder` (NaN for caches written before it recorded)."""
    import os

    try:
        return json.loads((folder / ".complete").read_text())
    except ValueError:
        return {"seconds": math.nan, "load_average": math.nan, "cores": len(os.sched_getaffinity(0))}


def _say(msg: str) -> None:
    import sys

    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_seed(s: Settings, seed: int, cache: Path, jobs: Jobs) -> tuple[dict, Path]:
    """Train (or reuse) the models and adapters of one seed and run (or reuse) its experiments.

    Returns (results, folder of its artefacts)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from readapt.merging import load_merged

    root = cache / s.key(seed)
    world = make_world(seed, dict(s.sizes))
    tok = build_tokenizer()
    wall = {}
    t0 = time.perf_counter()

    def models_and_checks(tmp: Path):
        _say(f"seed {seed}: training the pretrained model Φ on A's bios ({root})")
        train_world_model(s, seed, "pretrained", tmp)  # this process, all its threads
        _say(f"seed {seed}: training the instruct model Θ and version 2 Φ₂ from Φ")
        for r in [jobs.submit(train_world_model, s, seed, w, tmp) for w in ("instruct", "pretrained_v2")]:
            r.result()
        checks = {}
        for name, pops in (("pretrained", "A"), ("pretrained_v2", "AC"), ("instruct", "A")):
            m = AutoModelForCausalLM.from_pretrained(tmp / name, local_files_only=True)
            for pop in pops:
                checks[f"{name} on {pop}"] = bio_completion(m, tok, world[pop])
        (tmp / "bio_completion.json").write_text(json.dumps(checks, indent=2) + "\n")

    mroot = _build_once(root / "models", models_and_checks)
    models = {k: mroot / k for k in ("pretrained", "instruct", "pretrained_v2")}
    files_root = _build_once(root / "data", lambda tmp: write_data(world, s, tmp, seed))
    files = {p.stem: p for p in files_root.glob("*.jsonl")}
    wall["models"], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()

    def adapters_and_checks(tmp: Path):
        _say(f"seed {seed}: training 4 LoRA adapters with readapt.train")
        ad = train_adapters(s, models, files, tmp, seed, jobs)
        net, _ = load_merged(models["pretrained"], [(ad["knowledge"], 1.0)])
        checks = {"pretrained + knowledge adapter on B": bio_completion(net, tok, world["B"])}
        (tmp / "bio_completion.json").write_text(json.dumps(checks, indent=2) + "\n")

    aroot = _build_once(root / "adapters", adapters_and_checks)
    adapters = {k: aroot / k for k in ("knowledge", "knowledge_on_instruct", "task_v1", "task_v2")}
    wall["adapters"], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()

    def experiments(tmp: Path):
        _say(f"seed {seed}: experiments: extract, lowrank, spectrum, sweep, evaluate, port")
        res = run_experiments(s, seed, models, adapters, files, tmp, jobs)
        res["bio_completion"] = {**json.loads((mroot / "bio_completion.json").read_text()),
                                 **json.loads((aroot / "bio_completion.json").read_text())}
        (tmp / "results.json").write_text(json.dumps(res, indent=2) + "\n")

    run = _build_once(root / "runs" / source_hash(), experiments)
    for old in (root / "runs").iterdir():  # results of other code versions are stale: keep one
        if old != run and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    res = json.loads((run / "results.json").read_text())
    wall["experiments"] = round(time.perf_counter() - t0, 1)
    res["wall_seconds"], res["cache"] = wall, str(root)
    res["cold_build"] = {name: _cold_record(folder)
                         for name, folder in (("models", mroot), ("adapters", aroot), ("experiments", run))}
    return res, run


# --- tables, claims, plots, README ----------------------------------------------------------------------

EM, RL = "contains_em", "rouge_l_recall"
MARGIN = 5.0  # points: one seed of 100 people per split cannot separate smaller differences (DESIGN.md)


def tables_of(res: dict) -> dict[str, dict]:
    """The tables of one seed: {name: {"title", "unit", "columns", "rows": [[label, *values]]}}."""

    def four(d):  # in-domain and out-of-domain, both metrics
        return [d["B"][RL], d["B"][EM], d["A"][RL], d["A"][EM]]

    qa_cols = ["B (in-domain) Rouge-L recall", "B contains-EM", "A held out (out-of-domain) Rouge-L recall",
               "A held out contains-EM"]
    t = {"re_adapt": {"title": "RE-Adapt (paper Table 2 shape): closed-book QA, test split", "unit": "%",
                      "columns": qa_cols, "rows": [[k, *four(v)] for k, v in res["re_adapt"].items()]}}
    for name in ("re_adapt", "lore_adapt"):
        g = res["grids"][name]["cells"]
        for dom, label in (("B", "in-domain B"), ("A", "out-of-domain A")):
            t[f"grid_{name}_{dom}"] = {
                "title": f"{'RE' if name == 're_adapt' else 'LoRE'}-Adapt partial adaptation Φ + αΨ + β·adapter: "
                         f"{label} contains-EM, test split (rows α, columns β; chosen on validation: "
                         f"α={res['grids'][name]['chosen'][0]:g}, β={res['grids'][name]['chosen'][1]:g})",
                "unit": "%", "columns": [f"β={b:g}" for b in GRID],
                "rows": [[f"α={a:g}", *(g[f"{a:g},{b:g}"]["test"][dom][EM] for b in GRID)] for a in GRID]}
    t["strength"] = {"title": "Instruction strength Φ + βΔ (paper Figure 6; the α=0 row of the grid), test split", "unit": "%",
                     "columns": qa_cols, "rows": [[f"β={b}", *four(v["test"])] for b, v in res["strength"].items()]}
    lore = res["lore"]
    modules = sorted({m for r in lore["ranks"].values() for m in r}, key="qkvogateupdown".find)
    t["lore_ranks"] = {"title": "LoRE-Adapt ranks per layer at τ=0.5 (of min(out, in))", "unit": "rank",
                       "columns": modules,
                       "rows": [[f"layer {i}", *(r.get(m, 0) for m in modules)] for i, r in sorted(lore["ranks"].items(), key=lambda x: int(x[0]))]}
    t["lore_share"] = {"title": "LoRE-Adapt at τ=0.5: what the adapter keeps of Δ", "unit": "%",
                       "columns": ["share"], "rows": [["parameters kept", lore["params_kept_share"]],
                                                      ["energy ‖Δ‖² kept", lore["energy_kept_share"]]]}
    t["rag"] = {"title": "RAG (paper Table 3 shape): B test questions, top-1 BM25 and oracle passage", "unit": "%",
                "columns": ["closed book Rouge-L recall", "closed book contains-EM", "BM25 Rouge-L recall",
                            "BM25 contains-EM", "oracle Rouge-L recall", "oracle contains-EM"],
                "rows": [[k, *(v[r][m] for r in ("closed book", "bm25", "oracle") for m in (RL, EM))]
                         for k, v in res["rag"].items()]}
    t["port"] = {"title": "PortLLM: a task patch (chat QA LoRA) trained on version 1, used on version 2", "unit": "%",
                 "columns": ["task: A held out Rouge-L recall", "task: A held out contains-EM",
                             "C (read only by v2) Rouge-L recall", "C contains-EM"],
                 "rows": [[k, v["A"][RL], v["A"][EM], v["C"][RL], v["C"][EM]] for k, v in res["port"].items()]}
    t["world"] = {"title": "World checks: bio completion (teacher-forced value after a bio prefix)", "unit": "%",
                  "columns": ["facts completed"],
                  "rows": [[k, v] for k, v in res["bio_completion"].items()]
                  + [["chance (uniform guess of one value)", 100 * sum(1 / n for n in (20, 40, 12, 16)) / 4]]}
    return t


def aggregate(per_seed: list[dict]) -> dict[str, dict]:
    """Cell-wise mean and sample standard deviation of the seeds' tables (std 0 for one seed)."""
    tabs = [tables_of(r) for r in per_seed]
    out = {}
    for name, t in tabs[0].items():
        rows = []
        for i, row in enumerate(t["rows"]):
            vals = [[tab[name]["rows"][i][j] for tab in tabs] for j in range(1, len(row))]
            mean = [sum(v) / len(v) for v in vals]
            std = [math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
                   for v, m in zip(vals, mean)]
            rows.append({"label": row[0], "mean": mean, "std": std})
        out[name] = {**{k: t[k] for k in ("title", "unit", "columns")}, "rows": rows}
    return out


def format_tables(tables: dict, markdown: bool = False) -> str:
    lines = []
    for t in tables.values():
        def cell(m, s):
            v = f"{m:.0f}" if t["unit"] == "rank" else f"{m:.1f}"
            return v + (f" ± {s:.1f}" if s else "")
        body = [[r["label"], *(cell(m, s) for m, s in zip(r["mean"], r["std"]))] for r in t["rows"]]
        head = ["", *t["columns"]]
        if markdown:
            lines += [f"### {t['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in body] + [""]
        else:
            w = [max(len(str(x[j])) for x in [head, *body]) for j in range(len(head))]
            lines += [t["title"], "  ".join(h.rjust(n) if j else h.ljust(n) for j, (h, n) in enumerate(zip(head, w)))]
            lines += ["  ".join(c.rjust(n) if j else c.ljust(n) for j, (c, n) in enumerate(zip(r, w))) for r in body]
            lines.append("")
    return "\n".join(lines)


def world_check_failures(tables: dict) -> list[str]:
    """The world is good enough to test the claims only if the instruct model answers held-out A far above
    chance (≥ 3×) and the knowledge adapter has memorised B (bio completion ≥ 90%). Returns what failed."""
    world = {r["label"]: r["mean"][0] for r in tables["world"]["rows"]}
    chance = world["chance (uniform guess of one value)"]
    inst_a = next(r["mean"][3] for r in tables["re_adapt"]["rows"] if r["label"] == "instruct")
    failed = []
    if inst_a < 3 * chance:
        failed.append(f"the instruct model answers {inst_a:.1f}% of held-out A (needs ≥ 3× chance = {3 * chance:.1f})")
    knowledge = world.get("pretrained + knowledge adapter on B")
    if knowledge is not None and knowledge < 90:
        failed.append(f"the knowledge adapter completes {knowledge:.1f}% of B's bio facts (needs ≥ 90)")
    return failed


def claims(tables: dict, per_seed: list[dict]) -> list[dict]:
    """The papers' claims checked against this world's means: reproduced when the difference exceeds
    MARGIN points in the claimed direction, 'within noise' when |difference| <= MARGIN, else not reproduced."""

    def get(table, label, col):
        t = tables[table]
        return next(r["mean"][col] for r in t["rows"] if r["label"] == label)

    def verdict(diff, kind):
        if kind == "same":  # |difference| within the margin
            return "reproduced" if abs(diff) <= MARGIN else "not reproduced"
        if kind == "not worse":  # at most the margin below
            return "reproduced" if diff >= -MARGIN else "not reproduced"
        return "reproduced" if diff > MARGIN else ("within noise" if diff >= -MARGIN else "not reproduced")

    out = []

    def add(claim, paper, diff, evidence, two_sided=False, kind="better"):
        kind = "same" if two_sided else kind
        out.append({"claim": claim, "paper": paper, "difference": round(diff, 1),
                    "verdict": verdict(diff, kind), "evidence": evidence})

    r = "re_adapt"
    inst_b, inst_a = get(r, "instruct", 1), get(r, "instruct", 3)
    ika_a = get(r, "instruct + knowledge adapter", 3)
    re_b, re_a = get(r, "RE-Adapt (α, β chosen on validation)", 1), get(r, "RE-Adapt (α, β chosen on validation)", 3)
    re5 = (get(r, "RE-Adapt (α=β=0.5)", 1) + get(r, "RE-Adapt (α=β=0.5)", 3)) / 2
    lo_b, lo_a = get(r, "LoRE-Adapt (α, β chosen on validation)", 1), get(r, "LoRE-Adapt (α, β chosen on validation)", 3)
    add("Fine-tuning the instruct model on new text hurts its out-of-domain QA", "RE-Adapt §1, Table 2",
        inst_a - ika_a, f"A contains-EM: instruct {inst_a:.1f}, instruct + knowledge adapter {ika_a:.1f}")
    add("RE-Adapt adds the new knowledge: in-domain QA above the instruct model", "RE-Adapt Table 2",
        re_b - inst_b, f"B contains-EM: RE-Adapt {re_b:.1f}, instruct {inst_b:.1f}")
    add("RE-Adapt keeps out-of-domain QA better than fine-tuning the instruct model", "RE-Adapt Table 2",
        re_a - ika_a, f"A contains-EM: RE-Adapt {re_a:.1f}, instruct + knowledge adapter {ika_a:.1f}")
    add("RE-Adapt keeps the instruct model's out-of-domain QA (at most the margin below it)", "RE-Adapt Table 2",
        re_a - inst_a, f"A contains-EM: RE-Adapt {re_a:.1f}, instruct {inst_a:.1f}", kind="not worse")
    add("LoRE-Adapt performs like RE-Adapt (mean of B and A contains-EM within the margin)", "RE-Adapt Table 2",
        (lo_b + lo_a - re_b - re_a) / 2, f"LoRE-Adapt {(lo_b + lo_a) / 2:.1f}, RE-Adapt {(re_b + re_a) / 2:.1f}, "
        f"with {get('lore_share', 'parameters kept', 0):.1f}% of the delta's parameters", two_sided=True)
    add("α=β=0.5 is a robust choice (within the margin of the best scales)", "RE-Adapt §5.2",
        re5 - (re_b + re_a) / 2, f"mean contains-EM: α=β=0.5 {re5:.1f}, scales chosen on validation "
        f"{(re_b + re_a) / 2:.1f}", two_sided=True)
    picks, at_pick, at_one = [], [], []
    for res in per_seed:  # β < 1 chosen on the validation half (A held out), compared with β=1 on the test half
        st = res["strength"]
        b = max((k for k in st if float(k) < 1), key=lambda k: st[k]["val"]["A"][EM])
        picks.append(b)
        at_pick.append(st[b]["test"]["A"][EM])
        at_one.append(st["1"]["test"]["A"][EM])
    n = len(per_seed)
    add("Instruction strength below 1 can beat the instruct model (β<1 chosen on validation, A held out)",
        "RE-Adapt Figure 6", (sum(at_pick) - sum(at_one)) / n,
        f"A contains-EM (test): β={'/'.join(picks)} {sum(at_pick) / n:.1f}, β=1 {sum(at_one) / n:.1f}")
    for col, name in ((3, "BM25"), (5, "oracle")):
        rb = get("rag", "RE-Adapt (α, β chosen on validation)", col)
        ib = get("rag", "instruct", col)
        add(f"RE-Adapt helps with {name} retrieval too", "RE-Adapt Table 3", rb - ib,
            f"B contains-EM with {name}: RE-Adapt {rb:.1f}, instruct {ib:.1f}")
    p = "port"
    ported, retrained = get(p, "version 2 + ported patch (no training)", 1), get(p, "version 2 + patch re-trained on v2", 1)
    v2 = get(p, "version 2 alone", 1)
    add("A ported patch does the task on version 2 without training", "PortLLM Table 1", ported - v2,
        f"A contains-EM: v2 + ported patch {ported:.1f}, v2 alone {v2:.1f}")
    add("A ported patch matches a patch re-trained on version 2 (within the margin)", "PortLLM Table 1",
        ported - retrained, f"A contains-EM: ported {ported:.1f}, re-trained {retrained:.1f}", two_sided=True)
    if retrained - v2 <= MARGIN:  # two patches that both fail the task "match" without saying anything
        out[-1]["verdict"] = "not meaningful"
        out[-1]["evidence"] += f"; the re-trained patch does not do the task on version 2 either (v2 alone {v2:.1f})"
    pm = sum(r["port_memory"]["port --merge peak RSS (MB)"] for r in per_seed) / len(per_seed)
    tm = sum(r["port_memory"]["re-training (3 LoRA steps) peak RSS (MB)"] for r in per_seed) / len(per_seed)
    out.append({"claim": "Porting needs less memory than re-training", "paper": "PortLLM §5 (12.2x less GPU memory)",
                "difference": round(tm / pm, 2),
                "verdict": "within noise" if abs(tm / pm - 1) < 0.05 else ("reproduced" if pm < tm else "not reproduced"),
                "evidence": f"peak RSS: port --merge {pm:.0f} MB, 3 LoRA training steps {tm:.0f} MB ({tm / pm:.2f}x); "
                            "the tiny model is a few MB, so both are mostly the Python/torch process itself"})
    return out


def plots(tables: dict, per_seed: list[dict], runs: list[Path], folder: Path) -> list[str]:
    """PNG figures: partial-adaptation heatmaps, the instruction-strength curve, and (copied from
    readapt.lowrank.spectrum, first seed) the LoRE spectrum figures. Returns the file names."""
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for i, method in enumerate(("re_adapt", "lore_adapt")):
        chosen = per_seed[0]["grids"][method]["chosen"]
        for j, (dom, label) in enumerate((("B", "in-domain B"), ("A", "out-of-domain A"))):
            t = tables[f"grid_{method}_{dom}"]
            z = np.array([r["mean"] for r in t["rows"]])
            ax = axes[i][j]
            im = ax.imshow(z, origin="lower", cmap="viridis", vmin=0, vmax=100)
            for (a, b), v in np.ndenumerate(z):
                ax.text(b, a, f"{v:.0f}", ha="center", va="center", color="w" if v < 50 else "k", fontsize=8)
            a, b = GRID.index(chosen[0]), GRID.index(chosen[1])
            ax.add_patch(plt.Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            ax.set_xticks(range(len(GRID)), [f"{g:g}" for g in GRID])
            ax.set_yticks(range(len(GRID)), [f"{g:g}" for g in GRID])
            ax.set_xlabel("β (RE-Adapter Δ)" if method == "re_adapt" else "β (LoRE-Adapter)")
            ax.set_ylabel("α (knowledge adapter Ψ)")
            ax.set_title(f"{'RE' if method == 're_adapt' else 'LoRE'}-Adapt, {label}, contains-EM (test)")
            fig.colorbar(im, ax=ax)
    fig.suptitle("Partial adaptation Φ + αΨ + β·adapter (red: chosen on validation, seed 0)")
    fig.tight_layout()
    fig.savefig(folder / "partial_adaptation.png", dpi=100)
    plt.close(fig)
    names.append("partial_adaptation.png")

    t = tables["strength"]
    betas = [float(r["label"].split("=")[1]) for r in t["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in ((3, "A held out (out-of-domain)"), (1, "B (in-domain)")):
        mean = np.array([r["mean"][col] for r in t["rows"]])
        std = np.array([r["std"][col] for r in t["rows"]])
        ax.plot(betas, mean, marker="o", label=label)
        ax.fill_between(betas, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("β (instruction strength): Φ + βΔ")
    ax.set_ylabel("contains-EM x100 (test)")
    ax.set_ylim(0, 100)
    ax.set_title("Instruction strength (RE-Adapt Figure 6 shape)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "instruction_strength.png", dpi=100)
    plt.close(fig)
    names.append("instruction_strength.png")
    for f in sorted((runs[0] / "spectrum").glob("*.png")):
        shutil.copyfile(f, folder / f"spectrum_{f.name}")
        names.append(f"spectrum_{f.name}")
    return names


def _machine() -> str:
    import os

    load = os.getloadavg()[0]
    return f"{len(os.sched_getaffinity(0))} CPU cores, load average {load:.1f} when it finished"


def readme(tables: dict, verdicts: list[dict], per_seed: list[dict], quick: bool, seconds: float, figs: list[str]) -> str:
    s = QUICK if quick else FULL
    sizes = ", ".join(f"{k}={n}" for k, n in s.sizes)
    lines = [
        "# readapt demo: RE-Adapt, LoRE-Adapt, partial adaptation and PortLLM in a synthetic world", "",
        f"Made by `readapt demo{' --quick' if quick else ''} --seeds {len(per_seed)}` in {seconds:.0f} s "
        f"(wall time of this run; trained models came from the cache when it was warm; {_machine()}). "
        f"Cold build of seed {per_seed[0]['seed']} (from its cache record): "
        + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in per_seed[0]["cold_build"].items())
        + f" (load average up to {max(v['load_average'] for v in per_seed[0]['cold_build'].values()):.1f} on "
        f"{per_seed[0]['cold_build']['models']['cores']} cores). Populations: {sizes} "
        f"people; tiny Llama ({s.layers} layers, hidden {s.hidden}); seeds {[r['seed'] for r in per_seed]}. "
        "Numbers are x100, mean ± sample standard deviation over seeds.", "",
        "The world: fictional people with 4 attributes (birth city, birth year, university, employer). "
        "The *pretrained* model Φ read the bios of population A; the *instruct* model Θ is Φ fine-tuned to "
        "answer chat questions in full sentences about half of A (A_train) and about people whose bio is in "
        "the prompt (reading practice on strangers drawn fresh for every example); *version 2* Φ₂ is Φ pre-trained further on A's and C's "
        "bios. New knowledge is population B: unlabeled bios only. Closed-book questions on B are in-domain, "
        "questions on the held-out half of A are out-of-domain (knowledge the models already had).", "",
        "## Claims of the papers, as measured here", "",
        f"A claim is *reproduced* when the difference exceeds {MARGIN:g} points in the claimed direction "
        "(or, for 'matches' claims, stays within it); *within noise* when it is smaller than that.", "",
        "| claim | paper | verdict | evidence |", "|---|---|---|---|",
        *(f"| {c['claim']} | {c['paper']} | {c['verdict']} | {c['evidence']} |" for c in verdicts), "",
        "## The tables", "",
        "- **RE-Adapt**: rows are the paper's Table 2 models: Φ, Φ + knowledge adapter Ψ (LoRA on B's bios), "
        "Θ, Θ + a LoRA trained on B's bios, and Φ + αΨ + β·(LoRE-)adapter. Scales are either fixed (1, or the "
        "paper's 0.5) or chosen on a validation half of the questions; every number is on the other (test) half.",
        "- **Partial adaptation grids**: the (α, β) grid of Φ + αΨ + βΔ on the test half, in-domain and "
        "out-of-domain; the validation half chose the framed cell. The instruction-strength table is Φ + βΔ "
        "alone (paper Figure 6): β=1 is the instruct model.",
        "- **LoRE ranks**: the rank k each weight keeps at τ=0.5 (the smallest k whose singular values hold half of "
        "‖Δ‖²) and the share of Δ's parameters and energy the adapter keeps; spectrum plots from `readapt spectrum`.",
        "- **RAG**: the same models answering B's test questions with the top-1 BM25 passage or the gold passage "
        "(one bio per person of B) in the prompt (paper Table 3).",
        "- **PortLLM**: a LoRA task patch (chat QA, trained with `readapt train` on Φ) added to Φ₂ by `readapt port` "
        "with no training, against Φ₂ alone and a LoRA re-trained on Φ₂; column C shows what only Φ₂ read. "
        "The memory line compares the peak RSS of `readapt port --merge` with that of 3 LoRA training steps.",
        "- **World checks**: the share of facts a model completes after a bio prefix; the knowledge adapter must "
        "memorise B (≥ 90%) for the experiments to mean anything.", "",
        "contains-EM credits any response that contains the value: a pretrained model that recites bios after "
        "the question earns some credit that way (the 'pretrained' and 'version 2 alone' rows).", "",
        *(f"![{f}]({f})" for f in figs), "",
        format_tables(tables, markdown=True),
        "## Memory (PortLLM)", "",
        *(f"- {k}: {v}" for k, v in per_seed[0]["port_memory"].items()), "",
        "## Files", "",
        "`results.json` (every number, per seed), `tables.json` / `tables.md`, the figures, and `seed<N>/`: the "
        "world's data files (`data/`), the RE-Adapter (`re_adapter/`), the LoRE-Adapter (`lore_adapter/`), the "
        "spectrum report, every sweep and evaluation (`eval/`, `sweep_*/` with predictions), the ported model "
        "(`ported/`). Trained models and adapters stay in the cache folder named in `results.json`.", "",
    ]
    return "\n".join(lines)


def demo(out: str | Path = "readapt-demo", quick: bool = False, seeds: int = 1, cache_dir: str | Path | None = None,
         overwrite: bool = False) -> Path:
    """Run the demo world end to end and write tables, plots and a README to `out`; returns `out`.

    Per seed (the world and every training use seeds 0..seeds-1): train or reuse Φ, Θ, Φ₂ and the LoRA
    adapters (cached under `cache_dir`, default ~/.cache/readapt/demo/<hash of settings and seed>), then run
    extract, lowrank, sweep/evaluate and port exactly as a user would, print the tables (mean ± std over
    seeds) and say which of the papers' claims reproduced. An existing `out` is replaced only if it holds a
    previous demo (or `overwrite`).
    """
    import os
    import shutil

    from readapt.checkpoint import output_folder
    from readapt.errors import ReadaptError

    if seeds < 1:
        raise ReadaptError(f"--seeds must be at least 1, got {seeds}")
    out = Path(out)
    try:
        previous_demo = json.loads((out / "results.json").read_text()).get("demo") == "readapt"
    except (OSError, ValueError, AttributeError):
        previous_demo = False
    t0 = time.perf_counter()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    s = QUICK if quick else FULL
    threads = torch.get_num_threads()
    from transformers.utils import logging

    logging.disable_progress_bar()
    cores = len(os.sched_getaffinity(0))
    # tiny matrices: one thread per process, the second core runs a second job (measured here, on a
    # loaded 2-core machine: a quick cold run took 208 CPU-s with 2 threads, ~100 with 1)
    torch.set_num_threads(int(os.environ.get("READAPT_DEMO_THREADS", 1)))
    jobs = Jobs(min(2, cores))
    try:
        with output_folder(out, overwrite=overwrite or bool(previous_demo), inputs=[cache]) as tmp:
            per_seed, runs = [], []
            for seed in range(seeds):
                res, run = run_seed(s, seed, cache, jobs)
                per_seed.append(res)
                runs.append(run)
                shutil.copytree(run, tmp / f"seed{seed}", ignore=shutil.ignore_patterns(".complete"))
                shutil.copytree(cache / s.key(seed) / "data", tmp / f"seed{seed}" / "data",
                                ignore=shutil.ignore_patterns(".complete"))
            tables = aggregate(per_seed)
            verdicts = claims(tables, per_seed)
            failed = world_check_failures(tables)
            for c in verdicts if failed else ():  # a claim cannot be judged in a world that did not learn
                c["verdict"] = "not meaningful"
            figs = plots(tables, per_seed, runs, tmp)
            seconds = time.perf_counter() - t0
            text = format_tables(tables)
            summary = "\n".join(f"  [{c['verdict']}] {c['claim']}: {c['evidence']}" for c in verdicts)
            (tmp / "tables.md").write_text(format_tables(tables, markdown=True))
            (tmp / "tables.json").write_text(json.dumps(tables, indent=2) + "\n")
            (tmp / "results.json").write_text(json.dumps(
                {"demo": "readapt", "quick": quick, "seeds": seeds, "settings": asdict(s), "wall_seconds": round(seconds, 1),
                 "claims": verdicts, "per_seed": per_seed}, indent=2) + "\n")
            (tmp / "README.md").write_text(readme(tables, verdicts, per_seed, quick, seconds, figs))
    finally:
        jobs.close()
        torch.set_num_threads(threads)
        logging.enable_progress_bar()
    print(text)
    if failed:
        print("WORLD CHECKS FAILED, so no claim is judged (more steps, or the full demo, should fix it):\n  "
              + "\n  ".join(failed))
    print("Claims of the papers in this world (margin {:g} points):\n{}".format(MARGIN, summary))
    print(f"\nWrote {out} in {seconds:.0f} s (README.md, tables.md, results.json, figures); cache: {cache}")
    return out
