"""The addend interface: what merge, load_merged and port ask of anything added to a base checkpoint.

    Ω[n] = Φ[n] + Σᵢ sᵢ·Ψᵢ[n]        (merging.py orchestrates, combine.py holds the arithmetic)

For a tensor name n of the base, an addend answers:

    targets()          the base tensors it changes, each with the shape it expects (None: unknown)
    delta(n, Φ)        Ψ[n], a fresh float32 tensor the caller may modify (None: it leaves n alone)
    target(n, Φ)       the full weight Φ′[n] where it defines one (a full checkpoint, DoRA's W′, PEFT's
                       modules_to_save): merge then blends Φ towards it, lerp(Φ, Φ′, s), exact at s = 0
                       and s = 1; by default Ψ = Φ′ − Φ
    stored(n)          elementwise addends only (`elementwise`): where Ψ[n] is stored (Φ′[n] when
                       `stores_target`), so that merge reads it block by block beside Φ, never whole
    rows(n, W, r0, Φ)  rows r0 … r0 + len(W) of what target/delta give, for the float32 base rows W:
                       (Φ′ rows, True) or (Ψ rows, False), so that merge never holds a whole tensor
                       (Φ: where the base tensor is stored, for addends that need a pass over it)
    exact(n)           the elements where Φ + Ψ is known not to be the tuned weight bit for bit, with the
                       tuned values (a delta folder records them)
    made_on()          the base, and its model class, the addend records it was made on
    carried_dtypes()   the dtypes of the model the addend stands for (merge warns if the output rounds them)

LoRA terms have one more access, for folds that work on factors (lora.py): `LoraAdapter.term(n)`
gives B, A and the scale s of Ψ = s·B·A (a block of rows of Ψ is s·B[rows]·A: `rows`).

A new kind of addend is one subclass in one module, listed in `open.KINDS`: `recognises(folder)` says
whether a folder is of that kind, `open_for(...)` opens it for a base and makes the kind's own checks.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from enum import Enum
from pathlib import Path

import torch

from readapt.checkpoint import Checkpoint, ReadOptions, TensorInfo, read_rows
from readapt.roundtrip import Exceptions


class Kind(str, Enum):
    """The kinds of addend, by the name reports and model cards print."""

    DELTA = "delta"  # a delta folder (readapt extract): Ψ = Δ
    CHECKPOINT = "checkpoint"  # a full checkpoint of the base's architecture: Ψ = Θ − Φ
    LORA = "peft-lora"  # a PEFT LoRA adapter folder (DoRA included: a variant of LoRA, as in PEFT)
    DORA = "peft-dora"  # the DoRA variant, where a report tells the two apart (port)
    PORTED_DELTA = "delta (ported)"  # a delta folder seen through port's name and row mapping

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Addend(ABC):
    """A source of weight-space differences Ψ[n] for the tensors of a base checkpoint (see the module)."""

    kind: Kind
    label: str  # how messages and cards name it (what the user gave)
    path: Path
    config: dict | None  # the config of the model it was made for, where it records one
    elementwise: bool = False  # stored(n) gives Ψ[n] (or Φ′[n]) where it is stored: merge reads it in blocks
    stores_target: bool = False  # what stored(n) holds: Φ′[n] (True) or Ψ[n] (False)

    @abstractmethod
    def targets(self) -> dict[str, tuple[int, ...] | None]:
        """Base tensor name -> the shape the addend expects it to have (None: not known from its files)."""

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """Ψ[name] as a fresh float32 tensor, given the float32 base tensor (None: the addend leaves it)."""
        target = self.target(name, base)
        return None if target is None else target.sub_(base)

    def target(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """The full weight Φ′[name] where the addend defines one (merge lerps Φ towards it), else None."""
        return None

    def stored(self, name: str) -> TensorInfo | torch.Tensor:
        """Elementwise addends: where Ψ[name] (Φ′[name] when `stores_target`) is stored."""
        raise NotImplementedError(f"{type(self).__name__} is not elementwise")

    def rows(self, name: str, W: torch.Tensor, r0: int, base: TensorInfo | torch.Tensor
             ) -> tuple[torch.Tensor | None, bool]:
        """Rows r0 … r0 + len(W) of Φ′[name] (is_target True) or of Ψ[name] (False) as fresh float32 tensors,
        given the float32 base rows W there (not modified) and where the whole base tensor is stored (`base`).
        Default: an elementwise addend's stored rows."""
        x = read_rows(self.stored(name), r0, r0 + len(W)).float()
        return x, self.stores_target

    def exact(self, name: str) -> Exceptions | None:
        """Where Φ + Ψ is not the tuned weight bit for bit, with the tuned values (readapt.roundtrip), or None."""
        return None

    def made_on(self) -> tuple[str | None, str | None]:
        """(the base the addend records it was made on, that base's model class), each None if unrecorded."""
        return None, None

    def carried_dtypes(self) -> list[torch.dtype]:
        """The dtypes of the model the addend stands for ([]: it does not say)."""
        return []

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        """Whether `folder` is an addend of this kind."""
        return False

    @classmethod
    def open_for(cls, spec: str | os.PathLike, folder: Path, base: Checkpoint, *, read: ReadOptions,
                 skip_missing: bool) -> Addend:
        """The addend in `folder` (given as `spec`), opened for `base` with this kind's own checks."""
        raise NotImplementedError
