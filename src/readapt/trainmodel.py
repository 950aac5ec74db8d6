"""The model a knowledge adapter is trained on: the base wrapped with a fresh PEFT LoRA/DoRA adapter, the
precision it trains in, and its held-out loss.

    LoRA   W = W0 + s·B·A, s = alpha/r, on every linear layer except lm_head (Hu et al. 2022)
    DoRA   W = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖, norm per output row (Liu et al. 2024)
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import torch

from readapt.errors import ReadaptError


def lora_model(base: str | os.PathLike, *, rank: int = 64, alpha: float = 128, dropout: float = 0.05, dora: bool = True,
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


def train_precision(mixed_precision: str | None) -> str:
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
def heldout_loss(model, blocks: torch.Tensor, tail: torch.Tensor, micro_batch_size: int, acc) -> dict:
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
