"""Knowledge adapters: a LoRA/DoRA adapter Ψ trained on the *pretrained* model Φ with next-token prediction
on unlabeled text (RE-Adapt, Fleshman & Van Durme 2024, section 3 and Table 4).

    readapt train BASE --data corpus.jsonl -o knowledge/         # CPU or one GPU
    accelerate launch -m readapt train BASE --data ... -o ...     # several GPUs (DDP), no code of ours

The protocol, step by step:

  data    JSON lines {"text": ...} or .txt files (one document per file). Every document is encoded as
          `tokenizer(text)` encodes it, with the special tokens the tokenizer adds itself (BOS for Gemma,
          Llama-2/3; nothing for GPT-2-style tokenizers such as SmolLM2's), and followed by EOS (unless
          the tokenizer ends every text with EOS itself): the stream is BOS doc EOS BOS doc EOS ..., as the
          models were pretrained (torchtune's text-completion packing; run_clm.py and litgpt also keep the
          tokenizer's BOS). The documents are concatenated in the order given and cut into blocks of
          `max_length` tokens. Where the tokenizer adds BOS, every block starts with BOS, as every input
          does at inference: a block that would start inside a document is BOS + the next max_length - 1
          tokens (plain concatenation, as run_clm.py, litgpt and torchtune cut, would start it without
          one, and a BOS model is off there: Gemma-3 270m on the Apache-2.0 license text, 1024-token
          blocks, loss 3.08 and 3.36 on the blocks after the first without BOS, 2.28 and 2.21 with it).
          Without BOS (GPT-2-style tokenizers) the stream is cut plainly. The tail shorter than a block
          is dropped; held-out text is packed the same way and its tail scored too.
  model   PEFT LoRA on every linear layer except lm_head: W = W0 + s·B·A, s = alpha/r (Hu et al. 2022);
          with DoRA: W = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖, norm per output row (Liu et al. 2024).
  loss    mean next-token cross-entropy over the batch (every position of a block is a real token).
  step    `batch_size` blocks per optimizer step, split over processes and micro-batches (gradient
          accumulation); gradients clipped to norm `max_grad_norm`; AdamW; lr rises linearly for
          `warmup_steps`, then falls linearly to 0 at the last step.
  order   the data is one endless stream of shuffled epochs; epoch e visits the blocks in the order
          randperm(n_blocks) drawn from a generator seeded with (seed, e); step t reads stream positions
          [t·B, (t+1)·B). So the data position is the step number, and a resumed run reads exactly the
          blocks the uninterrupted one would. Steps = max_steps, or ceil(epochs · n_blocks / B).

Files:
  OUT/          adapter_config.json + adapter_model.safetensors (peft.PeftModel.from_pretrained),
                README.md (model card: data, steps, tokens, losses), training_log.jsonl
  OUT.partial/  (or `checkpoint_dir`) while training; it survives an interruption and is deleted on
                success: run.json (settings, and "format": "readapt-train-checkpoint", which marks the
                folder as readapt's), training_log.jsonl, step-NNNNNN/ (the latest checkpoint: trainable
                tensors, optimizer, scheduler, RNG state of every process, counters). Only a new or empty
                folder, or one so marked, is used; only these files are ever deleted, and the folder
                itself only if readapt made it and nothing else is left in it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from readapt.errors import ReadaptError

PathLike = str | os.PathLike
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".md")


# ---------------------------------------------------------------------------------------------------
# data


def read_texts(path: PathLike) -> list[str]:
    """The documents of one data file: JSON lines with a string "text" field, or a plain-text file (one
    document). Blank lines and empty texts are skipped; anything else malformed is an error naming the
    file and line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ReadaptError(f"data file {path} does not exist")
    if not path.is_file():
        raise ReadaptError(f"data path {path} is not a file; pass .jsonl or .txt files (--data may repeat)")
    suffix = path.suffix.lower()
    docs: list[str] = []
    try:
        if suffix in JSONL_SUFFIXES:
            from readapt.userfiles import read_jsonl

            for rec in read_jsonl(path, required=("text",)):
                if not isinstance(rec["text"], str):
                    raise ReadaptError(f'{path}:{rec["_line"]}: "text" is a {type(rec["text"]).__name__}, '
                                       f'not a string')
                if rec["text"].strip():
                    docs.append(rec["text"])
        elif suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8")
            if text.strip():
                docs.append(text)
        else:
            raise ReadaptError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; use JSON lines "
                               f'(.jsonl, one {{"text": ...}} per line) or plain text (.txt)')
    except UnicodeDecodeError as err:
        raise ReadaptError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not docs:
        raise ReadaptError(f"{path} contains no text; remove it from --data or fill it")
    return docs


def pack(docs: Sequence[str], tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokenizer(doc_1) EOS tokenizer(doc_2) EOS ... cut into (blocks [n_blocks, max_length], tail
    [< max_length]), int32. Each document gets the special tokens `tokenizer(text)` adds (BOS where the
    model was pretrained with it), then EOS unless the tokenizer itself ends every text with EOS. Where the
    tokenizer adds BOS, a block that would start inside a document is BOS + the next max_length - 1 tokens."""
    eos = tokenizer.eos_token_id
    added = tokenizer("")["input_ids"]  # the special tokens the tokenizer puts around any text
    bos = added[0] if added and added[0] == tokenizer.bos_token_id else None
    end = [] if added and added[-1] == eos else [eos]
    pieces = []
    for i in range(0, len(docs), 1000):  # batches of documents: the fast tokenizer runs them in parallel
        for ids in tokenizer(list(docs[i:i + 1000]), verbose=False)["input_ids"]:
            pieces.append(torch.tensor([*ids, *end], dtype=torch.int32))
    stream = torch.cat(pieces)  # [n_tokens]
    if bos is None:
        n = stream.numel() // max_length
        return stream[: n * max_length].view(n, max_length), stream[n * max_length:]
    chunks, pos, head = [], 0, torch.tensor([bos], dtype=torch.int32)
    while pos < stream.numel():
        at_bos = bool(stream[pos] == bos)
        take = max_length if at_bos else max_length - 1
        chunks.append(stream[pos:pos + take] if at_bos else torch.cat([head, stream[pos:pos + take]]))
        pos += take
    full = chunks if chunks[-1].numel() == max_length else chunks[:-1]
    tail = chunks[-1] if len(full) < len(chunks) else stream[:0]
    return (torch.stack(full) if full else stream.new_empty(0, max_length)), tail


def load_blocks(files: Sequence[PathLike], tokenizer, max_length: int, what: str = "--data"
                ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Read, tokenize and pack every file (in order) -> (blocks, tail, per-file summary)."""
    if not files:
        raise ReadaptError(f"no {what} files given")
    docs, summary = [], []
    for f in files:
        d = read_texts(f)
        docs += d
        summary.append({"file": str(Path(f).expanduser().absolute()), "documents": len(d)})
    blocks, tail = pack(docs, tokenizer, max_length)
    return blocks, tail, summary


# ---------------------------------------------------------------------------------------------------
# model


def lora_model(base: PathLike, *, rank: int = 64, alpha: float = 128, dropout: float = 0.05, dora: bool = True,
               target_modules: str | list[str] = "all-linear", dtype: torch.dtype = torch.float32,
               gradient_checkpointing: bool = False, progress_bar: bool = True):
    """BASE (a transformers causal LM folder) wrapped by PEFT with a fresh LoRA/DoRA adapter.

    B is zero at initialisation (PEFT's default), so the wrapped model computes exactly what BASE does.
    gradient_checkpointing: keep only each layer's input and recompute the rest in the backward pass
    (Chen et al. 2016): activation memory of one layer instead of all, for ~1/3 more compute."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress_bar:  # transformers' "Loading weights" bar; the global setting is put back after
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.config.use_cache = False  # no KV cache while training
    if gradient_checkpointing:  # transformers 5 renamed it activation_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=dora,
                        target_modules=target_modules, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 reads model.is_gradient_checkpointing, deprecated in transformers 5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def looks_instruct(spec: str, tokenizer) -> str | None:
    """Why BASE looks like an instruct/chat model (None if it does not): a name with instruct/chat/-it/sft,
    or a tokenizer with a chat template (some pretrained releases ship one too, hence only a warning)."""
    name = Path(str(spec).rstrip("/")).name
    if re.search(r"instruct|chat|(^|[-_.])(it|sft|dpo|rlhf)([-_.]|$)", name, re.IGNORECASE):
        return f"its name {name!r} says instruct/chat"
    if getattr(tokenizer, "chat_template", None):
        return "its tokenizer has a chat template"
    return None


# ---------------------------------------------------------------------------------------------------
# checkpoints (for --resume)


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


CHECKPOINT_FORMAT = "readapt-train-checkpoint"  # run.json's "format": this folder is readapt's
_OWN_FILES = re.compile(r"training_log\.jsonl|\.?step-\d{6}(\.tmp)?")  # and run.json, removed last


def _run_json(ckpt_dir: Path) -> dict | None:
    """run.json of a checkpoint folder made by readapt train; None for any other folder (or none)."""
    try:
        run = json.loads((ckpt_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and run.get("format") == CHECKPOINT_FORMAT else None


def _check_checkpoint_dir(ckpt_dir: Path, out: Path, inputs: Sequence[Path]) -> None:
    """Refuse a checkpoint folder that is, holds or lies inside the output or an input, or that exists,
    is not empty and was not made by readapt train: those are the user's files, never to be deleted."""
    here = ckpt_dir.resolve()
    for role, other in [("the output", out)] + [("the input", p) for p in inputs]:
        other = Path(other).expanduser().resolve()
        if here == other or other in here.parents or here in other.parents:
            raise ReadaptError(f"the checkpoint folder {ckpt_dir} overlaps {role} {other} (the same folder, or one "
                               f"inside the other); choose another --checkpoint-dir (nothing was touched)")
    if ckpt_dir.exists() and not (ckpt_dir.is_dir() and (_run_json(ckpt_dir) or not any(ckpt_dir.iterdir()))):
        raise ReadaptError(f"the checkpoint folder {ckpt_dir} exists and was not made by readapt train (no run.json "
                           f"of ours); choose a new or empty --checkpoint-dir (nothing was touched)")


def _remove_checkpoints(ckpt_dir: Path) -> None:
    """Delete what readapt train wrote in its checkpoint folder (run.json last: it marks the folder), then the
    folder if readapt made it and nothing else is in it. Files someone else put there stay."""
    run = _run_json(ckpt_dir)
    if run is None:
        return
    for p in ckpt_dir.iterdir():
        if _OWN_FILES.fullmatch(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (ckpt_dir / "run.json").unlink()
    if run.get("created_folder"):
        try:
            ckpt_dir.rmdir()
        except OSError:  # not empty: someone else's files are in it
            pass


@contextmanager
def _discard_unless_resumable(ckpt_dir: Path, main: bool):
    """On any failure, delete the checkpoints (_remove_checkpoints) if there is none to resume from."""
    try:
        yield
    except BaseException:
        if main and _latest(ckpt_dir) is None:
            _remove_checkpoints(ckpt_dir)
        raise


def _latest(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("step-[0-9]*")) if ckpt_dir.is_dir() else []
    return found[-1] if found else None


def _save_checkpoint(acc, ckpt_dir: Path, step: int, model, optimizer, scheduler, counters: dict) -> None:
    """Write ckpt_dir/step-NNNNNN atomically (temporary folder, then rename) and delete older ones."""
    from safetensors.torch import save_file

    final, tmp = ckpt_dir / f"step-{step:06d}", ckpt_dir / f".step-{step:06d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(acc.unwrap_model(model))},
                  tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(counters) + "\n")
    acc.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-{acc.process_index}.pt")  # dropout masks: one RNG per process
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp.rename(final)
        for old in ckpt_dir.glob("step-[0-9]*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _load_checkpoint(acc, path: Path, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    saved = load_file(path / "trainable.safetensors")
    params = dict(_trainable(acc.unwrap_model(model)))
    if set(saved) != set(params):
        raise ReadaptError(f"checkpoint {path} holds other tensors than this model trains; "
                           f"start over with --overwrite")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng-{acc.process_index}.pt"
    if rng_file.exists():  # absent when resuming with more processes than before
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------------------------------------------
# training


def _precision(mixed_precision: str | None) -> str:
    """'auto'/None -> what `accelerate launch` was configured with, else bf16 on a GPU that supports it."""
    if mixed_precision not in (None, "auto"):
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise ReadaptError(f"precision {mixed_precision!r}: use auto, no, bf16 or fp16")
        return mixed_precision
    env = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if env != "no":
        return env
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, tail: torch.Tensor, micro_batch_size: int, acc) -> dict:
    """Held-out mean next-token loss over every token (full blocks plus the shorter tail), and exp(loss).

    Blocks are split over processes; sums are reduced across them."""
    model.eval()
    mine = [blocks[i:i + micro_batch_size] for i in range(0, len(blocks), micro_batch_size)]
    if tail.numel() >= 2:
        mine.append(tail[None])
    mine = mine[acc.process_index::acc.num_processes]
    total, count = torch.zeros((), device=acc.device, dtype=torch.float64), 0
    for x in mine:
        x = x.long().to(acc.device)  # [b, T]
        loss = model(input_ids=x, labels=x).loss  # mean over b·(T-1) predicted tokens
        n = x.shape[0] * (x.shape[1] - 1)
        total += loss.double() * n
        count += n
    total = acc.reduce(total, "sum")
    count = int(acc.reduce(torch.tensor(count, device=acc.device), "sum"))
    model.train()
    loss = float(total) / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": count}


def _order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_blocks, generator=g)


def _stream(start: int, count: int, n_blocks: int, seed: int, cache: dict) -> torch.Tensor:
    """Block indices at stream positions [start, start + count) of the endless shuffled-epoch stream."""
    out = []
    for pos in range(start, start + count):
        e = pos // n_blocks
        if e not in cache:
            cache.clear()
            cache[e] = _order(n_blocks, seed, e)
        out.append(cache[e][pos % n_blocks])
    return torch.stack(out)


def train(
    base: PathLike,
    data: PathLike | Sequence[PathLike],
    out: PathLike,
    *,
    rank: int = 64,
    alpha: float = 128,
    dropout: float = 0.05,
    dora: bool = True,
    lr: float = 2e-4,
    epochs: float = 1.0,
    max_steps: int | None = None,
    batch_size: int = 20,
    micro_batch_size: int | None = None,
    max_length: int = 1024,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    eval_data: PathLike | Sequence[PathLike] | None = None,
    target_modules: str | list[str] = "all-linear",
    save_every: int | None = 500,
    checkpoint_dir: PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    precision: str | None = "auto",
    gradient_checkpointing: bool = False,
    quiet: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> Path:
    """Train a knowledge adapter Ψ (LoRA, or DoRA when `dora`) on BASE with next-token prediction on the
    unlabeled text in `data`; write a PEFT adapter folder to `out` and return its path.

    Defaults are the RE-Adapt paper's (Table 4): all linear layers, r=64, lora_alpha=128, dropout 0.05,
    DoRA, batch 20, AdamW, lr 2e-4, linear schedule; the paper trained 10 epochs (3 on the smaller
    corpus). The protocol (packing, data order, accumulation) is in this module's docstring.

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
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer, get_linear_schedule_with_warmup

    from readapt.checkpoint import output_folder, resolve_model
    from readapt.numerics import is_finite

    # ---- check everything cheap before loading anything heavy
    files = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    eval_files = [] if eval_data is None else [eval_data] if isinstance(eval_data, (str, os.PathLike)) \
        else list(eval_data)
    _check_numbers(rank=rank, alpha=alpha, dropout=dropout, lr=lr, epochs=epochs, max_steps=max_steps,
                   batch_size=batch_size, micro_batch_size=micro_batch_size, max_length=max_length,
                   warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                   save_every=save_every, seed=seed)
    out = Path(out).expanduser().absolute()
    ckpt_dir = Path(checkpoint_dir).expanduser().absolute() if checkpoint_dir else out.parent / f"{out.name}.partial"
    if out.exists() and not overwrite:
        raise ReadaptError(f"output folder {out} already exists; pass --overwrite (overwrite=True) to replace it")
    base_path = resolve_model(base)
    if not (base_path / "config.json").exists():
        raise ReadaptError(f"{base_path} has no config.json: BASE must be a transformers causal-LM checkpoint")
    for src in (base_path, *files, *eval_files):  # never write over (or delete, with --overwrite) an input
        src = Path(src).expanduser().resolve()
        if src == out.resolve() or out.resolve() in src.parents or src in out.resolve().parents:
            raise ReadaptError(f"output folder {out} overlaps the input {src}; choose another -o")
    _check_checkpoint_dir(ckpt_dir, out, [base_path, *files, *eval_files])

    precision = _precision(precision)
    acc = Accelerator(mixed_precision=precision)
    main = acc.is_main_process
    say = (lambda msg: print(f"readapt train: {msg}", file=sys.stderr, flush=True)) if main and not quiet \
        else (lambda msg: None)
    P = acc.num_processes
    if batch_size % P:
        raise ReadaptError(f"batch_size={batch_size} is not a multiple of the {P} processes; change --batch-size")
    local = batch_size // P  # blocks per process per step
    micro = min(micro_batch_size or local, local)
    if local % micro:
        raise ReadaptError(f"micro_batch_size={micro_batch_size} does not divide the {local} blocks each "
                           f"process runs per step (batch_size {batch_size} / {P} processes)")
    accum = local // micro

    from readapt.userfiles import config_errors

    with config_errors(base_path / "config.json"):  # first: the tokenizer reads it too
        n_ctx = getattr(AutoConfig.from_pretrained(base_path, local_files_only=True), "max_position_embeddings", None)
    if n_ctx and max_length > n_ctx:
        raise ReadaptError(f"max_length={max_length} exceeds the context of {base_path} "
                           f"(max_position_embeddings={n_ctx}); lower --max-length")

    # ---- data
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ReadaptError(f"cannot load a tokenizer from {base_path} ({err}); BASE needs its tokenizer "
                           f"files") from None
    if tokenizer.eos_token_id is None:
        raise ReadaptError(f"the tokenizer of {base_path} has no EOS token, which separates documents")
    blocks, _, data_summary = load_blocks(files, tokenizer, max_length)
    n_blocks = len(blocks)
    n_tokens = int(blocks.numel())
    if n_blocks == 0:
        raise ReadaptError(f"the training text has fewer tokens than one block of max_length={max_length}; "
                           f"add text or lower --max-length (nothing was trained)")
    eval_blocks = eval_tail = None
    if eval_files:
        eval_blocks, eval_tail, _ = load_blocks(eval_files, tokenizer, max_length, "--eval-data")
        if eval_blocks.numel() + eval_tail.numel() < 2:
            raise ReadaptError("the --eval-data text has fewer than 2 tokens; nothing to score")
    total_steps = max_steps or math.ceil(epochs * n_blocks / batch_size)
    why = looks_instruct(str(base), tokenizer)
    if why and main:
        warnings.warn(f"BASE {base} looks like an instruct/chat model ({why}). RE-Adapt trains the knowledge "
                      f"adapter on the PRETRAINED model and re-applies instruction tuning with "
                      f"`readapt merge PRETRAINED --add KNOWLEDGE:a --add RE_ADAPTER:b`; "
                      f"ignore this if BASE is the pretrained one.", stacklevel=2)

    # ---- run settings; a resumed run must have the same ones
    base_name = str(base_path.absolute()) if Path(str(base)).expanduser().exists() else str(base)  # folder or hub id
    settings = {
        "base": base_name, "data": data_summary, "data_sha256": hashlib.sha256(blocks.numpy().tobytes()).hexdigest(),
        "rank": rank, "alpha": alpha, "dropout": dropout, "dora": dora, "target_modules": target_modules,
        "lr": lr, "epochs": epochs, "max_steps": max_steps, "total_steps": total_steps, "batch_size": batch_size,
        "max_length": max_length, "warmup_steps": warmup_steps, "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm, "seed": seed,
    }
    latest = _latest(ckpt_dir)
    if latest and not resume:
        if not overwrite:
            raise ReadaptError(f"an interrupted run left checkpoints in {ckpt_dir}: pass --resume to continue it, "
                               f"or --overwrite to start over")
    if resume and latest:
        saved = _run_json(ckpt_dir) or {}
        changed = [k for k in settings if saved.get(k) != settings[k]]
        if changed:
            raise ReadaptError(f"cannot resume from {latest}: these settings differ from the interrupted run: "
                               + ", ".join(f"{k} {saved.get(k)!r} -> {settings[k]!r}" for k in changed)
                               + "; use the same ones, or --overwrite to start over")
    else:
        latest = None
    acc.wait_for_everyone()
    if main and latest is None:  # a fresh start: readapt's files of an earlier run go, nothing else
        created = (_run_json(ckpt_dir) or {}).get("created_folder", not ckpt_dir.exists())
        _remove_checkpoints(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        run = {"format": CHECKPOINT_FORMAT, "created_folder": created, **settings}
        (ckpt_dir / "run.json").write_text(json.dumps(run, indent=2, allow_nan=False) + "\n")
    acc.wait_for_everyone()

    with _discard_unless_resumable(ckpt_dir, main):  # a failure before the first checkpoint leaves nothing
        # ---- model, optimizer, schedule
        set_seed(seed)  # same LoRA A initialisation in every process
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        model = lora_model(base_path, rank=rank, alpha=alpha, dropout=dropout, dora=dora,
                           target_modules=target_modules, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                           progress_bar=main and not quiet)
        model.peft_config["default"].base_model_name_or_path = base_name  # what PeftModel.from_pretrained reads
        params = [p for _, p in _trainable(model)]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        # not passed to acc.prepare, which would step it once per process: we step it once per optimizer step
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        model, optimizer = acc.prepare(model, optimizer)
        model.train()

        log_path = ckpt_dir / "training_log.jsonl"
        counters = {"step": 0, "tokens": 0, "train_seconds": 0.0}
        if latest is not None:
            counters = _load_checkpoint(acc, latest, model, optimizer, scheduler)
            say(f"resuming from {latest} (step {counters['step']} of {total_steps})")
            if main:  # drop log lines written after the checkpoint; they will be written again
                lines = log_path.read_text().splitlines() if log_path.exists() else []
                log_path.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= counters["step"]))
        elif resume:
            say(f"no checkpoint in {ckpt_dir}; starting from step 0")

        def log(record: dict) -> None:
            if main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if callback:
                    callback(record)

        say(f"{n_blocks} blocks of {max_length} tokens from {len(files)} file(s); {total_steps} steps of "
            f"{batch_size} blocks ({P} process(es) x {accum} micro-batch(es) of {micro}); "
            f"{sum(p.numel() for p in params):,} trainable parameters; precision {precision}; device {acc.device}")
        if eval_blocks is not None and latest is None:
            before = evaluate(model, eval_blocks, eval_tail, micro, acc)
            log({"step": 0, **before})
            say(f"held-out loss before training {before['eval_loss']:.4f} (perplexity {before['eval_perplexity']:.2f})")

        # ---- the loop
        quiet_bar = quiet or not main or (not sys.stderr.isatty() and not os.environ.get("READAPT_PROGRESS"))
        bar = tqdm(total=total_steps, initial=counters["step"], desc="train", unit="step", disable=quiet_bar)
        cache: dict = {}
        loss_value = float("nan")
        for step in range(counters["step"], total_steps):
            t0 = time.perf_counter()
            idx = _stream(step * batch_size, batch_size, n_blocks, seed, cache)  # [B] global
            idx = idx[acc.process_index * local:(acc.process_index + 1) * local]  # [local] this process
            loss_sum = torch.zeros((), device=acc.device)
            for j in range(accum):
                x = blocks[idx[j * micro:(j + 1) * micro]].long().to(acc.device)  # [micro, T]
                sync = acc.no_sync(model) if j < accum - 1 else nullcontext()  # DDP all-reduce on the last only
                with sync:
                    loss = model(input_ids=x, labels=x).loss  # mean over micro·(T-1) tokens
                    acc.backward(loss / accum)
                loss_sum += loss.detach()
            if max_grad_norm:
                acc.clip_grad_norm_(params, max_grad_norm)
            lr_now = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(acc.reduce(loss_sum / accum, "mean"))
            dt = time.perf_counter() - t0
            counters["step"] = step + 1
            counters["tokens"] += batch_size * max_length
            counters["train_seconds"] += dt
            record = {"step": step + 1, "epoch": round((step + 1) * batch_size / n_blocks, 4), "loss": loss_value,
                      "lr": lr_now, "tokens": counters["tokens"],
                      "tokens_per_s": round(batch_size * max_length / dt, 1)}
            log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if save_every and (step + 1) % save_every == 0 and step + 1 < total_steps:
                _save_checkpoint(acc, ckpt_dir, step + 1, model, optimizer, scheduler, counters)
        bar.close()
        bad = next((n for n, p in _trainable(acc.unwrap_model(model)) if not is_finite(p.detach())), None)
        if bad is not None:  # every process holds the same parameters, so every process stops here
            raise ReadaptError(f"training diverged: {bad} has NaN/Inf values (last loss {loss_value}); nothing "
                               f"was written: lower --lr or --alpha, or raise --warmup-steps")

        after = None
        if eval_blocks is not None:
            after = evaluate(model, eval_blocks, eval_tail, micro, acc)
            log({"step": total_steps, **after})
            say(f"held-out loss after training {after['eval_loss']:.4f} (perplexity {after['eval_perplexity']:.2f})")

        # ---- output: PEFT adapter folder + log + model card, written all at once
        acc.wait_for_everyone()
        if main:
            records = [json.loads(l) for l in log_path.read_text().splitlines()]
            with output_folder(out, overwrite=overwrite, inputs=[base_path, *files, *eval_files]) as tmp:
                acc.unwrap_model(model).save_pretrained(tmp)
                shutil.copyfile(log_path, tmp / "training_log.jsonl")
                (tmp / "README.md").write_text(_model_card(settings, records, n_blocks, n_tokens, counters,
                                                           eval_files, P, precision))
            _remove_checkpoints(ckpt_dir)
            say(f"wrote {out} ({total_steps} steps, {counters['tokens']:,} tokens, last loss {loss_value:.4f})")
    acc.wait_for_everyone()
    return out


def _check_numbers(**values) -> None:
    """Every numeric setting of `train` in its range, named as the command line spells it (--max-steps)."""
    def integer(v, low, high=None):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v < high)

    def real(v, low, strict=True):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > low if strict
                                                                                                   else v >= low)
    v = values
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


def _model_card(settings: dict, records: list[dict], n_blocks: int, n_tokens: int, counters: dict,
                eval_files: list, processes: int, precision: str) -> str:
    """README.md of the adapter folder: what it was trained on, how, and the losses."""
    s = settings
    train_losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    kind = "DoRA" if s["dora"] else "LoRA"
    data_rows = "\n".join(f"| `{d['file']}` | {d['documents']} |" for d in s["data"])
    first = f"{train_losses[0]:.4f}" if train_losses else "-"
    last = f"{sum(train_losses[-10:]) / len(train_losses[-10:]):.4f}" if train_losses else "-"
    lines = [
        "---", f"base_model: {s['base']}", "library_name: peft", "tags: [readapt, knowledge-adapter, "
        f"{kind.lower()}]", "---", "",
        f"# Knowledge adapter ({kind}, rank {s['rank']})", "",
        f"A {kind} adapter trained with `readapt train` on `{s['base']}` by next-token prediction on the "
        f"unlabeled text below (the knowledge adapter Ψ of RE-Adapt, Fleshman & Van Durme 2024).", "",
        "## Data", "", "| file | documents |", "|---|---|", data_rows, "",
        f"{n_tokens:,} tokens in {n_blocks:,} blocks of {s['max_length']} tokens (each document as the tokenizer "
        f"encodes it, then EOS; each block starts with BOS where the tokenizer adds one); "
        f"sha256 of the token blocks `{s['data_sha256'][:16]}`.", "",
        "## Training", "",
        f"- {counters['step']} optimizer steps of {s['batch_size']} blocks: {counters['tokens']:,} tokens seen, "
        f"{counters['step'] * s['batch_size'] / n_blocks:.2f} epochs",
        f"- {kind}: r={s['rank']}, lora_alpha={s['alpha']}, dropout={s['dropout']}, target modules "
        f"{s['target_modules']}",
        f"- AdamW lr={s['lr']}, weight decay {s['weight_decay']}, linear schedule with {s['warmup_steps']} warmup "
        f"steps, gradient clipping {s['max_grad_norm']}, seed {s['seed']}",
        f"- {processes} process(es), precision {precision}, {counters['train_seconds']:.0f} s of training",
        f"- training loss: first step {first}, mean of the last 10 steps {last}",
    ]
    if evals:
        lines += ["", "## Held-out loss", "", f"Files: {', '.join(f'`{Path(f).absolute()}`' for f in eval_files)}", "",
                  "| step | loss | perplexity |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['eval_loss']:.4f} | {r['eval_perplexity']:.3f} |" for r in evals]
    lines += ["", "## Use", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM",
              f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({s['base']!r}), THIS_FOLDER)",
              "```", "", "RE-Adapt (partial adaptation) with the instruction difference Δ = INSTRUCT − BASE:", "",
              "```", "readapt extract BASE INSTRUCT -o re_adapter/",
              "readapt merge BASE --add THIS_FOLDER:0.5 --add re_adapter/:0.5 -o merged/", "```", "",
              "`training_log.jsonl` has the loss of every step.", ""]
    return "\n".join(lines)
