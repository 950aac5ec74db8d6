"""Extract: the RE-Adapter Δ = Θ − Φ of two checkpoints, written as a delta folder (a readapt.addends.DeltaFolder).

RE-Adapt (Fleshman & Van Durme, 2024, §3): the instruction tuning of an instruct model Θ is isolated as
its difference from the pretrained model Φ it was tuned from,

    Δ[name] = Θ[name] − Φ[name]        for every tensor the two share (float32 arithmetic),

and re-applied later to Φ (or to Φ plus a knowledge adapter) with any scale β: Φ + βΔ.

A delta folder holds Δ as safetensors shards (`model*.safetensors` + index, the layout of a checkpoint)
plus `readapt_delta.json`, the manifest of what it was made from. By default Δ is stored in float32:
then Φ + 1.0·Δ gives back Θ bit for bit for float32, bfloat16 and float16 checkpoints. For almost every
element fp32(Θ) − fp32(Φ) is exact (it is whenever the two are within ~2^16 of each other in magnitude);
where it is not (a weight tuned to nearly zero, |Θ| < 2^-16·|Φ|: 2 of 134.5M elements of a real SmolLM2
fine-tune, 5 of 268M of Gemma-3), Φ + Δ in float32 is not Θ. extract finds these elements (bitwise
Φ + Δ ≠ Θ in float32, the operation merge performs) and records their tuned values in
readapt_exact.safetensors (readapt.roundtrip; the manifest's `exact` entry counts them per tensor); merge
gives them Θ at β=1 and lerp(Φ, Θ, β) otherwise: Φ at β=0 and, at any β,
Φ + β(Θ − Φ) to float32 rounding (closer than Φ + βΔ). compress's dense tensors get Θ there too.
`dtype="bfloat16"` halves the size and the round trip is then exact only for ~80-97% of elements (no
exceptions are recorded for it).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from readapt._version import __version__
from readapt.cards import delta_card
from readapt.checkpoint import (DELTA_MANIFEST, Blocks, Checkpoint, Pair, ReadOptions, output_folder, progress,
                                reader, recorded_name, write_tensors)
from readapt.numerics import parse_dtype, precision
from readapt.roundtrip import EXACT_FILE, ExceptionLog


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(ckpt: Checkpoint, spec) -> dict:
    dtypes = sorted({str(ckpt.dtype(n)).removeprefix("torch.") for n in ckpt.names})
    return {"spec": recorded_name(spec), "path": str(ckpt.path.resolve()), "dtypes": dtypes,
            "tensor_count": len(ckpt.names), "model_type": (ckpt.config or {}).get("model_type")}


def extract(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, *,
            dtype: str | torch.dtype | None = None, skip_missing: bool = False, overwrite: bool = False,
            max_shard_size: int | str = "5GB", allow_pickle: bool = False, read: ReadOptions | None = None) -> Path:
    """Write the RE-Adapter Δ = tuned − base (float32 arithmetic) as a delta folder at `out`.

    Streams block by block: one BLOCK-element slice of each input at a time, whatever the tensor size.
    `dtype` is the stored dtype of Δ (default float32, which makes base + 1.0·Δ reproduce `tuned`
    exactly). Returns the output folder.
    """
    pair = Pair.open(base, tuned, ReadOptions.of(read, allow_pickle), skip_missing=skip_missing)
    out_dtype = parse_dtype(dtype) or torch.float32
    floats = [n for n in pair.names if pair.floating(n)]
    _warn_finer(pair, floats, tuned)
    manifest = _manifest(pair, base, tuned, out_dtype, floats)
    plan = [(n, out_dtype, pair.base.shape(n)) for n in floats]

    with output_folder(out, overwrite, inputs=[pair.base.path, pair.tuned.path]) as tmp:
        log = ExceptionLog(tmp) if out_dtype == torch.float32 else None  # float32 Δ: where Φ + Δ ≠ Θ

        def tensors():
            with progress(sum(pair.nbytes(n) for n in floats), "extract") as bar:
                for n in floats:
                    bar.update(pair.nbytes(n))
                    yield n, Blocks(out_dtype, pair.base.shape(n), _difference(pair, n, out_dtype, log))

        write_tensors(tmp, plan, tensors(), max_shard_size=max_shard_size,
                      metadata={"readapt": "delta", "formula": manifest["formula"]})
        if log is not None:
            manifest["exact"] = {
                "rule": "where base + delta (float32) is not tuned bit for bit, merge uses lerp(base, tuned, scale)",
                "elements": log.write(), "of": sum(math.prod(pair.base.shape(n)) for n in floats),
                "file": EXACT_FILE, "tensors": log.counts}
        (tmp / DELTA_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(delta_card(manifest))
    return Path(out)


def _difference(pair: Pair, n: str, out_dtype: torch.dtype, log: ExceptionLog | None) -> Iterator[torch.Tensor]:
    """Δ[n] in `out_dtype`, block by block (Pair.delta_blocks); for a float32 Δ, the elements where Φ + Δ
    (merge's operation at β=1) is not Θ bit for bit go to `log` with their tuned values."""
    size = min(math.prod(pair.base.shape(n)), reader.BLOCK)
    r_buf = torch.empty(size) if log is not None else None
    out = torch.empty(size, dtype=out_dtype) if out_dtype != torch.float32 else None
    start = 0
    for th, ph, d in pair.delta_blocks(n):
        r = torch.add(ph, d, out=r_buf[: th.numel()]).view(torch.int32) if log is not None else None
        if r is not None and not torch.equal(r, th.view(torch.int32)):  # one pass, no mask, when exact
            idx = (r != th.view(torch.int32)).nonzero().view(-1)
            log.add(n, idx + start, th[idx])
        start += th.numel()
        yield d if out is None else out[: d.numel()].copy_(d)


def _warn_finer(pair: Pair, floats: list[str], tuned) -> None:
    """Warn when the tuned model stores tensors in a finer dtype than the base (merge would round them)."""
    b, t = pair.base, pair.tuned
    finer = [n for n in floats if precision(t.dtype(n)) > precision(b.dtype(n))]
    if finer:
        warnings.warn(f"the tuned model {tuned} stores {len(finer)} tensors in {_name(t.dtype(finer[0]))} over the "
                      f"base's {_name(b.dtype(finer[0]))} (e.g. {finer[0]}): the delta keeps that precision, but "
                      f"`readapt merge` writes the base's dtype by default, which rounds it away; pass "
                      f"`merge --dtype {_name(t.dtype(finer[0]))}` to keep it", stacklevel=3)


def _manifest(pair: Pair, base, tuned, out_dtype: torch.dtype, floats: list[str]) -> dict:
    """readapt_delta.json: what the delta was made from and how (the `exact` entry is added once written)."""
    return {
        "format": "readapt-delta", "format_version": 1, "readapt_version": __version__,
        "formula": "delta = tuned - base (float32 arithmetic)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base": _describe(pair.base, base), "tuned": _describe(pair.tuned, tuned),
        "delta_dtype": _name(out_dtype), "tensor_count": len(floats),
        "skipped": sorted(pair.skipped + [n for n in pair.names if n not in floats]),
        "base_config": pair.base.config,
    }
