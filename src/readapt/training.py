"""Knowledge adapters: a LoRA/DoRA adapter Ψ trained on the *pretrained* model Φ with next-token prediction
on unlabeled text (RE-Adapt, Fleshman & Van Durme 2024, section 3 and Table 4).

    readapt train BASE --data corpus.jsonl -o knowledge/         # CPU or one GPU
    accelerate launch -m readapt train BASE --data ... -o ...     # several GPUs (DDP), no code of ours

The protocol, step by step:

  data    JSON lines {"text": ...} or .txt files (one document per file), packed into blocks of
          `max_length` tokens as the model was pretrained: BOS doc EOS ..., every block starting with BOS
          where the tokenizer adds one (readapt.textdata says how and why).
  model   PEFT LoRA on every linear layer except lm_head: W = W0 + s·B·A, s = alpha/r (Hu et al. 2022);
          with DoRA: W = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖, norm per output row (Liu et al. 2024).
  loss    mean next-token cross-entropy over the batch (every position of a block is a real token).
  step    `batch_size` blocks per optimizer step, split over processes and micro-batches (gradient
          accumulation); gradients clipped to norm `max_grad_norm`; AdamW; lr rises linearly for
          `warmup_steps`, then falls linearly to 0 at the last step.
  order   one endless stream of shuffled epochs; step t reads stream positions [t·B, (t+1)·B), so a
          resumed run reads exactly the blocks the uninterrupted one would (readapt.textdata).
          Steps = max_steps, or ceil(epochs · n_blocks / B).

Files:
  OUT/          adapter_config.json + adapter_model.safetensors (peft.PeftModel.from_pretrained),
                README.md (model card: data, steps, tokens, losses), training_log.jsonl
  OUT.partial/  (or `checkpoint_dir`) while training, deleted on success (readapt.trainstate).

Every setting is a field of TrainSettings (train's keyword arguments, the CLI's flags, run.json's record).
The run's phases: check the arguments (`_prepare`), load the data (`_load_data`), prepare or resume the run
(trainstate.start_run, `_setup`), fit (`_fit`), write the adapter (`_write_adapter`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from readapt.cards import train_card
from readapt.checkpoint import check_output, output_folder, resolve_model
from readapt.errors import ReadaptError
from readapt.numerics import is_finite
from readapt.textdata import load_blocks, stream
from readapt.trainmodel import heldout_loss, looks_instruct, lora_model, train_precision
from readapt.trainstate import (check_checkpoint_dir, discard_unless_resumable, load_checkpoint, remove_checkpoints,
                                save_checkpoint, start_run, trainable)
from readapt.userfiles import config_errors


def _setting(default, help: str | None = None, recorded: bool = True, **flag):
    """A TrainSettings field: its default; its command-line flag (`help` and argparse options; no help: no
    flag); whether run.json records it (a resumed run must match: settings that change the result)."""
    return field(default=default, metadata={"cli": {"help": help, **flag} if help else None, "recorded": recorded})


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of `train`, each default written once (the RE-Adapt paper's, Table 4: all linear layers,
    r=64, lora_alpha=128, dropout 0.05, DoRA, batch 20, AdamW lr 2e-4, linear schedule). The CLI declares a
    flag for each field with a `cli` entry, in this order; run.json records the `recorded` ones."""

    rank: int = _setting(64, "LoRA rank r (default 64)", type=int)
    alpha: float = _setting(128, "lora_alpha; scale s = alpha/r (default 128)", type=float)
    dropout: float = _setting(0.05, "LoRA dropout (default 0.05)", type=float)
    dora: bool = _setting(True, "DoRA (weight-decomposed LoRA) or plain LoRA (default: DoRA)",
                          action=argparse.BooleanOptionalAction)
    target_modules: str | list[str] = _setting("all-linear")
    lr: float = _setting(2e-4, "AdamW peak learning rate (default 2e-4)", type=float)
    epochs: float = _setting(1.0, "passes over the data (default 1; the paper: 10)", type=float)
    max_steps: int | None = _setting(None, "optimizer steps (overrides --epochs)", type=int)
    batch_size: int = _setting(20, "blocks per optimizer step, all GPUs (default 20)", type=int)
    micro_batch_size: int | None = _setting(None, "blocks per forward pass per process; smaller = less memory, "
                                            "same result (gradient accumulation); default: the whole per-process "
                                            "batch", recorded=False, type=int)
    max_length: int = _setting(1024, "tokens per block (default 1024)", type=int)
    warmup_steps: int = _setting(0, "linear warmup steps (default 0)", type=int)
    weight_decay: float = _setting(0.0)
    max_grad_norm: float | None = _setting(1.0)
    seed: int = _setting(0, "same seed, same inputs -> same adapter (default 0)", type=int)
    save_every: int | None = _setting(500, "checkpoint every N steps, 0 = never (default 500)", recorded=False,
                                      type=int)
    checkpoint_dir: str | os.PathLike | None = _setting(
        None, "where checkpoints live while training (default: OUTPUT.partial; deleted on success)", recorded=False)
    resume: bool = _setting(False, "continue an interrupted run from its last checkpoint", recorded=False,
                            action="store_true")
    precision: str | None = _setting("auto", "auto: accelerate's configured mixed precision, else bf16 on GPUs that "
                                     "support it", recorded=False, choices=("auto", "no", "bf16", "fp16"))
    gradient_checkpointing: bool = _setting(False, "recompute activations in the backward pass: less memory, ~1/3 "
                                            "more compute", recorded=False, action="store_true")
    quiet: bool = _setting(False, "no progress bar or messages", recorded=False, action="store_true")

    def recorded(self) -> dict:
        """The settings run.json records, by name, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["recorded"]}

    def check(self) -> None:
        """Every numeric setting in its range, named as the command line spells it (--max-steps)."""
        def integer(v, low, high=None):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v < high)

        def real(v, low, strict=True):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > low if strict
                                                                                                       else v >= low)
        v = asdict(self)
        rules = {
            "rank": (integer(v["rank"], 1), "an integer >= 1"),
            "alpha": (real(v["alpha"], 0), "a finite number > 0"),
            "dropout": (real(v["dropout"], 0, strict=False) and v["dropout"] < 1, "a number in [0, 1)"),
            "lr": (real(v["lr"], 0) and v["lr"] <= 1, "a number in (0, 1]"),  # AdamW moves weights by ~lr a step
            "epochs": (real(v["epochs"], 0), "a finite number > 0"),
            "max_steps": (v["max_steps"] is None or integer(v["max_steps"], 1), "an integer >= 1"),
            "batch_size": (integer(v["batch_size"], 1), "an integer >= 1"),
            "micro_batch_size": (v["micro_batch_size"] is None or integer(v["micro_batch_size"], 1), "an integer >= 1"),
            "max_length": (integer(v["max_length"], 2), "an integer >= 2"),
            "warmup_steps": (integer(v["warmup_steps"], 0), "an integer >= 0"),
            "weight_decay": (real(v["weight_decay"], 0, strict=False), "a finite number >= 0"),
            "max_grad_norm": (v["max_grad_norm"] is None or real(v["max_grad_norm"], 0, strict=False),
                              "a finite number >= 0 (0: no clipping)"),
            "save_every": (v["save_every"] is None or integer(v["save_every"], 0), "an integer >= 0 (0: never)"),
            "seed": (integer(v["seed"], 0, 2**32), "an integer in [0, 2**32)"),
        }
        for name, (ok, what) in rules.items():
            if not ok:
                raise ReadaptError(f"--{name.replace('_', '-')}={v[name]!r}: must be {what}")


def train(base: str | os.PathLike, data: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
          eval_data: str | os.PathLike | Sequence[str | os.PathLike] | None = None, overwrite: bool = False,
          callback: Callable[[dict], None] | None = None, settings: TrainSettings | None = None,
          **changes) -> Path:
    """Train a knowledge adapter Ψ (LoRA, or DoRA when `dora`) on BASE with next-token prediction on the
    unlabeled text in `data`; write a PEFT adapter folder to `out` and return its path.

    The settings are TrainSettings' fields (the paper's defaults; it trained 10 epochs, 3 on the smaller
    corpus), given as keyword arguments (rank=8, lr=1e-3, ...) or as `settings`, which keyword arguments
    change. The protocol (packing, data order, accumulation) is in this module's docstring.

    batch_size is the number of `max_length`-token blocks per optimizer step over all processes; each
    process runs its share in micro-batches of `micro_batch_size` (default: all of it at once) and
    accumulates gradients, so a smaller micro-batch changes memory, not the result. `eval_data` (held-out
    text) is scored before and after training (loss and perplexity, in the log and the model card).
    Checkpoints are written every `save_every` steps to `checkpoint_dir` (default: `out` + ".partial");
    `resume=True` continues from the latest one with the same optimizer, scheduler, RNG and data position,
    so the adapter equals that of an uninterrupted run. Same seed, same inputs -> same adapter.
    `precision`: "auto" (bf16 on GPUs that support it, else float32), "no", "bf16" or "fp16".
    `gradient_checkpointing` trades compute for activation memory (same result).
    `callback(record)` is called on the main process with every record written to training_log.jsonl.
    """
    s = replace(settings or TrainSettings(), **changes)
    s.check()
    files, eval_files = ([p] if isinstance(p, (str, os.PathLike)) else list(p or ()) for p in (data, eval_data))
    run = _prepare(base, files, eval_files, out, s, overwrite, callback)
    _load_data(run, base)
    run.latest = start_run(run.ckpt_dir, run.record, s.resume, overwrite, run.acc)
    with discard_unless_resumable(run.ckpt_dir, run.main):  # a failure before the first checkpoint leaves nothing
        model, optimizer, scheduler, params = _setup(run)
        _fit(run, model, optimizer, scheduler, params)
        _write_adapter(run, model, overwrite)
    run.acc.wait_for_everyone()
    return run.out


@dataclass
class _Run:
    """One training run as its phases fill it in: paths, the accelerator and the batch layout, the data."""

    s: TrainSettings
    out: Path
    ckpt_dir: Path
    base_path: Path
    files: list
    eval_files: list
    acc: Any
    precision: str
    local: int  # blocks per process per step
    micro: int  # blocks per forward pass
    callback: Callable[[dict], None] | None
    blocks: torch.Tensor | None = None
    eval_blocks: torch.Tensor | None = None
    eval_tail: torch.Tensor | None = None
    total_steps: int = 0
    record: dict = field(default_factory=dict)  # what run.json records (a resumed run must match)
    latest: Path | None = None
    counters: dict = field(default_factory=lambda: {"step": 0, "tokens": 0, "train_seconds": 0.0})
    last_loss: float = float("nan")

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def say(self, msg: str) -> None:
        if self.main and not self.s.quiet:
            print(f"readapt train: {msg}", file=sys.stderr, flush=True)

    def log(self, record: dict) -> None:
        if self.main:
            with open(self.ckpt_dir / "training_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.callback:
                self.callback(record)


def _prepare(base, files: list, eval_files: list, out, s: TrainSettings, overwrite: bool, callback) -> _Run:
    """Check everything cheap before loading anything heavy: paths (the output and the checkpoint folder never
    touch an input), the accelerator and the batch layout over processes, the context length."""
    from accelerate import Accelerator
    from transformers import AutoConfig

    out = Path(out).expanduser().absolute()
    ckpt_dir = Path(s.checkpoint_dir).expanduser().absolute() if s.checkpoint_dir else out.parent / f"{out.name}.partial"
    base_path = resolve_model(base)
    if not (base_path / "config.json").exists():
        raise ReadaptError(f"{base_path} has no config.json: BASE must be a transformers causal-LM checkpoint")
    check_output(out, overwrite, inputs=[base_path, *files, *eval_files])  # never write over (or delete) an input
    check_checkpoint_dir(ckpt_dir, out, [base_path, *files, *eval_files])
    precision = train_precision(s.precision)
    acc = Accelerator(mixed_precision=precision)
    P = acc.num_processes
    if s.batch_size % P:
        raise ReadaptError(f"batch_size={s.batch_size} is not a multiple of the {P} processes; change --batch-size")
    local = s.batch_size // P
    micro = min(s.micro_batch_size or local, local)
    if local % micro:
        raise ReadaptError(f"micro_batch_size={s.micro_batch_size} does not divide the {local} blocks each "
                           f"process runs per step (batch_size {s.batch_size} / {P} processes)")
    with config_errors(base_path / "config.json"):  # first: the tokenizer reads it too
        n_ctx = getattr(AutoConfig.from_pretrained(base_path, local_files_only=True), "max_position_embeddings", None)
    if n_ctx and s.max_length > n_ctx:
        raise ReadaptError(f"max_length={s.max_length} exceeds the context of {base_path} "
                           f"(max_position_embeddings={n_ctx}); lower --max-length")
    return _Run(s, out, ckpt_dir, base_path, files, eval_files, acc, precision, local, micro, callback)


def _load_data(run: _Run, base) -> None:
    """Tokenize and pack the training (and held-out) text; the step count; the settings run.json records."""
    from transformers import AutoTokenizer

    s = run.s
    try:
        tokenizer = AutoTokenizer.from_pretrained(run.base_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ReadaptError(f"cannot load a tokenizer from {run.base_path} ({err}); BASE needs its tokenizer "
                           f"files") from None
    if tokenizer.eos_token_id is None:
        raise ReadaptError(f"the tokenizer of {run.base_path} has no EOS token, which separates documents")
    run.blocks, _, data_summary = load_blocks(run.files, tokenizer, s.max_length)
    if len(run.blocks) == 0:
        raise ReadaptError(f"the training text has fewer tokens than one block of max_length={s.max_length}; "
                           f"add text or lower --max-length (nothing was trained)")
    if run.eval_files:
        run.eval_blocks, run.eval_tail, _ = load_blocks(run.eval_files, tokenizer, s.max_length, "--eval-data")
        if run.eval_blocks.numel() + run.eval_tail.numel() < 2:
            raise ReadaptError("the --eval-data text has fewer than 2 tokens; nothing to score")
    run.total_steps = s.max_steps or math.ceil(s.epochs * len(run.blocks) / s.batch_size)
    why = looks_instruct(str(base), tokenizer)
    if why and run.main:
        warnings.warn(f"BASE {base} looks like an instruct/chat model ({why}). RE-Adapt trains the knowledge "
                      f"adapter on the PRETRAINED model and re-applies instruction tuning with "
                      f"`readapt merge PRETRAINED --add KNOWLEDGE:a --add RE_ADAPTER:b`; "
                      f"ignore this if BASE is the pretrained one.", stacklevel=3)
    base_name = str(run.base_path.absolute()) if Path(str(base)).expanduser().exists() else str(base)  # or hub id
    recorded = s.recorded()
    at = list(recorded).index("max_steps") + 1  # run.json: total_steps right after max_steps
    items = list(recorded.items())
    run.record = {"base": base_name, "data": data_summary,
                  "data_sha256": hashlib.sha256(run.blocks.numpy().tobytes()).hexdigest(),
                  **dict(items[:at]), "total_steps": run.total_steps, **dict(items[at:])}


def _setup(run: _Run):
    """The model with a fresh adapter, AdamW and the linear schedule; restored from the latest checkpoint when
    the run resumes. -> (model, optimizer, scheduler, the trainable parameters)"""
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    s, acc = run.s, run.acc
    set_seed(s.seed)  # same LoRA A initialisation in every process
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.precision, torch.float32)
    model = lora_model(run.base_path, rank=s.rank, alpha=s.alpha, dropout=s.dropout, dora=s.dora,
                       target_modules=s.target_modules, dtype=dtype, gradient_checkpointing=s.gradient_checkpointing,
                       progress_bar=run.main and not s.quiet)
    model.peft_config["default"].base_model_name_or_path = run.record["base"]  # what PeftModel.from_pretrained reads
    params = [p for _, p in trainable(model)]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    # not passed to acc.prepare, which would step it once per process: we step it once per optimizer step
    scheduler = get_linear_schedule_with_warmup(optimizer, s.warmup_steps, run.total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    log_path = run.ckpt_dir / "training_log.jsonl"
    if run.latest is not None:
        run.counters = load_checkpoint(acc, run.latest, model, optimizer, scheduler)
        run.say(f"resuming from {run.latest} (step {run.counters['step']} of {run.total_steps})")
        if run.main:  # drop log lines written after the checkpoint; they will be written again
            lines = log_path.read_text().splitlines() if log_path.exists() else []
            log_path.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= run.counters["step"]))
    elif s.resume:
        run.say(f"no checkpoint in {run.ckpt_dir}; starting from step 0")
    return model, optimizer, scheduler, params


def _fit(run: _Run, model, optimizer, scheduler, params: list) -> None:
    """The loop: a step of `batch_size` blocks at a time, from the stream position of the step, checkpoints
    every `save_every` steps; the held-out loss before (fresh runs) and after; refuses a diverged adapter."""
    from tqdm.auto import tqdm

    s, acc = run.s, run.acc
    run.say(f"{len(run.blocks)} blocks of {s.max_length} tokens from {len(run.files)} file(s); {run.total_steps} "
            f"steps of {s.batch_size} blocks ({acc.num_processes} process(es) x {run.local // run.micro} "
            f"micro-batch(es) of {run.micro}); {sum(p.numel() for p in params):,} trainable parameters; precision "
            f"{run.precision}; device {acc.device}")
    if run.eval_blocks is not None and run.latest is None:
        _log_heldout(run, model, "before")
    quiet_bar = s.quiet or not run.main or (not sys.stderr.isatty() and not os.environ.get("READAPT_PROGRESS"))
    bar = tqdm(total=run.total_steps, initial=run.counters["step"], desc="train", unit="step", disable=quiet_bar)
    cache: dict = {}
    loss_value = float("nan")
    for step in range(run.counters["step"], run.total_steps):
        loss_value = _step(run, model, optimizer, scheduler, params, step, cache, bar)
        if s.save_every and (step + 1) % s.save_every == 0 and step + 1 < run.total_steps:
            save_checkpoint(acc, run.ckpt_dir, step + 1, model, optimizer, scheduler, run.counters)
    bar.close()
    bad = next((n for n, p in trainable(acc.unwrap_model(model)) if not is_finite(p.detach())), None)
    if bad is not None:  # every process holds the same parameters, so every process stops here
        raise ReadaptError(f"training diverged: {bad} has NaN/Inf values (last loss {loss_value}); nothing "
                           f"was written: lower --lr or --alpha, or raise --warmup-steps")
    run.last_loss = loss_value
    if run.eval_blocks is not None:
        _log_heldout(run, model, "after")


def _step(run: _Run, model, optimizer, scheduler, params, step: int, cache: dict, bar) -> float:
    """One optimizer step: this process's share of the step's blocks in micro-batches (DDP all-reduce on the
    last only), clipping, AdamW, schedule; logged. -> the mean loss over all processes."""
    s, acc = run.s, run.acc
    t0 = time.perf_counter()
    idx = stream(step * s.batch_size, s.batch_size, len(run.blocks), s.seed, cache)  # [B] global
    idx = idx[acc.process_index * run.local:(acc.process_index + 1) * run.local]  # [local] this process
    loss_sum = torch.zeros((), device=acc.device)
    accum = run.local // run.micro
    for j in range(accum):
        x = run.blocks[idx[j * run.micro:(j + 1) * run.micro]].long().to(acc.device)  # [micro, T]
        sync = acc.no_sync(model) if j < accum - 1 else nullcontext()  # DDP all-reduce on the last only
        with sync:
            loss = model(input_ids=x, labels=x).loss  # mean over micro·(T-1) tokens
            acc.backward(loss / accum)
        loss_sum += loss.detach()
    if s.max_grad_norm:
        acc.clip_grad_norm_(params, s.max_grad_norm)
    lr_now = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss_value = float(acc.reduce(loss_sum / accum, "mean"))
    dt = time.perf_counter() - t0
    c = run.counters
    c["step"] = step + 1
    c["tokens"] += s.batch_size * s.max_length
    c["train_seconds"] += dt
    record = {"step": step + 1, "epoch": round((step + 1) * s.batch_size / len(run.blocks), 4), "loss": loss_value,
              "lr": lr_now, "tokens": c["tokens"], "tokens_per_s": round(s.batch_size * s.max_length / dt, 1)}
    run.log(record)
    bar.update(1)
    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
    return loss_value


def _log_heldout(run: _Run, model, when: str) -> None:
    loss = heldout_loss(model, run.eval_blocks, run.eval_tail, run.micro, run.acc)
    run.log({"step": 0 if when == "before" else run.total_steps, **loss})
    run.say(f"held-out loss {when} training {loss['eval_loss']:.4f} (perplexity {loss['eval_perplexity']:.2f})")


def _write_adapter(run: _Run, model, overwrite: bool) -> None:
    """The PEFT adapter folder, the log and the model card, written all at once; then the checkpoints go."""
    acc = run.acc
    acc.wait_for_everyone()
    if not run.main:
        return
    log_path = run.ckpt_dir / "training_log.jsonl"
    records = [json.loads(l) for l in log_path.read_text().splitlines()]
    with output_folder(run.out, overwrite=overwrite, inputs=[run.base_path, *run.files, *run.eval_files]) as tmp:
        acc.unwrap_model(model).save_pretrained(tmp)
        shutil.copyfile(log_path, tmp / "training_log.jsonl")
        (tmp / "README.md").write_text(train_card(run.record, records, len(run.blocks), int(run.blocks.numel()),
                                                  run.counters, run.eval_files, acc.num_processes, run.precision))
    remove_checkpoints(run.ckpt_dir)
    run.say(f"wrote {run.out} ({run.total_steps} steps, {run.counters['tokens']:,} tokens, last loss "
            f"{run.last_loss:.4f})")
