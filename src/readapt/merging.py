"""Partial adaptation: Ω = Φ + Σᵢ sᵢ·Ψᵢ, streamed to a Hugging Face model folder or built in memory.

This module orchestrates: it opens the base and the addends (readapt.addends), walks the base tensors and
hands each to the one combine (readapt.combine), whole or block by block, and writes or copies the result.

RE-Adapt §3.2 ("partial adaptation"): Ω = Φ + αΨ + βΔ with a knowledge adapter Ψ and the RE-Adapter Δ,
each with its own scale (α=β=0.5 was robust in the paper; β alone below 1 can improve the instruct model,
Figure 6). An addend Ψᵢ is any of

    a delta folder (readapt extract)      Ψ[n] = Δ[n]
    a full checkpoint of the same family  Ψ[n] = Θ[n] − Φ[n]   ("--add INSTRUCT:0.5", no delta written)
    a PEFT LoRA / DoRA adapter folder     Ψ[n] = s·B·A, or W′ − W for DoRA (readapt.addends.lora)

Several addends on one tensor combine as the sum of their weight-space differences (PEFT, by contrast,
merges adapters one after the other, so a second DoRA adapter sees the first one's output). All
arithmetic is float32; the result is cast to the base checkpoint's dtype (or `dtype`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from readapt.addends import Addend, AddSpec, normalise, open_addend
from readapt.cards import merge_card
from readapt.checkpoint import (Blocks, Checkpoint, ReadOptions, TensorInfo, aligned_blocks, copy_side_files,
                                float32_view, open_model, output_folder, progress, read_rows, reader, row_spans,
                                write_tensors)
from readapt.combine import Observer, combine, keep_exact
from readapt.errors import ReadaptError
from readapt.interference import INTERFERENCE_FILE, Interference
from readapt.numerics import is_finite, parse_dtype, precision


def open_inputs(base: str | os.PathLike, adds: Sequence[AddSpec], skip_missing: bool = False,
                read: ReadOptions | None = None) -> tuple[Checkpoint, list[tuple[Addend, float]]]:
    """The base checkpoint and each addend opened for it (already opened Addends kept), with its scale."""
    b = open_model(base, read, fix="pass the model it applies to as the base and this folder with --add")
    addends = [(spec if isinstance(spec, Addend) else open_addend(spec, b, skip_missing=skip_missing, read=read), s)
               for spec, s in normalise(adds)]
    return b, addends


def iter_merged(base: Checkpoint, addends: Sequence[tuple[Addend, float]],
                dtype: torch.dtype | None = None, copy_untouched: bool = False, whole_tensors: bool = False,
                stats: Interference | None = None
                ) -> Iterator[tuple[str, torch.Tensor | TensorInfo | Blocks]]:
    """Yield (name, Ω[name]) for every base tensor, Ω = Φ + Σ sᵢ·Ψᵢ in float32, cast to `dtype`
    (default: each tensor's own dtype). With copy_untouched, a tensor no addend touches (and no cast
    changes) is yielded as its location, which write_tensors copies in blocks without loading it.
    Touched tensors are yielded as `Blocks` computed block by block from the files: element blocks where
    only delta/checkpoint addends touch them, blocks of whole rows where a LoRA/DoRA term does (`_by_rows`).
    Only 1-D tensors (biases, norms) and pure casts are yielded whole. whole_tensors: LoRA/DoRA terms on
    whole tensors as before (`_whole`, ~2.4× the largest touched tensor), bit for bit PEFT's merge also for
    DoRA on embeddings larger than one block (whose norm `_by_rows` sums in float64). `stats` accumulates
    how the addends meet (readapt.interference) as the tensors are computed."""
    touched = [(a, s, set(a.targets())) for a, s in addends]
    for name in base.names:
        terms = [(a, s) for a, s, names in touched if name in names]
        observe = _observer(stats, name, [i for i, (_, _, names) in enumerate(touched) if name in names])
        yield name, merged(base, name, terms, dtype, copy_untouched, whole_tensors, observe)


def merged(base: Checkpoint, name: str, terms: Sequence[tuple[Addend, float]], dtype: torch.dtype | None = None,
           copy_untouched: bool = False, whole_tensors: bool = False, observe: Observer | None = None
           ) -> torch.Tensor | TensorInfo | Blocks:
    """Ω[name] = Φ[name] + Σ sᵢ·Ψᵢ[name] over the addends `terms` that touch it, as iter_merged yields it."""
    floating = base.dtype(name).is_floating_point
    if not terms and (dtype is None or dtype == base.dtype(name) or not floating):
        return base.stored(name) if copy_untouched else base.read(name)
    out_dtype = (dtype or base.dtype(name)) if floating else base.dtype(name)
    if terms and floating and all(a.elementwise for a, _ in terms):
        return Blocks(out_dtype, base.shape(name), _elementwise(name, base, terms, dtype, observe))
    if terms and floating and len(base.shape(name)) >= 2 and not whole_tensors:
        return Blocks(out_dtype, base.shape(name), _by_rows(name, base, terms, dtype, observe))
    W = base.read(name)
    if terms and floating:
        W = W.float()  # Φ in float32 (a fresh buffer unless it already was float32; the raw one is freed)
        W = _whole(name, W, terms, observe)
    W = W.to(out_dtype)
    if not is_finite(W):
        raise _not_finite(name, base, terms, dtype)
    return W


def _not_finite(name: str, base: Checkpoint, terms, dtype) -> ReadaptError:
    """The error for a non-finite Ω[name]: the base's own NaN/Inf, or what the merge added."""
    if not is_finite(base.read(name)):
        return ReadaptError(f"tensor {name!r} of the base checkpoint {base.path} has NaN/Inf values")
    cause = f"adding {', '.join(a.label for a, _ in terms)}" if terms else f"casting to {dtype}"
    return ReadaptError(f"tensor {name!r} has NaN/Inf after {cause} (check the adapter, scale and dtype); "
                        f"nothing was written")


def _elementwise(name: str, base: Checkpoint, terms: Sequence[tuple[Addend, float]],
                 dtype: torch.dtype | None, observe: Observer | None = None) -> Iterator[torch.Tensor]:
    """Ω[name] block by block for elementwise addends (delta folders: Ψ = D; checkpoints: Φ′): the one
    combine on BLOCK-element float32 blocks read side by side from the base's and the addends' files.
    Memory: one block of each input, reused, whatever the tensor's size. Each output block is finite-checked
    while it is in cache. A single delta folder's recorded exceptions (`exact`: Φ + Δ ≠ Θ there) are blended
    as lerp(Φ, Θ, s) instead (combine.keep_exact)."""
    out_dtype = dtype or base.dtype(name)
    sources = [base.stored(name)] + [a.stored(name) for a, _ in terms]
    n = min(math.prod(base.shape(name)), reader.BLOCK)
    bufs = [torch.empty(n) if s.dtype != torch.float32 else None for s in sources]  # float32 work buffers
    out = torch.empty(n, dtype=out_dtype) if out_dtype != torch.float32 else None
    kinds = [(s, a.stores_target) for a, s in terms]  # stores_target: the addend stores Φ′, else Ψ
    fix = terms[0][0].exact(name) if len(terms) == 1 else None
    start = 0
    for blocks in aligned_blocks(*sources):
        W, *xs = [float32_view(b, buf) for b, buf in zip(blocks, bufs)]
        if fix is not None:  # Φ and Θ at the recorded elements of this block, before W changes
            at, theta = fix.upto(start + W.numel())
            at = at - start
            phi = W[at]
        start += W.numel()
        W = combine(W, [(x, s, is_target) for x, (s, is_target) in zip(xs, kinds)], observe)
        if fix is not None:
            W = keep_exact(W, at, phi, theta, kinds[0][0])
        W = W if out is None else out[: W.numel()].copy_(W)
        if not is_finite(W):
            raise _not_finite(name, base, terms, dtype)
        yield W


def _by_rows(name: str, base: Checkpoint, terms: Sequence[tuple[Addend, float]],
             dtype: torch.dtype | None, observe: Observer | None = None, block: int | None = None
             ) -> Iterator[torch.Tensor]:
    """Ω[name] in blocks of whole rows (checkpoint.row_spans, ~`block` elements, default reader.BLOCK): the
    one combine on the float32 base rows W and each addend's rows of Ψ or Φ′ (`Addend.rows`: s·B[rows]·A
    for a LoRA term, DoRA's W′ rows). Memory: a block of rows, the factors and DoRA's m and norm, whatever
    the tensor's size. Bit for bit `_whole` (and PEFT's merge), except DoRA on an embedding of more than one
    block, whose norm over the vocabulary is summed in float64 (DoraVariant.stored_norm)."""
    out_dtype = dtype or base.dtype(name)
    stored = base.stored(name)
    for r0, r1 in row_spans(base.shape(name), block):
        W = read_rows(stored, r0, r1).float()

        def produced():
            for addend, s in terms:
                x, is_target = addend.rows(name, W, r0, stored)
                yield x, s, is_target

        W = combine(W, produced(), observe)
        W = W.to(out_dtype)
        if not is_finite(W):
            raise _not_finite(name, base, terms, dtype)
        yield W.view(-1)


def _whole(name: str, W: torch.Tensor, terms: Sequence[tuple[Addend, float]],
           observe: Observer | None = None) -> torch.Tensor:
    """Φ + Σ sᵢ·Ψᵢ for one tensor, in place on the float32 base tensor W: each addend gives its full
    weight Φ′ where it defines one (a checkpoint, DoRA's W′: combine lerps), else its Ψ."""
    def produced():
        for addend, s in terms:
            target = addend.target(name, W)
            yield (target, s, True) if target is not None else (addend.delta(name, W), s, False)

    return combine(W, produced(), observe)


def _observer(stats: Interference | None, name: str, which: list[int]) -> Observer | None:
    """combine's observer for tensor `name`, touched by the addends numbered `which`: feeds `stats`."""
    if stats is None or not which:
        return None
    return lambda W, diffs: stats.add(name, W, [(i, d, s) for i, (d, s) in zip(which, diffs) if d is not None])


def merge(base: str | os.PathLike, out: str | os.PathLike, adds: Sequence[AddSpec], *,
          dtype: str | torch.dtype | None = None, skip_missing: bool = False, overwrite: bool = False,
          max_shard_size: int | str = "5GB", allow_pickle: bool = False,
          extra_files: dict[str, str] | None = None, read: ReadOptions | None = None,
          whole_tensors: bool = False) -> Path:
    """Write Ω = Φ + Σᵢ sᵢ·Ψᵢ as a complete Hugging Face model folder at `out`.

    adds: [(adapter, scale), ...] or plain adapter paths (scale 1.0); any real scale, negative subtracts.
    The folder gets the base's config, generation config, tokenizer and chat template, sharded
    safetensors + index, and a README listing the adapters and scales. Streams one tensor at a time.
    An entry of `adds` may be an already opened Addend (e.g. port's ported patch); `extra_files`
    ({name: text}) are written into the folder too (e.g. port_report.json). LoRA/DoRA terms are computed in
    blocks of rows; whole_tensors=True computes them on whole tensors (see iter_merged).
    """
    b, addends = open_inputs(base, adds, skip_missing, ReadOptions.of(read, allow_pickle))
    if not addends:
        raise ReadaptError("nothing to merge: give at least one adapter with its scale")
    out_dtype = parse_dtype(dtype)
    if out_dtype is None:
        _warn_rounding(b, addends)
    plan = [(n, (out_dtype or b.dtype(n)) if b.dtype(n).is_floating_point else b.dtype(n), b.shape(n))
            for n in b.names]
    inputs = [b.path] + [a.path for a, _ in addends]
    stats = Interference([a.label for a, _ in addends]) if len(addends) > 1 else None

    def tensors():
        with progress(b.nbytes, "merge") as bar:
            for name, t in iter_merged(b, addends, out_dtype, copy_untouched=True, whole_tensors=whole_tensors,
                                       stats=stats):
                bar.update(b.infos[name].end - b.infos[name].start)
                yield name, t
                del t

    with output_folder(out, overwrite, inputs=inputs) as tmp:
        write_tensors(tmp, plan, tensors(), max_shard_size=max_shard_size, metadata={"readapt": "merge"},
                      check_finite=False)  # iter_merged checks what it computes
        copy_side_files(b.path, tmp)
        if out_dtype is not None and (tmp / "config.json").is_file():
            cfg = json.loads((tmp / "config.json").read_text())
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = str(out_dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        meet = stats.summary() if stats is not None else None
        (tmp / "README.md").write_text(merge_card(base, addends, out_dtype or "the base's", meet))
        if meet is not None:
            (tmp / INTERFERENCE_FILE).write_text(json.dumps(meet, indent=2) + "\n")
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out)


def _warn_rounding(base: Checkpoint, addends: Sequence[tuple[Addend, float]]) -> None:
    """Warn when the output (the base's dtype) holds fewer significand bits than an addend carries: a delta
    extracted from a tuned model stored in a finer dtype (its manifest), or such a checkpoint itself."""
    narrowest = min((base.dtype(n) for n in base.names if base.dtype(n).is_floating_point), key=precision,
                    default=None)
    for a, _ in addends:
        finest = max((d for d in a.carried_dtypes() if d.is_floating_point), key=precision, default=None)
        if narrowest is not None and finest is not None and precision(finest) > precision(narrowest):
            name = str(finest).removeprefix("torch.")
            warnings.warn(f"{a.label} carries {name} weights but the merged model is written in the base's "
                          f"{str(narrowest).removeprefix('torch.')}, which rounds them; pass --dtype {name} "
                          f"(dtype='{name}') to keep them", stacklevel=3)


@torch.no_grad()
def copy_merged(model, base: Checkpoint, addends: Sequence[tuple[Addend, float]],
                dtype: torch.dtype | None = None, whole_tensors: bool = False) -> None:
    """Overwrite the parameters of `model` (loaded from `base`) that the addends touch with Ω = Φ + Σ sᵢ·Ψᵢ,
    one tensor at a time; the others already hold Φ and are not read again. Calling it again with other
    scales recomputes from the files: no error accumulates across calls. With two or more addends,
    `model.readapt_interference` is set to how they meet (readapt.interference)."""
    params = model.state_dict()
    stats = Interference([a.label for a, _ in addends]) if len(addends) > 1 else None
    for name, t in iter_merged(base, addends, dtype, copy_untouched=True, whole_tensors=whole_tensors,
                               stats=stats):
        if isinstance(t, TensorInfo):
            continue  # untouched: the model holds Φ[name] already
        if name not in params:
            raise ReadaptError(f"{base.path}: tensor {name!r} is not a parameter of {type(model).__name__}")
        if isinstance(t, Blocks):
            dst, i = params[name].view(-1), 0
            for block in t.blocks:
                dst[i:i + block.numel()].copy_(block)
                i += block.numel()
        else:
            params[name].copy_(t)
    model.readapt_interference = stats.summary() if stats is not None else None


def load_merged(base: str | os.PathLike, adds: Sequence[AddSpec] = (), dtype: str | torch.dtype | None = None,
                *, skip_missing: bool = False, allow_pickle: bool = False, read: ReadOptions | None = None,
                whole_tensors: bool = False):
    """Build Ω = Φ + Σᵢ sᵢ·Ψᵢ in memory (no checkpoint written) -> (model in eval mode, tokenizer or None).

    Used by eval/sweep/demo. `dtype` defaults to the base checkpoint's dtype. whole_tensors: see iter_merged.
    """
    from transformers import AutoModelForCausalLM

    b, addends = open_inputs(base, adds, skip_missing, ReadOptions.of(read, allow_pickle))
    out_dtype = parse_dtype(dtype)
    # transformers builds the module (buffers, tying, dtype) from the base; then each merged tensor is
    # copied over its parameter, one at a time
    from readapt.userfiles import config_errors

    with config_errors(b.path / "config.json"):
        model = AutoModelForCausalLM.from_pretrained(b.path, dtype=out_dtype or "auto", local_files_only=True)
    if addends:
        copy_merged(model, b, addends, out_dtype, whole_tensors)
    model.eval()
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(b.path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        warnings.warn(f"no tokenizer in {b.path}", stacklevel=2)
    return model, tokenizer
