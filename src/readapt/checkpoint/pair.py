"""Two checkpoints of one architecture and their difference: the one place Δ = Θ − Φ is computed.

    pair = Pair.open(base, tuned, read)          # both opened as models, configs compared, tensors matched
    pair.names                                   # the tensors both hold, in the base's order, shapes equal
    pair.delta(name)                             # Δ[name] as one float32 tensor (LoRE: an SVD needs it whole)
    pair.delta_blocks(name)                      # (Θ, Φ, Δ) float32 blocks of BLOCK elements (extract)

RE-Adapt (Fleshman & Van Durme, 2024, §3): Δ[name] = Θ[name] − Φ[name] in float32 arithmetic. Extract,
LoRE (extract --tau, spectrum BASE TUNED), a full checkpoint added by merge (its difference from the base)
and port's version drift θ′ − θ (`difference_blocks`) all go through here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch

from readapt.checkpoint import reader
from readapt.checkpoint.configs import check_configs
from readapt.checkpoint.header import TensorInfo
from readapt.checkpoint.reader import Checkpoint, ReadOptions, aligned_blocks, float32_view, open_model, read_blocks
from readapt.errors import ReadaptError

EXTRACT_FIX = ("BASE and TUNED must both be model checkpoints; to use an adapter, merge it into its model first "
               "(`readapt merge MODEL --add ADAPTER -o FOLDER`)")


class Pair:
    """A base checkpoint Φ and a checkpoint Θ of the same architecture (configs agree on every field that
    shapes the tensors; other differences are warnings), with the tensors they share."""

    def __init__(self, base: Checkpoint, tuned: Checkpoint, label: str = "the tuned model",
                 skip_missing: bool = False):
        check_configs(base, tuned.config, label)
        self.base, self.tuned, self.label = base, tuned, label
        self.names, self.skipped = shared_tensors(base, tuned, label, skip_missing)

    @classmethod
    def open(cls, base: str | os.PathLike, tuned: str | os.PathLike, read: ReadOptions | None = None, *,
             skip_missing: bool = False, fix: str = EXTRACT_FIX) -> Pair:
        """Both as model checkpoints (an adapter or a delta folder is refused, saying `fix`)."""
        return cls(open_model(base, read, fix=fix), open_model(tuned, read, fix=fix), skip_missing=skip_missing)

    def floating(self, name: str) -> bool:
        """Both sides store `name` as floats (only those have a difference)."""
        return self.base.dtype(name).is_floating_point and self.tuned.dtype(name).is_floating_point

    def nbytes(self, name: str) -> int:
        """The base's stored size of `name` (what progress bars count)."""
        info = self.base.infos[name]
        return info.end - info.start

    def delta(self, name: str) -> torch.Tensor:
        """Δ[name] = Θ[name] − Φ[name] as one float32 tensor the caller owns: Θ read whole, Φ subtracted
        in blocks of reader.COPY_BLOCK bytes (peak: Δ plus one block, not two whole tensors)."""
        D = self.tuned.read(name).float()
        flat, at = D.view(-1), 0
        for block in read_blocks(self.base.stored(name)):
            flat[at:at + block.numel()].sub_(block)
            at += block.numel()
        return D

    def delta_blocks(self, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(Θ, Φ, Δ) of `name` as float32 blocks of BLOCK elements (see `difference_blocks`)."""
        return difference_blocks(self.tuned.stored(name), self.base.stored(name))


def difference_blocks(tuned: TensorInfo | torch.Tensor, base: TensorInfo | torch.Tensor
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(θ, φ, θ − φ) in float32, BLOCK elements at a time, read side by side from two stored tensors of one
    shape (`Checkpoint.stored` values, or tensors). Reused buffers: each triple is valid until the next one
    (a float32 input is not copied: its block is the read buffer itself)."""
    size = min(math.prod(base.shape), reader.BLOCK)
    bufs = [torch.empty(size) if s.dtype != torch.float32 else None for s in (tuned, base)]
    d_buf = torch.empty(size)
    for theta, phi in aligned_blocks(tuned, base):
        th, ph = float32_view(theta, bufs[0]), float32_view(phi, bufs[1])
        yield th, ph, torch.sub(th, ph, out=d_buf[:th.numel()])


def shared_tensors(base: Checkpoint, other: Checkpoint, other_label: str,
                   skip_missing: bool) -> tuple[list[str], list[str]]:
    """Names in both checkpoints (in base order) with equal shapes, and the names skipped.

    Tensors on one side only are an error listing them, unless skip_missing. A shape difference is
    always an error naming the tensor and both shapes.
    """
    only_base = [n for n in base.names if n not in other]
    only_other = [n for n in other.names if n not in base]
    if (only_base or only_other) and not skip_missing:
        parts = []
        if only_base:
            parts.append(f"{len(only_base)} only in the base ({_some(only_base)})")
        if only_other:
            parts.append(f"{len(only_other)} only in {other_label} ({_some(only_other)})")
        raise ReadaptError(f"the checkpoints do not hold the same tensors: {'; '.join(parts)}. "
                           f"Pass --skip-missing (skip_missing=True) to leave those tensors out.")
    shared = [n for n in base.names if n in other]
    for n in shared:
        if base.shape(n) != other.shape(n):
            raise ReadaptError(f"tensor {n!r} has shape {list(base.shape(n))} in the base but "
                               f"{list(other.shape(n))} in {other_label}: these are different architectures")
    return shared, only_base + only_other


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
