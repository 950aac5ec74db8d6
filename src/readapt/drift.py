"""Version drift: how far a new model version moved from the old one, next to the patch carried to it.

    drift(new, old, patch, items)   per tensor and per layer: ‖θ′ − θ‖/‖θ‖, ‖P‖/‖θ′ − θ‖ and cos(P, θ′ − θ)

PortLLM (Khan et al., 2024, §3) argues that a patch P = θ_ft − θ stays useful on θ′ when the version change
is unrelated to it; these statistics show whether it is (cos ≈ 0, ‖P‖ small next to the drift). Streamed
in blocks: θ′ − θ in float32 (checkpoint.difference_blocks; patched matrices in blocks of rows, with the
patch's rows computed as merge computes them, `Addend.rows`); sums in float64.
"""

from __future__ import annotations

import itertools
import math
import re

import torch

from readapt.checkpoint import Checkpoint, TensorInfo, difference_blocks, progress, read_rows, reader, row_spans
from readapt.portmap import Item, rekey


def _layer(name: str) -> str:
    m = re.search(r"layers\.(\d+)\.", name)
    return f"layer {int(m.group(1))}" if m else name.removesuffix(".weight")


class _Dots:
    """⟨a, b⟩ summed in float64, BLOCK elements at a time, widened into two reused float64 buffers (no
    float64 copy of a whole tensor, and no fresh allocation per chunk)."""

    def __init__(self):
        n = reader.BLOCK
        self.x, self.y = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float:
        total, same = 0.0, a.data_ptr() == b.data_ptr() and a.dtype == b.dtype  # ‖a‖²: widen once
        for u, v in zip(a.reshape(-1).split(reader.BLOCK), b.reshape(-1).split(reader.BLOCK)):
            x = self.x[: u.numel()].copy_(u)
            total += float(x.dot(x if same else self.y[: v.numel()].copy_(v)))
        return total

    def drift(self, new: torch.Tensor | TensorInfo, old: torch.Tensor | TensorInfo,
              P: torch.Tensor | None = None) -> tuple[float, float, float, float]:
        """(‖D‖², ‖θ‖², ‖P‖², ⟨P, D⟩) for D = θ′ − θ, θ′ and θ given as `Checkpoint.stored` values (read
        in BLOCK-element blocks, never loaded whole) or tensors, P the patch on it (0 if None): the same
        float32 difference and float64 sums as the whole-tensor path."""
        d2 = w2 = p2 = pd = 0.0
        ps = P.reshape(-1).split(reader.BLOCK) if P is not None else itertools.repeat(None)
        for (_, theta, d), p in zip(difference_blocks(new, old), ps):  # θ′ − θ in float32
            d2 += self(d, d)
            w2 += self(theta, theta)
            if p is not None:
                p2 += self(p, p)
                pd += self(p, d)
        return d2, w2, p2, pd

    def drift_rows(self, new: TensorInfo | torch.Tensor, old: TensorInfo | torch.Tensor, patch, name: str
                   ) -> tuple[float, float, float, float]:
        """`drift` with the patch P = Ψ (or Φ′ − θ′) computed in blocks of rows (`Addend.rows`, as merge does):
        θ′, θ and P never whole."""
        d2 = w2 = p2 = pd = 0.0
        for r0, r1 in row_spans(new.shape):
            Wn = read_rows(new, r0, r1).float()
            x, is_target = patch.rows(name, Wn, r0, new)
            P = x.sub_(Wn) if is_target else x
            theta = read_rows(old, r0, r1).float()
            D = Wn.sub_(theta)  # θ′ − θ, as difference_blocks computes it
            d2, w2 = d2 + self(D, D), w2 + self(theta, theta)
            if P is not None:
                p2, pd = p2 + self(P, P), pd + self(P, D)
        return d2, w2, p2, pd


def drift(new: Checkpoint, old: Checkpoint, patch, items: dict[str, Item]) -> dict:
    """Version drift D = θ′ − θ per tensor and per layer: ‖D‖/‖θ‖, ‖P‖/‖D‖ and cos(P, D), where P is the
    ported patch on that tensor (0 where it has none). Vocabulary tensors compare the rows of shared
    tokens. Streams one tensor triple at a time; sums in float64."""
    names = rekey(old.names, new.names)
    old_of = {v: k for k, v in names.items()}
    per_tensor: dict[str, dict] = {}
    acc: dict[str, list[float]] = {}  # layer -> [‖D‖², ‖θ‖², ‖P‖², ⟨P, D⟩]
    dot = _Dots()
    floats = [n for n in new.names
              if n in old_of and new.dtype(n).is_floating_point and old.dtype(old_of[n]).is_floating_point]
    with progress(sum(new.infos[n].end - new.infos[n].start for n in floats), "drift") as bar:
        for n in floats:
            it, o = items.get(n), old_of[n]
            if it is None and new.shape(n) == old.shape(o):  # unpatched: θ′ and θ in blocks
                d2, w2, p2, pd = dot.drift(new.stored(n), old.stored(o))
            elif it is not None and it.rows is None and new.shape(n) == old.shape(o) and len(new.shape(n)) > 1:
                d2, w2, p2, pd = dot.drift_rows(new.stored(n), old.stored(o), patch, n)
            elif it is not None and it.rows is None and new.shape(n) == old.shape(o):  # 1-D: whole
                Wn = new.read(n).float()
                d2, w2, p2, pd = dot.drift(Wn, old.stored(o), patch.delta(n, Wn))
                del Wn
            elif it is not None and it.rows is not None:  # vocabulary rows: compare the shared tokens
                keep = it.rows >= 0
                Wn = new.read(n).float()
                P = patch.delta(n, Wn)[keep]
                Wo = old.read(o).float()[it.rows[keep]]  # old rows of the shared tokens
                D = Wn[keep].sub_(Wo)
                d2, w2, p2, pd = dot(D, D), dot(Wo, Wo), dot(P, P), dot(P, D)
                del Wn, Wo, D
            else:  # another shape: no drift to report
                per_tensor[n] = {"drift": None, "note": f"shape {list(old.shape(o))} -> {list(new.shape(n))}: not compared"}
                continue
            patched, P = it is not None, None
            row = {"drift": math.sqrt(d2 / w2) if w2 else None}
            if patched:
                row["patch_to_drift"] = math.sqrt(p2 / d2) if d2 else None
                row["cos_patch_drift"] = pd / math.sqrt(p2 * d2) if p2 and d2 else None
            per_tensor[n] = row
            a = acc.setdefault(_layer(n), [0.0, 0.0, 0.0, 0.0])
            for k, v in enumerate((d2, w2, p2, pd)):
                a[k] += v
            bar.update(new.infos[n].end - new.infos[n].start)
    acc = dict(sorted(acc.items(), key=lambda kv: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", kv[0])]))
    layers = {k: {"drift": math.sqrt(d2 / w2) if w2 else None,
                  "patch_to_drift": math.sqrt(p2 / d2) if d2 and p2 else None,
                  "cos_patch_drift": pd / math.sqrt(p2 * d2) if p2 and d2 else None}
              for k, (d2, w2, p2, pd) in acc.items()}
    tot = [sum(a[k] for a in acc.values()) for k in range(4)]
    total = {"drift": math.sqrt(tot[0] / tot[1]) if tot[1] else None,
             "patch_to_drift": math.sqrt(tot[2] / tot[0]) if tot[0] and tot[2] else None,
             "cos_patch_drift": tot[3] / math.sqrt(tot[2] * tot[0]) if tot[0] and tot[2] else None}
    return {"formula": "drift = ‖θ′−θ‖/‖θ‖; patch_to_drift = ‖P‖/‖θ′−θ‖; cos = ⟨P, θ′−θ⟩/(‖P‖‖θ′−θ‖)",
            "total": total, "layers": layers, "tensors": per_tensor}
