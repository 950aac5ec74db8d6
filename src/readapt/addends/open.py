"""Opening an addend for a base: which kind a folder is, and the checks that it fits the base.

    addend = open_addend("knowledge/", base_ckpt, read=ReadOptions())
    adds = normalise([("delta/", 0.5), "lora/"])          # (spec or opened Addend, scale) pairs
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import torch

from readapt.addends.base import Addend, Kind
from readapt.addends.lora import LoraAdapter
from readapt.addends.stored import CheckpointDifference, DeltaFolder
from readapt.checkpoint import Checkpoint, ReadOptions, read_config, resolve_model
from readapt.errors import ReadaptError

KINDS: tuple[type[Addend], ...] = (DeltaFolder, LoraAdapter, CheckpointDifference)  # the first that recognises

AddSpec = tuple[str | os.PathLike | Addend, float] | str | os.PathLike


def normalise(adds: Sequence[AddSpec]) -> list[tuple[str | Addend, float]]:
    """(spec, scale) pairs, a bare spec meaning scale 1; a scale must be a finite float32 number. An
    already opened Addend (e.g. port's ported patch) stays as it is; a path becomes its string."""
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
        out.append((spec if isinstance(spec, Addend) else str(spec), scale))
    return out


def open_addend(spec: str | os.PathLike, base: Checkpoint, *, skip_missing: bool = False,
                read: ReadOptions | None = None) -> Addend:
    """Open `spec` as a delta folder, PEFT adapter or full checkpoint and check it fits `base`.

    Checks: every tensor it touches exists in the base with the shape it expects (else: made for a
    different base; an lm_head the base ties to embed_tokens is refused as such), configs agree on shapes
    (warnings for rope_theta-type fields).
    """
    path = resolve_model(spec)
    kind = next((k for k in KINDS if k.recognises(path)), None)
    if kind is None:
        raise ReadaptError(f"{spec} is not an adapter: expected a delta folder (readapt_delta.json), a PEFT "
                           f"adapter (adapter_config.json) or a model checkpoint (config.json)")
    addend = kind.open_for(spec, path, base, read=ReadOptions.of(read), skip_missing=skip_missing)
    _check_origin(addend, base, spec)
    _check_fits(addend, base, spec)
    return addend


def _check_fits(addend: Addend, base: Checkpoint, spec) -> None:
    """Every tensor the addend changes is a float tensor of the base, of the shape the addend expects (a
    full checkpoint's one-sided tensors were dealt with by Pair: skip_missing)."""
    unknown = [n for n in addend.targets() if n not in base]
    tied = (base.config or {}).get("tie_word_embeddings") and all(n.endswith("lm_head.weight") for n in unknown)
    if unknown and tied and addend.kind is not Kind.CHECKPOINT:
        raise ReadaptError(f"{spec} changes {unknown[0]}, but the base ties lm_head to embed_tokens "
                           f"(tie_word_embeddings: it stores no {unknown[0]}), so the output layer can only change "
                           f"with the embeddings (mergekit-extract-lora writes lm_head factors even for tied models): "
                           f"re-extract it without lm_head (mergekit-extract-lora ... --exclude-regex lm_head), or "
                           f"with `readapt extract BASE TUNED -o OUT --tau 0.5`, which puts the tied matrix's change "
                           f"on embed_tokens once")
    if unknown and addend.kind is not Kind.CHECKPOINT:
        raise ReadaptError(f"{spec} was made for a different base: {len(unknown)} of its tensors are not in the "
                           f"base checkpoint ({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''})")
    for n, shape in addend.targets().items():
        if n in base and shape is not None and tuple(shape) != base.shape(n):
            raise ReadaptError(f"{spec} was made for a different base: tensor {n!r} is {list(base.shape(n))} in "
                               f"the base but {list(shape)} in the adapter")
        if n in base and not base.dtype(n).is_floating_point:
            raise ReadaptError(f"{spec} changes the non-float tensor {n!r}; that cannot be merged")


def _check_origin(addend: Addend, base: Checkpoint, spec) -> None:
    """Refuse an adapter trained on another architecture (shapes can agree by chance: a Llama-3-8B LoRA fits
    Mistral-7B); warn when it was made on another checkpoint than `base` (another version?)."""
    recorded, recorded_class = addend.made_on()
    base_class = ((base.config or {}).get("architectures") or [None])[0]
    if recorded_class and base_class and recorded_class != base_class:
        raise ReadaptError(f"{spec} was trained on a {recorded_class} but the base is a {base_class} "
                           f"(adapter_config.json auto_mapping): it was made for another architecture")
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
