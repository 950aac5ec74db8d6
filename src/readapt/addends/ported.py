"""A delta folder carried to a new model version by port: Ψ[new name] = Δ[old name], vocabulary rows remapped."""

from __future__ import annotations

import torch

from readapt.addends.base import Addend, Kind
from readapt.addends.stored import DeltaFolder
from readapt.checkpoint import Checkpoint, TensorInfo
from readapt.portmap import Item, remap_rows


class PortedDelta(Addend):
    """A delta folder seen through the port's name and row mapping (portmap.Item): elementwise, so merge
    reads it block by block where no rows move."""

    kind = Kind.PORTED_DELTA
    elementwise = True

    def __init__(self, src: DeltaFolder, items: list[Item], new: Checkpoint, label: str):
        self.src, self.path, self.label = src, src.path, label
        order = {n: i for i, n in enumerate(new.names)}
        self.items = {it.new_name: it for it in sorted(items, key=lambda it: order[it.new_name])}
        self.config = new.config

    def targets(self) -> dict[str, tuple[int, ...]]:
        return {n: it.new_shape for n, it in self.items.items()}

    def stored(self, name: str) -> torch.Tensor | TensorInfo:
        """Δ[name] as merge and the writer read it block by block: where it is stored, or, when its
        vocabulary rows move, the remapped tensor."""
        it = self.items[name]
        return self.src.ckpt.stored(it.name) if it.rows is None else self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        it = self.items[name]
        d = self.src.ckpt.read(it.name)
        return remap_rows(d, it.rows) if it.rows is not None else d

    def delta(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor | None:
        return self._read(name).float() if name in self.items else None
