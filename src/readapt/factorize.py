"""The rank rule and one low-rank factorization: Δ ≈ B A, optimal or nearly so.

RE-Adapt (Fleshman & Van Durme, 2024, §3.3, "LoRE-Adapt"), for a 2-D weight delta Δ (out×in):

    Δ = U S Vᵀ,   v_k = Σ_{i≤k} σᵢ² / Σⱼ σⱼ²,   k(τ) = min{k : v_k ≥ τ}      (τ = 0.5 in the paper)
    B = U_k S_k   (out×k),   A = V_kᵀ   (k×in),   Ψ = B A

B A is the best rank-k approximation of Δ (Eckart–Young): ‖Δ − BA‖_F = sqrt(Σ_{i>k} σᵢ²). A fixed rank
k is the other rule (`check_rule`: exactly one of them).

SVD paths (`svd=`):

    exact       torch.linalg.svd in float32 (LAPACK gesdd)
    gram        eigh of the Gram matrix of the smaller side (float32): Δ Δᵀ = U S² Uᵀ (out ≤ in);
                B = U_k, A = U_kᵀ Δ, so BA = U_k U_kᵀ Δ = U_k S_k V_kᵀ, the same product without dividing
                by small σ (for out > in, the same on Δᵀ: B = Δ V_k, A = V_kᵀ)
    randomized  fixed rank k only: randomized subspace iteration on the same Gram matrix (Halko, Martinsson
                & Tropp 2011, Alg. 4.4) with k + max(16, k) columns and 10 iterations (= 20 power steps on Δ),
                then Rayleigh-Ritz; B, A as for gram. Falls back to gram when 2(k + p) ≥ min(m, n).
    auto        τ rule -> gram (needs the whole spectrum), fixed rank -> randomized
    (gram/randomized: ~1e-4 relative excess over the optimal error on the benchmark pair; see benchmarks/)

A Δ given as factors (`Product`: Δ = B A, e.g. LoRA terms stacked by a fold) is factored from them with
two thin QRs and an SVD of the small core (`factorize_product`), exact whatever `svd` says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from readapt.errors import ReadaptError

SVD_METHODS = ("auto", "exact", "gram", "randomized")
TAU_TOL = 1e-9  # v_k is a float64 sum: "v_k ≥ τ" is tested as v_k ≥ τ − 1e-9 so that τ=1 keeps what is there


def check_rule(tau: float | None, rank: int | None) -> None:
    """Exactly one of τ ∈ (0, 1] and rank ≥ 1."""
    if (tau is None) == (rank is None):
        raise ReadaptError("give exactly one of --tau (explained-variance share, e.g. 0.5) and --rank (e.g. 64)")
    if tau is not None and not (isinstance(tau, (int, float)) and 0 < tau <= 1 and math.isfinite(tau)):
        raise ReadaptError(f"--tau {tau!r} is outside (0, 1]: it is the share of each layer's squared singular "
                           f"values to keep, e.g. 0.5")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ReadaptError(f"--rank {rank!r} must be a positive integer (ranks above a layer's min(out, in) are "
                           f"clamped to it, with a warning)")


def explained(sigma: torch.Tensor) -> torch.Tensor:
    """v_k for k = 1..len(σ): the cumulative share of Σσ², in float64 (σ sorted descending)."""
    e = sigma.double().square()
    total = e.sum()
    return e.cumsum(0) / total if total > 0 else torch.zeros_like(e)


def rank_at(sigma: torch.Tensor, tau: float) -> int:
    """k(τ) = the smallest k with v_k ≥ τ (0 for an all-zero spectrum)."""
    v = explained(sigma)
    if v.numel() == 0 or float(v[-1]) == 0.0:
        return 0
    return min(int((v < tau - TAU_TOL).sum()) + 1, v.numel())


def energy_of(d: torch.Tensor, block: int = 1 << 22) -> float:
    """‖d‖_F² accumulated in float64, in blocks (no full-size float64 copy)."""
    return sum(float(c.double().square().sum()) for c in d.reshape(-1).split(block))


def numerical_rank(sigma: torch.Tensor, shape: Sequence[int]) -> int:
    """Singular values above σ₁·max(m, n)·ε(float32) (LAPACK's rank cutoff): the rest is rounding noise."""
    if sigma.numel() == 0 or float(sigma[0]) == 0.0:
        return 0
    return int((sigma > sigma[0] * max(shape) * torch.finfo(torch.float32).eps).sum())


@dataclass
class Factorization:
    """Δ ≈ B A for one tensor, and what it keeps."""

    B: torch.Tensor | None  # out×k (None for rank 0)
    A: torch.Tensor | None  # k×in
    rank: int
    energy: float  # ‖Δ‖_F²
    kept: float  # ‖BA‖_F² = Σ_{i≤k} σᵢ²
    sigma: torch.Tensor | None  # the full spectrum when the method computed it (exact, gram)
    clamped: bool = False  # the requested rank was above min(out, in) or the numerical rank
    residual: float | None = None  # ‖Δ − BA‖_F² (None: energy − kept; that difference loses the small errors)


@contextmanager
def one_thread(device: torch.device, small: bool = True):
    """Run a stretch of small CPU ops on one thread (measured 5-10× faster on a busy 2-core machine)."""
    if device.type != "cpu" or not small:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


SMALL_EIG = 1024  # Gram matrices up to this size are decomposed on one thread (see gram_eig)


def gram_eig(G: torch.Tensor, vectors: bool = True):
    """Eigenvalues (and eigenvectors) of the symmetric s×s Gram matrix G, descending.

    On the CPU, for s ≤ SMALL_EIG, on one thread (which also makes the factors independent of the
    machine's thread count): at that size LAPACK's threads gain little and lose much when another process
    holds a core. Measured on the 2-core machine (s = 576, SmolLM2): under load, eigh 0.07 s on one thread
    and 0.2–8 s on two (eigvalsh 0.035 s vs 0.09–0.2 s), and `extract --tau 0.5` of the real SmolLM2 pair
    69 s on two threads, 24 s on one; unloaded, 10.2–11.3 s on two, 11.4–12.3 s on one. Larger matrices
    keep the default threads, which pay for themselves there on a quiet machine."""
    with one_thread(G.device, G.shape[0] <= SMALL_EIG):
        if not vectors:
            return torch.linalg.eigvalsh(G).flip(0)
        lam, Q = torch.linalg.eigh(G)  # ascending
    return lam.flip(0), Q.flip(1)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of range(Y) (s×q, q ≪ s): Cholesky-QR, Q = Y L⁻ᵀ with L Lᵀ = YᵀY in float64.
    (Much cheaper than Householder QR for tall-skinny Y; falls back to it if YᵀY is not positive definite.)"""
    L, info = torch.linalg.cholesky_ex((Y.T @ Y).double())
    if int(info) != 0:
        return torch.linalg.qr(Y)[0]
    return torch.linalg.solve_triangular(L, Y.double().T, upper=False).T.to(Y.dtype)


def _method(svd: str, tau: float | None) -> str:
    """The SVD path `svd` names, checked; auto: gram for the τ rule (it needs every σ), randomized for a rank."""
    if svd not in SVD_METHODS:
        raise ReadaptError(f"--svd {svd!r}: choose one of {', '.join(SVD_METHODS)}")
    if svd == "auto":
        return "gram" if tau is not None else "randomized"
    if svd == "randomized" and tau is not None:
        raise ReadaptError("--svd randomized needs a fixed --rank: the τ rule needs every singular value "
                           "(use --svd gram or exact)")
    return svd


def factorize(delta: torch.Tensor | Product, *, tau: float | None = None, rank: int | None = None, svd: str = "auto",
              oversample: int | None = None, power_iters: int = 10, seed: int = 0) -> Factorization:
    """Optimal (exact) or near-optimal (gram, randomized) rank-k factors of a float32 matrix `delta`.

    The math runs on delta's device. τ picks k per matrix, `rank` fixes it (clamped to min(out, in) and to
    the numerical rank). An all-zero matrix gives rank 0 and no factors. Memory: Δ plus O(min(m,n)²).
    A `Product` (Δ held as B A) is factored from its factors (`factorize_product`, exact; `svd` unused).
    """
    if isinstance(delta, Product):
        return factorize_product(delta, tau=tau, rank=rank)
    check_rule(tau, rank)
    svd = _method(svd, tau)
    D = delta.float()
    m, n = D.shape
    if svd == "exact":
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)  # U: m×r, S: r, Vh: r×n, r = min(m, n)
        energy = float(S.double().square().sum())
    else:
        X = D if m <= n else D.T  # s×l, s = min(m, n) (a view)
        G = X @ X.T  # s×s Gram matrix, = U S² Uᵀ
        energy = float(G.diagonal().double().sum())  # ‖Δ‖_F² = trace(G)
    if energy == 0.0:
        return Factorization(None, None, 0, 0.0, 0.0, D.new_zeros(min(m, n)).cpu())
    if not math.isfinite(energy):
        raise ReadaptError("the delta has NaN/Inf values")  # callers check first and name the tensor
    if svd == "gram" or (svd == "randomized" and 2 * (rank + max(16, rank)) >= min(m, n)):
        lam, Q = gram_eig(G)
        S = lam.clamp_min(0).sqrt()
    elif svd == "randomized":
        # randomized subspace iteration on G (Halko, Martinsson & Tropp 2011, Alg. 4.4; each step on G is
        # two power steps on Δ), then Rayleigh–Ritz: G ≈ Q (W Λ Wᵀ) Qᵀ
        q = min(rank + (oversample if oversample is not None else max(16, rank)), G.shape[0])
        gen = torch.Generator(device=G.device).manual_seed(seed)
        with one_thread(G.device):  # small s×q products: thread hand-offs cost more than they save
            Q = _orth(G @ torch.randn(G.shape[0], q, generator=gen, device=G.device))
            for _ in range(power_iters):
                Q = _orth(G @ Q)
            lam, W = torch.linalg.eigh(Q.T @ G @ Q)  # q×q
        lam, Q = lam.flip(0), (Q @ W).flip(1)
        S = lam.clamp_min(0).sqrt()
    k_num = numerical_rank(S, D.shape)
    k = rank_at(S, tau) if tau is not None else rank
    clamped = k > min(m, n) or (svd == "exact" and k > k_num)
    k = min(k, k_num)
    if svd == "exact":
        e = S.double().square()
        return Factorization(U[:, :k] * S[:k], Vh[:k].contiguous(), k, energy, float(e[:k].sum()), S.cpu(), clamped,
                             float(e[k:].sum()))
    Uk = Q[:, :k]  # s×k: top-k singular vectors of the smaller side
    if m <= n:  # Δ = X: B = U_k, A = U_kᵀ Δ  (no division by small σ; BA = U_k U_kᵀ Δ)
        B, A = Uk.contiguous(), (Uk.T @ X).contiguous()
        kept = A.double().square().sum()
    else:  # Δ = Xᵀ: B = Δ U_k, A = U_kᵀ  (BA = Δ U_k U_kᵀ)
        B, A = (D @ Uk).contiguous(), Uk.T.contiguous()
        kept = B.double().square().sum()
    return Factorization(B, A, k, energy, float(kept), S.cpu() if svd == "gram" else None, clamped,
                         residual_of(D, B, A))


def residual_of(D: torch.Tensor, B: torch.Tensor, A: torch.Tensor, rows: int = 1024) -> float:
    """‖D − B A‖_F², summed in float64 over blocks of `rows` rows (one block of B A in memory at a time). The
    gram and randomized paths report it measured: energy − kept, each summed from float32 factors, cancels
    to ~1e-6 of the energy, so an error of 1e-3 came out 7% off (SmolLM2, a rank-16 fold)."""
    with one_thread(D.device, D.shape[1] * rows <= 1 << 22):
        return sum(float((D[i:i + rows] - B[i:i + rows] @ A).double().square().sum())
                   for i in range(0, D.shape[0], rows))


@dataclass
class Product:
    """Δ = B A held as its factors (B: m×R, A: R×n), never formed: e.g. a sum of LoRA terms Σ sᵢBᵢAᵢ stacked as
    B = [s₁B₁, s₂B₂, …], A = [A₁; A₂; …] (readapt.folding)."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def to(self, device: torch.device) -> Product:
        return Product(self.B.to(device), self.A.to(device))

    def dense(self) -> torch.Tensor:
        return self.B @ self.A


def energy_of_product(p: Product) -> float:
    """‖B A‖_F² = Σᵢⱼ (BᵀB)ᵢⱼ (AAᵀ)ᵢⱼ from the two R×R Gram matrices, in float64."""
    B, A = p.B.double(), p.A.double()
    with one_thread(B.device):
        return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0))


def factorize_product(p: Product, *, tau: float | None = None, rank: int | None = None) -> Factorization:
    """Optimal rank-k factors of Δ = B A from its factors, never forming the m×n matrix.

        B = Q_B R_B,  Aᵀ = Q_A R_A      (thin Householder QR, float32: Q_B m×R, Q_A n×R)
        R_B R_Aᵀ = U S Vᵀ               (SVD of the R×R core, float64)
        Δ = (Q_B U) S (Q_A V)ᵀ           so σ(Δ) = S, and  B̂ = Q_B U_k S_k,  Â = V_kᵀ Q_Aᵀ

    k by the same rule as `factorize` (τ, or a fixed rank clamped to the numerical rank), so B̂Â is Δ's best
    rank-k approximation (Eckart–Young) at the cost of two m×R and n×R QRs (on one CPU thread, as for
    gram_eig: measured on the 2-core machine under load, a 2816×128 QR takes 0.01 s on one thread and
    0.06 s on two, a 128×128 SVD 0.005 s and 0.05 s). With neither τ nor rank the factors are kept as they
    are (exact, rank R: a fold that only concatenates)."""
    m, n = p.shape
    if tau is None and rank is None:
        energy = energy_of_product(p)
        return Factorization(p.B, p.A, p.A.shape[0], energy, energy, None, residual=0.0)
    check_rule(tau, rank)
    if p.A.shape[0] == 0:
        return Factorization(None, None, 0, 0.0, 0.0, p.B.new_zeros(0).cpu())
    with one_thread(p.B.device):
        QB, RB = torch.linalg.qr(p.B.float())
        QA, RA = torch.linalg.qr(p.A.float().T)
        U, S, Vh = torch.linalg.svd(RB.double() @ RA.double().T)
    energy = float(S.square().sum())
    if energy == 0.0:
        return Factorization(None, None, 0, 0.0, 0.0, S.float().cpu())
    if not math.isfinite(energy):
        raise ReadaptError("the factors have NaN/Inf values")  # callers check first and name the tensor
    k_num = numerical_rank(S.float(), (m, n))
    k = rank_at(S, tau) if tau is not None else rank
    clamped = k > min(m, n) or k > k_num
    k = min(k, k_num)
    with one_thread(p.B.device):
        B = QB @ (U[:, :k] * S[:k]).to(QB.dtype)
        A = Vh[:k].to(QA.dtype) @ QA.T
    return Factorization(B, A, k, energy, float(S[:k].square().sum()), S.float().cpu(), clamped,
                         float(S[k:].square().sum()))
