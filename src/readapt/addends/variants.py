"""LoRA's weight-space term and its variants, as PEFT's `LoraVariant` objects: plain LoRA and DoRA.

    LoraTerm      Ψ = s·B·A of one base tensor (whole: `delta`; rows r0…r1: `rows`, the same dot product
                  over the rank per element, so blocks of rows give the whole product's rows bit for bit)
    LoraVariant   plain LoRA: W′ = W + s·B·A; merge adds the term, there is no full weight W′
    DoraVariant   DoRA (Liu et al. 2024, eq. 5): W′ = m ⊙ (W + sBA) / ‖W + sBA‖, the norm per output row of
                  a Linear weight, per embedding dimension (over the vocabulary) of an embedding; computed in
                  float32 exactly as PEFT's merge does

A variant checks its module's saved parts and defines W′ (whole: `target`, rows: `target_rows`);
everything else is LoRA's (readapt.addends.lora.LoraAdapter).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from readapt.addends.base import Kind
from readapt.checkpoint import TensorInfo, read_rows, row_spans
from readapt.errors import ReadaptError

if TYPE_CHECKING:
    from readapt.addends.lora import LoraAdapter, _Module


@dataclass
class LoraTerm:
    """Ψ = s·B·A for one base tensor, in float32, with the factors as PEFT stores them: B out×r, A r×in;
    for an embedding B is dim×r and A r×vocab, and Ψ = s·(B·A)ᵀ (vocab×dim), as for a fan_in_fan_out
    layer, which stores Wᵀ (`transposed`)."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float
    transposed: bool = False

    def delta(self) -> torch.Tensor:
        """Ψ as PEFT's get_delta_weight computes it: the product (the one full-size buffer), transposed if so,
        then scaled in place."""
        d = self.B @ self.A
        if self.transposed:
            d = d.T
        return d.mul_(self.scale)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Ψ[r0:r1] = s·B[r0:r1]·A (transposed: s·(A[:, r0:r1])ᵀ·Bᵀ), each element the same dot product over
        the rank as in `delta` (bit for bit for blocks of checkpoint.row_spans), then scaled in place."""
        d = self.A[:, r0:r1].T @ self.B.T if self.transposed else self.B[r0:r1] @ self.A
        return d.mul_(self.scale)


class LoraVariant:
    """Plain LoRA: W′ = W + s·B·A. merge adds the term; there is no full weight to blend towards."""

    kind = Kind.LORA

    @staticmethod
    def check(where: str, parts: Container[str], factored: bool) -> None:
        """Refuse DoRA magnitudes in an adapter whose config does not say use_dora."""
        if "lora_magnitude_vector" in parts:
            raise ReadaptError(f"{where} has a lora_magnitude_vector but adapter_config.json does not say "
                               f"use_dora: true: the adapter is inconsistent")

    @staticmethod
    def target(adapter: LoraAdapter, name: str, mod: _Module, base: torch.Tensor) -> torch.Tensor | None:
        return None

    @staticmethod
    def target_rows(adapter: LoraAdapter, name: str, mod: _Module, W: torch.Tensor, r0: int,
                    base: TensorInfo | torch.Tensor) -> torch.Tensor | None:
        return None


class DoraVariant(LoraVariant):
    """DoRA (Liu et al. 2024, eq. 5): W′ = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm per output row of a
    Linear weight and per embedding dimension (column) of an embedding, as PEFT's DoRA layers take it."""

    kind = Kind.DORA

    @staticmethod
    def check(where: str, parts: Container[str], factored: bool) -> None:
        """Every factored module has its magnitude m, and m comes with factors (PEFT would merge plain LoRA
        or fail otherwise)."""
        if factored and "lora_magnitude_vector" not in parts:
            raise ReadaptError(f"{where} has no lora_magnitude_vector, but adapter_config.json says use_dora: "
                               f"the DoRA adapter is incomplete (or set use_dora to false if it is plain LoRA)")
        if "lora_magnitude_vector" in parts and not factored:
            raise ReadaptError(f"{where} has a lora_magnitude_vector but no lora_A/lora_B factors: the adapter "
                               f"is inconsistent")

    @staticmethod
    def weight_norm(W: torch.Tensor, embedding: bool) -> torch.Tensor:
        """‖W‖ as DoRA takes it: per output row of a Linear W (out×in), per column of an embedding (vocab×dim)."""
        return torch.linalg.norm(W, dim=0 if embedding else 1)

    @staticmethod
    def target(adapter: LoraAdapter, name: str, mod: _Module, base: torch.Tensor) -> torch.Tensor | None:
        """W′ = m ⊙ (W + d) / ‖W + d‖, d = s·B·A: the same operations in the same order as PEFT's merge."""
        if "lora_magnitude_vector" not in mod.parts:
            return None
        d = adapter.term(name).delta()
        m = adapter.ckpt.read(mod.parts["lora_magnitude_vector"]).float()
        combined = base + d
        if "lora_embedding_A" in mod.parts:  # norm of each embedding dimension over the vocabulary; m: dim
            norm = torch.linalg.norm(base.T + d.T, dim=1)  # PEFT takes it on the transposed sum
            return (m / norm).view(1, -1).mul(combined)
        if adapter.config.get("fan_in_fan_out"):
            raise ReadaptError(f"{adapter.path}: DoRA with fan_in_fan_out=True is not supported")
        del d
        norm = DoraVariant.weight_norm(combined, embedding=False)  # out; PEFT's get_weight_norm of W + d
        return combined.mul_((m / norm).view(-1, 1))

    @staticmethod
    def target_rows(adapter: LoraAdapter, name: str, mod: _Module, W: torch.Tensor, r0: int,
                    base: TensorInfo | torch.Tensor) -> torch.Tensor | None:
        """Rows r0 … r0 + len(W) of W′ = m ⊙ (W + d) / ‖W + d‖. Linear: the norm of each output row is over
        that row alone, so a block of rows gives `target`'s rows bit for bit. Embedding: the norm of each
        dimension runs over the whole vocabulary (`stored_norm`, one pass over the base first)."""
        if "lora_magnitude_vector" not in mod.parts:
            return None
        r1 = r0 + len(W)
        term = adapter.kept(name, "term", lambda: adapter.term(name))
        m = adapter.kept(name, "m", lambda: adapter.ckpt.read(mod.parts["lora_magnitude_vector"]).float())
        combined = term.rows(r0, r1).add_(W)  # W + d: addition commutes bit for bit
        if "lora_embedding_A" in mod.parts:
            norm = adapter.kept(name, "norm", lambda: DoraVariant.stored_norm(base, embedding=True, term=term))
            return (m / norm).view(1, -1).mul(combined)
        if adapter.config.get("fan_in_fan_out"):
            raise ReadaptError(f"{adapter.path}: DoRA with fan_in_fan_out=True is not supported")
        norm = DoraVariant.weight_norm(combined, embedding=False)
        return combined.mul_((m[r0:r1] / norm).view(-1, 1))

    @staticmethod
    def stored_norm(base: TensorInfo | torch.Tensor, embedding: bool, term: LoraTerm | None = None) -> torch.Tensor:
        """‖W + d‖ as DoRA takes it (`weight_norm`; d: the term's Ψ, or 0), W read in blocks of rows from where
        it is stored. Per output row of a Linear weight: bit for bit `weight_norm`. Per column (embedding
        dimension) of an embedding, over all rows: the squares summed in float64 (exact products, the sum
        nearly so), the square root rounded to float32, where PEFT's torch.linalg.norm sums in float32 in an
        order that depends on the shape and the thread count; a tensor of one block is normed as
        `weight_norm`, bit for bit."""
        spans = row_spans(base.shape)
        rows = ((r0, r1, read_rows(base, r0, r1).float()) for r0, r1 in spans)
        sums = (W if term is None else term.rows(r0, r1).add_(W) for r0, r1, W in rows)  # W + d (commutes)
        if not embedding:
            return torch.cat([DoraVariant.weight_norm(X, embedding=False) for X in sums])
        if len(spans) == 1:
            return DoraVariant.weight_norm(next(sums), embedding=True)
        acc = torch.zeros(base.shape[1], dtype=torch.float64)
        for X in sums:
            acc += X.double().square_().sum(0)
        return acc.sqrt_().float()
