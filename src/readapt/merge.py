"""Partial adaptation: Ω = Φ + Σᵢ sᵢ·Ψᵢ, streamed to a Hugging Face model folder or built in memory.

RE-Adapt §3.2 ("partial adaptation"): Ω = Φ + αΨ + βΔ with a knowledge adapter Ψ and the RE-Adapter Δ,
each with its own scale (α=β=0.5 was robust in the paper; β alone below 1 can improve the instruct model,
Figure 6). An addend Ψᵢ is any of

    a delta folder (readapt extract)      Ψ[n] = Δ[n]
    a full checkpoint of the same family  Ψ[n] = Θ[n] − Φ[n]   ("--add INSTRUCT:0.5", no delta written)
    a PEFT LoRA / DoRA adapter folder     Ψ[n] = s·B·A, or W′ − W for DoRA (readapt.adapters)

Several addends on one tensor combine as the sum of their weight-space differences (PEFT, by contrast,
merges adapters one after the other, so a second DoRA adapter sees the first one's output). All
arithmetic is float32; the result is cast to the base checkpoint's dtype (or `dtype`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from readapt._version import __version__
from readapt.adapters import PeftAdapter
from readapt.checkpoint import (Blocks, Checkpoint, Pair, ReadOptions, TensorInfo, aligned_blocks, check_configs,
                                copy_side_files, float32_view, is_delta_folder, is_peft_folder, open_model,
                                output_folder, progress, read_config, reader, resolve_model, write_tensors)
from readapt.delta import CheckpointDifference, DeltaFolder
from readapt.errors import ReadaptError
from readapt.numerics import is_finite, parse_dtype, precision


class Addend(Protocol):
    """A source of weight-space differences Ψ[name] for the tensors of a base checkpoint."""

    kind: str
    label: str
    path: Path

    def targets(self) -> dict[str, tuple[int, ...] | None]: ...

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """Ψ[name] as a fresh float32 tensor (the caller may modify it), given the float32 base tensor."""


AddSpec = tuple[str | os.PathLike | Addend, float] | str | os.PathLike


def _normalise(adds: Sequence[AddSpec]) -> list[tuple[str | Addend, float]]:
    out = []
    for a in adds:
        spec, scale = (a, 1.0) if isinstance(a, (str, os.PathLike)) else a
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            scale = float("nan")
        if not math.isfinite(scale) or abs(scale) > torch.finfo(torch.float32).max:
            raise ReadaptError(f"the scale of {spec} is {a[1]!r}: give a finite real number within float32's range "
                               f"(e.g. 0.5, -1)")
        out.append((spec if hasattr(spec, "delta") else str(spec), scale))  # an opened Addend stays as is
    return out


def _check_origin(addend, base: Checkpoint, spec) -> None:
    """Refuse an adapter trained on another architecture (shapes can agree by chance: a Llama-3-8B LoRA fits
    Mistral-7B); warn when it was made on another checkpoint than `base` (another version?)."""
    if addend.kind.startswith("peft"):
        recorded_class = (addend.config.get("auto_mapping") or {}).get("base_model_class")
        base_class = ((base.config or {}).get("architectures") or [None])[0]
        if recorded_class and base_class and recorded_class != base_class:
            raise ReadaptError(f"{spec} was trained on a {recorded_class} but the base is a {base_class} "
                               f"(adapter_config.json auto_mapping): it was made for another architecture")
        recorded = addend.config.get("base_model_name_or_path")
    elif addend.kind == "delta":
        recorded = (addend.manifest.get("base") or {}).get("path")
    else:
        return
    if not recorded:
        return
    try:
        origin = resolve_model(recorded)
    except ReadaptError:
        return  # not available here: nothing to compare
    other = read_config(origin) or {}
    if other.get("model_type") and base.config and other["model_type"] != base.config.get("model_type"):
        raise ReadaptError(f"{spec} was made on {recorded}, a {other['model_type']!r} model, but the base is a "
                           f"{base.config.get('model_type')!r} model: it was made for another architecture")
    if origin.resolve() != base.path.resolve():
        warnings.warn(f"{spec} was made on {recorded}, not on {base.path}; if that is another version of the model, "
                      f"`readapt port {spec} --to {base.path} --from {recorded}` reports what carries over",
                      stacklevel=3)


def open_addend(spec: str | os.PathLike, base: Checkpoint, *, skip_missing: bool = False,
                read: ReadOptions | None = None) -> Addend:
    """Open `spec` as a delta folder, PEFT adapter or full checkpoint and check it fits `base`.

    Checks: every tensor it touches exists in the base with the shape it expects (else: made for a
    different base; an lm_head the base ties to embed_tokens is refused as such), configs agree on shapes
    (warnings for rope_theta-type fields).
    """
    path = resolve_model(spec)
    if is_delta_folder(path):
        addend: Addend = DeltaFolder(path, label=str(spec))
        check_configs(base, addend.config, f"the base the delta {spec} was made from")
    elif is_peft_folder(path):
        addend = PeftAdapter(path, label=str(spec), read=read)
        addend.drop_tied_copies(base.infos)  # PEFT's ensure_weight_tying copy: the embedding's own delta
    elif (path / "config.json").is_file():
        pair = Pair(base, Checkpoint.open(path, read), label=str(spec), skip_missing=skip_missing)
        addend = CheckpointDifference(pair.tuned, label=str(spec))
    else:
        raise ReadaptError(f"{spec} is not an adapter: expected a delta folder (readapt_delta.json), a PEFT "
                           f"adapter (adapter_config.json) or a model checkpoint (config.json)")
    _check_origin(addend, base, spec)
    unknown = [n for n in addend.targets() if n not in base]
    tied = (base.config or {}).get("tie_word_embeddings") and all(n.endswith("lm_head.weight") for n in unknown)
    if unknown and tied and addend.kind != "checkpoint":
        raise ReadaptError(f"{spec} changes {unknown[0]}, but the base ties lm_head to embed_tokens "
                           f"(tie_word_embeddings: it stores no {unknown[0]}), so the output layer can only change "
                           f"with the embeddings (mergekit-extract-lora writes lm_head factors even for tied models): "
                           f"re-extract it without lm_head (mergekit-extract-lora ... --exclude-regex lm_head), or "
                           f"with `readapt extract BASE TUNED -o OUT --tau 0.5`, which puts the tied matrix's change "
                           f"on embed_tokens once")
    if unknown and addend.kind != "checkpoint":
        raise ReadaptError(f"{spec} was made for a different base: {len(unknown)} of its tensors are not in the "
                           f"base checkpoint ({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''})")
    for n, shape in addend.targets().items():
        if n in base and shape is not None and tuple(shape) != base.shape(n):
            raise ReadaptError(f"{spec} was made for a different base: tensor {n!r} is {list(base.shape(n))} in "
                               f"the base but {list(shape)} in the adapter")
        if n in base and not base.dtype(n).is_floating_point:
            raise ReadaptError(f"{spec} changes the non-float tensor {n!r}; that cannot be merged")
    return addend


def iter_merged(base: Checkpoint, addends: Sequence[tuple[Addend, float]],
                dtype: torch.dtype | None = None, copy_untouched: bool = False
                ) -> Iterator[tuple[str, torch.Tensor | TensorInfo | Blocks]]:
    """Yield (name, Ω[name]) for every base tensor, Ω = Φ + Σ sᵢ·Ψᵢ in float32, cast to `dtype`
    (default: each tensor's own dtype). With copy_untouched, a tensor no addend touches (and no cast
    changes) is yielded as its location, which write_tensors copies in blocks without loading it.
    Tensors that only delta/checkpoint addends touch are yielded as `Blocks` computed from the files
    block by block; the others (LoRA terms, DoRA, casts) as one tensor, the only one in memory."""
    touched = [(a, s, set(a.targets())) for a, s in addends]
    for name in base.names:
        terms = [(a, s) for a, s, names in touched if name in names]
        floating = base.dtype(name).is_floating_point
        if not terms and (dtype is None or dtype == base.dtype(name) or not floating):
            yield name, base.stored(name) if copy_untouched else base.read(name)
            continue
        out_dtype = (dtype or base.dtype(name)) if floating else base.dtype(name)
        if terms and floating and all(hasattr(a, "stored") for a, _ in terms):
            yield name, Blocks(out_dtype, base.shape(name), _elementwise(name, base, terms, dtype))
            continue
        W = base.read(name)
        if terms and floating:
            W = W.float()  # Φ in float32 (a fresh buffer unless it already was float32; the raw one is freed)
            W = _apply(name, W, terms)
        W = W.to(out_dtype)
        if not is_finite(W):
            raise _not_finite(name, base, terms, dtype)
        yield name, W
        W = None  # before the next tensor is read: a generator frame keeps what it yielded


def _not_finite(name: str, base: Checkpoint, terms, dtype) -> ReadaptError:
    """The error for a non-finite Ω[name]: the base's own NaN/Inf, or what the merge added."""
    if not is_finite(base.read(name)):
        return ReadaptError(f"tensor {name!r} of the base checkpoint {base.path} has NaN/Inf values")
    cause = f"adding {', '.join(a.label for a, _ in terms)}" if terms else f"casting to {dtype}"
    return ReadaptError(f"tensor {name!r} has NaN/Inf after {cause} (check the adapter, scale and dtype); "
                        f"nothing was written")


def _elementwise(name: str, base: Checkpoint, terms: Sequence[tuple[Addend, float]],
                 dtype: torch.dtype | None) -> Iterator[torch.Tensor]:
    """Ω[name] block by block for addends stored elementwise (delta folders: Ψ = D; checkpoints:
    Ψ = Φ′ − Φ): `_apply`'s operations in the same order on BLOCK-element float32 blocks read side by
    side from the base's and the addends' files. Memory: one block of each input, reused, whatever
    the tensor's size. Each output block is finite-checked while it is in cache. A single delta folder's
    recorded exceptions (`DeltaFolder.exact`: Φ + Δ ≠ Θ there) are blended as lerp(Φ, Θ, s) instead."""
    out_dtype = dtype or base.dtype(name)
    sources = [base.stored(name)] + [a.stored(name) for a, _ in terms]
    n = min(math.prod(base.shape(name)), reader.BLOCK)
    bufs = [torch.empty(n) if s.dtype != torch.float32 else None for s in sources]  # float32 work buffers
    out = torch.empty(n, dtype=out_dtype) if out_dtype != torch.float32 else None
    scales = [(s, hasattr(a, "target")) for a, s in terms]  # target: the addend stores Φ′, else Ψ
    fix = terms[0][0].exact(name) if len(terms) == 1 and hasattr(terms[0][0], "exact") else None
    start = 0
    for blocks in aligned_blocks(*sources):
        W, *xs = [float32_view(b, buf) for b, buf in zip(blocks, bufs)]
        if len(xs) == 1:
            (s, is_target), x = scales[0], xs[0]
            if fix is not None:  # Θ at these elements at s=1, else Φ + s·(Θ − Φ) as lerp (Φ at s=0)
                sel = (fix[0] >= start) & (fix[0] < start + W.numel())
                at, theta = fix[0][sel] - start, fix[1][sel]
                phi = W[at]
            start += W.numel()
            W = W.lerp_(x, s) if is_target else W.add_(x, alpha=s)
            if fix is not None and len(at):
                W[at] = theta if s == 1 else phi.lerp_(theta, s)  # (lerp at 1 turns Θ = -0.0 into +0.0)
        else:
            acc = None
            for (s, is_target), d in zip(scales, xs):
                d = d.sub_(W) if is_target else d
                acc = d.mul_(s) if acc is None else acc.add_(d, alpha=s)
            W = W.add_(acc)
        W = W if out is None else out[: W.numel()].copy_(W)
        if not is_finite(W):
            raise _not_finite(name, base, terms, dtype)
        yield W


def _apply(name: str, W: torch.Tensor, terms: Sequence[tuple[Addend, float]]) -> torch.Tensor:
    """Φ + Σ sᵢ·Ψᵢ for one tensor, in place on the float32 base tensor W."""
    if len(terms) == 1:
        addend, s = terms[0]
        target = addend.target(name, W) if hasattr(addend, "target") else None
        if target is not None:
            # the addend knows its full weight Φ′ (a checkpoint, DoRA's W′): Φ + s·(Φ′ − Φ) as lerp,
            # exact at both ends (s=1 gives Φ′ bit for bit, s=0 gives Φ)
            return W.lerp_(target, s)
        d = addend.delta(name, W)
        return W if d is None else W.add_(d, alpha=s)  # s=1: W + d, the same operation as PEFT's merge
    acc = None  # Σ sᵢ·Ψᵢ
    for addend, s in terms:
        d = addend.delta(name, W)
        if d is not None:
            acc = d.mul_(s) if acc is None else acc.add_(d, alpha=s)
    return W if acc is None else W.add_(acc)


def _open_all(base_spec, adds, skip_missing, read: ReadOptions):
    base = open_model(base_spec, read, fix="pass the model it applies to as the base and this folder with --add")
    addends = [(spec if not isinstance(spec, str) else
                open_addend(spec, base, skip_missing=skip_missing, read=read), s)
               for spec, s in _normalise(adds)]
    return base, addends


def merge(base: str | os.PathLike, out: str | os.PathLike, adds: Sequence[AddSpec], *,
          dtype: str | torch.dtype | None = None, skip_missing: bool = False, overwrite: bool = False,
          max_shard_size: int | str = "5GB", allow_pickle: bool = False,
          extra_files: dict[str, str] | None = None, read: ReadOptions | None = None) -> Path:
    """Write Ω = Φ + Σᵢ sᵢ·Ψᵢ as a complete Hugging Face model folder at `out`.

    adds: [(adapter, scale), ...] or plain adapter paths (scale 1.0); any real scale, negative subtracts.
    The folder gets the base's config, generation config, tokenizer and chat template, sharded
    safetensors + index, and a README listing the adapters and scales. Streams one tensor at a time.
    An entry of `adds` may be an already opened Addend (e.g. port's ported patch); `extra_files`
    ({name: text}) are written into the folder too (e.g. port_report.json).
    """
    b, addends = _open_all(base, adds, skip_missing, ReadOptions.of(read, allow_pickle))
    if not addends:
        raise ReadaptError("nothing to merge: give at least one adapter with its scale")
    out_dtype = parse_dtype(dtype)
    if out_dtype is None:
        _warn_rounding(b, addends)
    plan = [(n, (out_dtype or b.dtype(n)) if b.dtype(n).is_floating_point else b.dtype(n), b.shape(n))
            for n in b.names]
    inputs = [b.path] + [a.path for a, _ in addends]

    def tensors():
        with progress(b.nbytes, "merge") as bar:
            for name, t in iter_merged(b, addends, out_dtype, copy_untouched=True):
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
        (tmp / "README.md").write_text(_card(base, addends, out_dtype or "the base's"))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out)


def _warn_rounding(base: Checkpoint, addends: Sequence[tuple[Addend, float]]) -> None:
    """Warn when the output (the base's dtype) holds fewer significand bits than an addend carries: a delta
    extracted from a tuned model stored in a finer dtype (its manifest), or such a checkpoint itself."""
    narrowest = min((base.dtype(n) for n in base.names if base.dtype(n).is_floating_point), key=precision,
                    default=None)
    for a, _ in addends:
        if a.kind == "delta":
            carried = [getattr(torch, d, None) for d in (a.manifest.get("tuned") or {}).get("dtypes", [])]
        elif a.kind == "checkpoint":
            carried = [a.ckpt.dtype(n) for n in a.ckpt.names]
        else:
            continue  # a PEFT adapter's factor dtype says nothing about the model it stands for
        finest = max((d for d in carried if isinstance(d, torch.dtype) and d.is_floating_point), key=precision,
                     default=None)
        if narrowest is not None and finest is not None and precision(finest) > precision(narrowest):
            name = str(finest).removeprefix("torch.")
            warnings.warn(f"{a.label} carries {name} weights but the merged model is written in the base's "
                          f"{str(narrowest).removeprefix('torch.')}, which rounds them; pass --dtype {name} "
                          f"(dtype='{name}') to keep them", stacklevel=3)


def _card(base, addends, dtype) -> str:
    rows = "\n".join(f"| `{a.label}` | {a.kind} | {s:g} |" for a, s in addends)
    terms = " + ".join(f"{s:g}·Ψ{i + 1}" for i, (_, s) in enumerate(addends))
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return f"""---
library_name: transformers
tags: [readapt, merge, partial-adaptation]
---
# Merged model

Made by readapt {__version__} on {now}:

    Ω = Φ + {terms}        (float32 arithmetic, saved in {str(dtype).removeprefix("torch.")} dtype)

Φ (base): `{base}`

| adapter | kind | scale |
|---|---|---|
{rows}

A checkpoint adapter means its difference from the base; a delta folder is a RE-Adapter; a PEFT adapter
contributes s·B·A (DoRA: W′ − W). Load with `transformers.AutoModelForCausalLM.from_pretrained`.
"""


@torch.no_grad()
def copy_merged(model, base: Checkpoint, addends: Sequence[tuple[Addend, float]],
                dtype: torch.dtype | None = None) -> None:
    """Overwrite the parameters of `model` (loaded from `base`) that the addends touch with Ω = Φ + Σ sᵢ·Ψᵢ,
    one tensor at a time; the others already hold Φ and are not read again. Calling it again with other
    scales recomputes from the files: no error accumulates across calls."""
    params = model.state_dict()
    for name, t in iter_merged(base, addends, dtype, copy_untouched=True):
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


def load_merged(base: str | os.PathLike, adds: Sequence[AddSpec] = (), dtype: str | torch.dtype | None = None,
                *, skip_missing: bool = False, allow_pickle: bool = False, read: ReadOptions | None = None):
    """Build Ω = Φ + Σᵢ sᵢ·Ψᵢ in memory (no checkpoint written) -> (model in eval mode, tokenizer or None).

    Used by eval/sweep/demo. `dtype` defaults to the base checkpoint's dtype.
    """
    from transformers import AutoModelForCausalLM

    b, addends = _open_all(base, adds, skip_missing, ReadOptions.of(read, allow_pickle))
    out_dtype = parse_dtype(dtype)
    # transformers builds the module (buffers, tying, dtype) from the base; then each merged tensor is
    # copied over its parameter, one at a time
    from readapt.userfiles import config_errors

    with config_errors(b.path / "config.json"):
        model = AutoModelForCausalLM.from_pretrained(b.path, dtype=out_dtype or "auto", local_files_only=True)
    if addends:
        copy_merged(model, b, addends, out_dtype)
    model.eval()
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(b.path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        warnings.warn(f"no tokenizer in {b.path}", stacklevel=2)
    return model, tokenizer
