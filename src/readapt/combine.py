"""The one combine: Ω = Φ + Σᵢ sᵢ·Ψᵢ in float32, for whole tensors and for blocks of them alike.

RE-Adapt §3.2 ("partial adaptation"): Ω = Φ + αΨ + βΔ, any real scales. Each term is (x, s, is_target):
x is Ψᵢ, or the full weight Φ′ᵢ the addend defines (is_target; then Ψᵢ = Φ′ᵢ − Φ); x = None adds nothing.

    one term, Φ′     Ω = lerp(Φ, Φ′, s) = Φ + s·(Φ′ − Φ)      exact at both ends: Φ at s = 0, Φ′ at s = 1
    one term, Ψ      Ω = Φ + s·Ψ                              (at s = 1 the operation PEFT's merge performs)
    several          Ω = Φ + (Σᵢ sᵢ·Ψᵢ)                       the scaled sum first, added once

Shapes: W and every x alike, a whole tensor ([out, in], [n]) or a 1-D block of one ([k]): the operations
are elementwise, so a tensor combined block by block equals the tensor combined whole, bit for bit.
Everything happens in place on W and on the x (which the caller hands over).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain

import torch

Term = tuple[torch.Tensor | None, float, bool]  # (Ψ or Φ′, scale s, is_target)
Observer = Callable[[torch.Tensor, list[tuple[torch.Tensor | None, float]]], None]  # (Φ, [(Ψᵢ or None, sᵢ)])


def combine(W: torch.Tensor, terms: Iterable[Term], observe: Observer | None = None) -> torch.Tensor:
    """Ω = Φ + Σ sᵢ·Ψᵢ on the float32 base W (in place; returns it). `terms` may be a generator: each term
    is taken when it is needed, so a whole-tensor merge holds the sum and one term, never all of them.
    `observe(Φ, [(Ψᵢ, sᵢ)])` (readapt.interference) sees the base and every difference before they are
    summed; then all terms are held at once. The result is the same, bit for bit."""
    if observe is not None:
        return _observed(W, list(terms), observe)
    it = iter(terms)
    first, second = next(it, None), None
    if first is not None:
        second = next(it, None)
    if second is None:  # one term (or none)
        if first is None or first[0] is None:
            return W
        x, s, is_target = first
        return W.lerp_(x, s) if is_target else W.add_(x, alpha=s)
    acc = None  # Σ sᵢ·Ψᵢ
    for x, s, is_target in chain((first, second), it):
        if x is None:
            continue
        d = x.sub_(W) if is_target else x
        acc = d.mul_(s) if acc is None else acc.add_(d, alpha=s)
    return W if acc is None else W.add_(acc)


def _observed(W: torch.Tensor, terms: list[Term], observe: Observer) -> torch.Tensor:
    """combine, with the differences Ψᵢ (Φ′ᵢ − Φ for a target) shown to `observe` first. The operations on W
    are combine's own: a single term is still lerped (its difference is measured on a copy)."""
    if sum(x is not None for x, _, _ in terms) <= 1:
        observe(W, [((x - W) if t and x is not None else x, s) for x, s, t in terms])
        return combine(W, terms)
    diffs = [x.sub_(W) if t and x is not None else x for x, _, t in terms]
    observe(W, [(d, s) for d, (_, s, _) in zip(diffs, terms)])
    return combine(W, [(d, s, False) for d, (_, s, _) in zip(diffs, terms)])


def keep_exact(W: torch.Tensor, at: torch.Tensor, phi: torch.Tensor, theta: torch.Tensor, s: float) -> torch.Tensor:
    """At the elements `at` of W where Φ + Δ is known not to be Θ (a delta folder's recorded exceptions, with
    Φ and Θ there): Θ at s = 1, else lerp(Φ, Θ, s) (Φ at s = 0; lerp at 1 would turn Θ = -0.0 into +0.0)."""
    if len(at):
        W[at] = theta if s == 1 else phi.lerp_(theta, s)
    return W
