"""How the addends of a merge meet, layer by layer: the cosine between their scaled weight-space differences
and the size of each relative to the base.

For addends i, j with scales sᵢ, sⱼ and differences Ψᵢ, Ψⱼ (readapt.combine), over the tensors of one layer
that the merge touches (every element of every such tensor, flattened into one vector):

    cos(i, j) = ⟨sᵢΨᵢ, sⱼΨⱼ⟩ / (‖sᵢΨᵢ‖·‖sⱼΨⱼ‖)        0: orthogonal; > 0 they push the same way; < 0 opposite
    rel(i)    = ‖sᵢΨᵢ‖ / ‖Φ‖                           how far the addend moves the layer, as a share of it

An addend that does not touch a tensor contributes Ψ = 0 there. The sums are accumulated block by block as
the merge computes (float32 dot products per block, float64 across blocks): no tensor is held for them.
Near-orthogonal differences can still interfere in function (a knowledge adapter and an instruction delta
both moving the same small subspace of activations); this is the weight-space view, and says so.
"""

from __future__ import annotations

import math
import re

import torch

INTERFERENCE_FILE = "readapt_interference.json"  # written by merge beside the model when it has 2+ addends
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_of(name: str) -> str:
    """The group a tensor belongs to: 'layer N', 'embeddings', 'lm_head', or 'other' (final norm, ...)."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    if "embed" in name or name.endswith("wte.weight"):
        return "embeddings"
    return "lm_head" if "lm_head" in name else "other"


class Interference:
    """Accumulates, per layer, ‖Φ‖² and the Gram matrix G[i, j] = ⟨sᵢΨᵢ, sⱼΨⱼ⟩ of the k addends."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.base: dict[str, float] = {}
        self.gram: dict[str, torch.Tensor] = {}  # layer -> [k, k] float64

    def add(self, name: str, W: torch.Tensor, terms: list[tuple[int, torch.Tensor, float]]) -> None:
        """One tensor (or block) of Φ, `W`, and the addends' differences on it: (addend index, Ψ, s)."""
        key = layer_of(name)
        G = self.gram.setdefault(key, torch.zeros(len(self.labels), len(self.labels), dtype=torch.float64))
        flat = [(i, x.reshape(-1), s) for i, x, s in terms]  # a copy only of a non-contiguous block (rows of Ψᵀ)
        W = W.reshape(-1)
        self.base[key] = self.base.get(key, 0.0) + float(torch.dot(W, W))
        for a, (i, x, s) in enumerate(flat):
            for j, y, t in flat[a:]:
                G[i, j] += s * t * float(torch.dot(x, y))
                G[j, i] = G[i, j]

    def summary(self) -> dict:
        """{"addends": labels, "layers": {layer: {"rel": [..], "cos": {"i,j": ..}}}, "overall": same over all}."""
        layers = {k: self._figures(G, self.base[k]) for k, G in sorted(self.gram.items(), key=_order)}
        overall = self._figures(sum(self.gram.values()), sum(self.base.values())) if self.gram else {}
        return {"addends": self.labels, "layers": layers, "overall": overall}

    def _figures(self, G: torch.Tensor, base_sq: float) -> dict:
        norms = G.diagonal().clamp(min=0).sqrt()
        k = len(self.labels)
        cos = {f"{i + 1},{j + 1}": (float(G[i, j] / (norms[i] * norms[j])) if norms[i] * norms[j] > 0 else None)
               for i in range(k) for j in range(i + 1, k)}
        return {"rel": [float(n) / math.sqrt(base_sq) if base_sq > 0 else None for n in norms], "cos": cos}


def _order(item) -> tuple:
    key = item[0]
    rank = {"embeddings": 0, "other": 2, "lm_head": 3}.get(key, 1)
    return rank, int(key.split()[1]) if key.startswith("layer ") else 0
