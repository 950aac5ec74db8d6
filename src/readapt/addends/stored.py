"""Elementwise addends: a delta folder (Ψ = Δ) and a full checkpoint (Ψ = Θ − Φ), both read block by block.

A delta folder (readapt extract) holds Δ = Θ − Φ as safetensors shards plus `readapt_delta.json`, the
manifest of what it was made from. In float32, Φ + Δ is Θ bit for bit except where fp32(Θ) − fp32(Φ) is not
exact (a weight tuned to nearly zero, |Θ| < 2^-16·|Φ|); readapt_exact.safetensors records the tuned
values there (`DeltaFolder.exact`, readapt.roundtrip), and merge gives those elements Θ at scale 1 and
lerp(Φ, Θ, s) otherwise.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from readapt.addends.base import Addend, Kind
from readapt.checkpoint import (CONFIG_FIELDS, DELTA_MANIFEST, Checkpoint, Pair, ReadOptions, TensorInfo,
                                check_configs, is_delta_folder)
from readapt.roundtrip import Exceptions, open_exceptions
from readapt.userfiles import OBJECT, STRING, check_fields, load


class _StoredTensors(Addend):
    """An addend whose tensors are stored whole in a checkpoint-layout folder (`self.ckpt`)."""

    ckpt: Checkpoint
    elementwise = True

    def targets(self) -> dict[str, tuple[int, ...]]:
        return {n: self.ckpt.shape(n) for n in self.ckpt.names}

    def stored(self, name: str) -> torch.Tensor | TensorInfo:
        """Where the tensor is stored (merge reads it block by block and combines it elementwise)."""
        return self.ckpt.stored(name)

    def carried_dtypes(self) -> list[torch.dtype]:
        return [self.ckpt.dtype(n) for n in self.ckpt.names]


class DeltaFolder(_StoredTensors):
    """A delta folder as an addend: Ψ[name] = Δ[name]."""

    kind = Kind.DELTA

    def __init__(self, folder: str | os.PathLike, label: str | None = None):
        self.path = Path(folder)
        self.label = label or str(folder)
        file = self.path / DELTA_MANIFEST
        self.manifest = check_fields(load(file), file, {"base": OBJECT, "tuned": OBJECT, "base_config": OBJECT,
                                                        "formula": STRING})
        for part in ("base", "tuned"):
            check_fields(self.manifest.get(part) or {}, f"{file} ({part})", {"path": STRING, "spec": STRING})
        check_fields(self.manifest.get("base_config") or {}, f"{file} (base_config)", CONFIG_FIELDS)
        self.ckpt = Checkpoint.open(self.path)
        self.config = self.manifest.get("base_config")

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return is_delta_folder(folder)

    @classmethod
    def open_for(cls, spec, folder: Path, base: Checkpoint, *, read: ReadOptions, skip_missing: bool) -> Addend:
        addend = cls(folder, label=str(spec))
        check_configs(base, addend.config, f"the base the delta {spec} was made from")
        return addend

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        return self.ckpt.read(name).float() if name in self.ckpt else None

    def exact(self, name: str) -> Exceptions | None:
        """The elements of `name` where Φ + Δ is not Θ, with Θ's values there (readapt.roundtrip), or None."""
        return open_exceptions(self.path, self.manifest, name, math.prod(self.ckpt.shape(name)))

    def tuned(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """Θ = Φ + Δ (float32), with the recorded exceptions: Θ bit for bit."""
        t = base.float().add_(self.ckpt.read(name).float())
        fix = self.exact(name)
        for idx, val in fix.blocks() if fix is not None else ():
            t.view(-1)[idx] = val
        return t

    def made_on(self) -> tuple[str | None, str | None]:
        return (self.manifest.get("base") or {}).get("path"), None

    def carried_dtypes(self) -> list[torch.dtype]:
        """The tuned model's dtypes, as the manifest records them (the delta's own dtype says nothing)."""
        names = (self.manifest.get("tuned") or {}).get("dtypes", [])
        return [d for d in (getattr(torch, n, None) for n in names) if isinstance(d, torch.dtype)]


class CheckpointDifference(_StoredTensors):
    """A full checkpoint Θ as an addend: Ψ[name] = Θ[name] − Φ[name] (no delta written); merge blends
    Φ towards Θ[name] with lerp (`target`, `stores_target`). Opened for a base, it keeps the Pair (Φ, Θ)
    it was checked with, whose `delta` gives Θ − Φ whole with Φ read in blocks (a fold's dense sum)."""

    kind = Kind.CHECKPOINT
    stores_target = True

    def __init__(self, ckpt: Checkpoint, label: str | None = None, pair: Pair | None = None):
        self.ckpt = ckpt
        self.path = ckpt.path
        self.label = label or str(ckpt.path)
        self.config = ckpt.config
        self.pair = pair

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (folder / "config.json").is_file()

    @classmethod
    def open_for(cls, spec, folder: Path, base: Checkpoint, *, read: ReadOptions, skip_missing: bool) -> Addend:
        """The checkpoint as Θ of a Pair with the base: configs compared, shared tensors checked."""
        pair = Pair(base, Checkpoint.open(folder, read), label=str(spec), skip_missing=skip_missing)
        return cls(pair.tuned, label=str(spec), pair=pair)

    def target(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """Θ[name]: merge blends Φ towards it with lerp."""
        return self.ckpt.read(name).float() if name in self.ckpt else None
