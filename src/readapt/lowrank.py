"""LoRE-Adapt: per-layer low-rank compression of a weight delta, saved as a PEFT LoRA.

RE-Adapt (Fleshman & Van Durme, 2024, §3.3, "LoRE-Adapt"): for every 2-D weight of the RE-Adapter
Δ = Θ − Φ (out×in),

    Δ = U S Vᵀ,   v_k = Σ_{i≤k} σᵢ² / Σⱼ σⱼ²,   k(τ) = min{k : v_k ≥ τ}      (τ = 0.5 in the paper)
    B = U_k S_k   (out×k),   A = V_kᵀ   (k×in),   Ψ = B A

B A is the best rank-k approximation of Δ (Eckart–Young): ‖Δ − BA‖_F = sqrt(Σ_{i>k} σᵢ²), a floor
the tests check exactly. A fixed rank k is the other rule. The adapter is a PEFT LoRA with
rank_pattern = alpha_pattern (scale alpha/r = 1), one fully qualified key per module (adapters.save_lora).

How each kind of tensor is carried (flags of `extract`/`compress`; defaults first):

    linear weights      low rank (lora_A / lora_B)
    embeddings          auto | lowrank (lora_embedding_A/B) | dense | skip    (auto: lowrank, or dense
                        when tied to lm_head; see TIED below)
    lm_head             lowrank (lora_A/B on lm_head) | dense | skip      (tied to the embeddings: the
                        shared matrix is counted and written once, on the embeddings; see TIED below)
    norms, other        dense | skip       dense = PEFT `modules_to_save` (the tuned values; PEFT applies
    parameters          them and merge_and_unload merges them). "Other" = any parameter that is not an
                        nn.Linear / nn.Embedding weight or a Linear bias (told apart on the model class).
    linear biases       dense | skip       dense = PEFT `bias="lora_only"`: the tuned bias of each LoRA
                        module is saved as `<module>.base_layer.bias`, which PEFT loads into the layer
                        (mergekit writes `lora_B.bias` without `lora_bias`, which PEFT silently drops).
                        A module whose weight delta is zero but whose bias changed goes to modules_to_save.

"dense" tensors are stored as absolute tuned values (that is what PEFT's modules_to_save/bias mean), so
`compress` needs the base checkpoint for them (found through the delta's manifest, or `base=`).

TIED embeddings (tie_word_embeddings=True: one matrix E is both the input embedding and lm_head). An
adapter must mean one model whether PEFT runs it unmerged, after merge_and_unload, or readapt merges it.
PEFT (0.21) cannot do that for a low-rank ΔE: an embedding LoRA alone adapts only the input side when
unmerged (lm_head keeps E), and with `ensure_weight_tying=True` (the same factors on lm_head) the
unmerged forward is right but merge_and_unload adds BA to the one shared tensor twice (PEFT issue #2777).
So `--embeddings lowrank` is refused on tied models, and `dense` (the default there, `auto`) writes the
changed rows R = {i : ΔE[i] ≠ 0} as PEFT trainable tokens: `trainable_token_indices` = R and
`<embed>.token_adapter.trainable_tokens_delta` = Θ[R] (tuned rows). PEFT ties lm_head to them and
merges them with index_copy (E[R] ← Θ[R]), which is idempotent, so the shared tensor is right however
many times it is merged: E′ = E with rows R replaced, on both sides, in all three ways.

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
"""

from __future__ import annotations

import datetime
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from readapt._version import __version__
from readapt.checkpoint import (Checkpoint, Pair, ReadOptions, is_delta_folder, output_folder, progress, recorded_name,
                                write_file)
from readapt.errors import ReadaptError
from readapt.numerics import is_finite, parse_device, parse_dtype

SVD_METHODS = ("auto", "exact", "gram", "randomized")
EMBEDDING_POLICIES = ("lowrank", "dense", "skip")
VECTOR_POLICIES = ("dense", "skip")
REPORT = "lore_report.json"
TAU_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))  # Figure 3's x axis
TAU_TOL = 1e-9  # v_k is a float64 sum: "v_k ≥ τ" is tested as v_k ≥ τ − 1e-9 so that τ=1 keeps what is there


# ---------------------------------------------------------------------------------------------------
# the rank rule and one factorization


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


@contextmanager
def _one_thread(device: torch.device, small: bool = True):
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
    with _one_thread(G.device, G.shape[0] <= SMALL_EIG):
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


def factorize(delta: torch.Tensor, *, tau: float | None = None, rank: int | None = None, svd: str = "auto",
              oversample: int | None = None, power_iters: int = 10, seed: int = 0) -> Factorization:
    """Optimal (exact) or near-optimal (gram, randomized) rank-k factors of a float32 matrix `delta`.

    The math runs on delta's device. τ picks k per matrix, `rank` fixes it (clamped to min(out, in) and to
    the numerical rank). An all-zero matrix gives rank 0 and no factors. Memory: Δ plus O(min(m,n)²).
    """
    check_rule(tau, rank)
    if svd not in SVD_METHODS:
        raise ReadaptError(f"--svd {svd!r}: choose one of {', '.join(SVD_METHODS)}")
    if svd == "auto":
        svd = "gram" if tau is not None else "randomized"
    if svd == "randomized" and tau is not None:
        raise ReadaptError("--svd randomized needs a fixed --rank: the τ rule needs every singular value "
                           "(use --svd gram or exact)")
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
        with _one_thread(G.device):  # small s×q products: thread hand-offs cost more than they save
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
        B, A = U[:, :k] * S[:k], Vh[:k].contiguous()
        return Factorization(B, A, k, energy, float(S[:k].double().square().sum()), S.cpu(), clamped)
    Uk = Q[:, :k]  # s×k: top-k singular vectors of the smaller side
    if m <= n:  # Δ = X: B = U_k, A = U_kᵀ Δ  (no division by small σ; BA = U_k U_kᵀ Δ)
        B, A = Uk.contiguous(), (Uk.T @ X).contiguous()
        kept = A.double().square().sum()
    else:  # Δ = Xᵀ: B = Δ U_k, A = U_kᵀ  (BA = Δ U_k U_kᵀ)
        B, A = (D @ Uk).contiguous(), Uk.T.contiguous()
        kept = B.double().square().sum()
    return Factorization(B, A, k, energy, float(kept), S.cpu() if svd == "gram" else None, clamped)


# ---------------------------------------------------------------------------------------------------
# which tensor is what (through the model class, on the meta device)


@dataclass
class Entry:
    """One tensor of the delta and how it is carried."""

    name: str
    kind: str  # linear | embedding | lm_head | bias | vector | tied | unknown | nonfloat
    module: str  # owning module path
    shape: tuple[int, ...]
    policy: str = "lowrank"  # lowrank | dense | skip
    tied: bool = False  # the input embedding of a model that ties lm_head to it
    rows: int = 0  # rows carried as PEFT trainable tokens (a tied embedding carried dense)
    rank: int = 0
    energy: float = 0.0
    kept: float = 0.0
    note: str = ""


def meta_model(config: dict):
    """The model class of `config` instantiated on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = (config or {}).get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ReadaptError(f"config.json has model_type {model_type!r}, which this transformers does not know: "
                           f"cannot tell linear layers from embeddings or write a PEFT adapter for it")
    from readapt.userfiles import config_errors

    with config_errors("the base model's config"), torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type].from_dict(config))


def classify(config: dict, names: Sequence[str], shapes: Callable[[str], tuple], floats: Callable[[str], bool]
             ) -> list[Entry]:
    """Tag every delta tensor: linear/lm_head weight, embedding, linear bias, other (norm) vector,
    the tied copy of the embeddings, or unknown to the model class."""
    from torch import nn

    model = meta_model(config)
    out_emb = model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and out_emb is not None and \
        out_emb.weight is model.get_input_embeddings().weight
    params = dict(model.named_parameters(remove_duplicate=False))
    in_emb = model.get_input_embeddings()
    entries = []
    for name in names:
        module, _, leaf = name.rpartition(".")
        shape = tuple(shapes(name))
        if not floats(name):
            entries.append(Entry(name, "nonfloat", module, shape, "skip", note="not a float tensor"))
            continue
        if name not in params:
            entries.append(Entry(name, "unknown", module, shape, "skip",
                                 note=f"not a parameter of {type(model).__name__}"))
            continue
        mod = model.get_submodule(module)
        if tied and mod is out_emb:
            entries.append(Entry(name, "tied", module, shape, "skip",
                                 note="tied to the input embeddings: carried once, by them"))
        elif isinstance(mod, nn.Embedding) and leaf == "weight":
            entries.append(Entry(name, "embedding", module, shape, tied=tied and mod is in_emb))
        elif isinstance(mod, nn.Linear) and leaf == "weight":
            entries.append(Entry(name, "lm_head" if mod is out_emb else "linear", module, shape))
        elif isinstance(mod, nn.Linear) and leaf == "bias":
            entries.append(Entry(name, "bias", module, shape, "dense"))
        else:
            entries.append(Entry(name, "vector", module, shape, "dense"))
    return entries


# ---------------------------------------------------------------------------------------------------
# the job: one streaming pass, delta -> factors -> adapter


@dataclass
class Policy:
    """How non-linear tensors are carried (see the module docstring)."""

    embeddings: str = "auto"
    lm_head: str = "lowrank"
    norms: str = "dense"
    biases: str = "dense"

    def check(self) -> None:
        for flag, value, allowed in (("--embeddings", self.embeddings, ("auto",) + EMBEDDING_POLICIES),
                                     ("--lm-head", self.lm_head, EMBEDDING_POLICIES),
                                     ("--norms", self.norms, VECTOR_POLICIES),
                                     ("--biases", self.biases, VECTOR_POLICIES)):
            if value not in allowed:
                raise ReadaptError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")

    def of(self, e: Entry) -> str:
        embeddings = ("dense" if e.tied else "lowrank") if self.embeddings == "auto" else self.embeddings
        return {"linear": "lowrank", "embedding": embeddings, "lm_head": self.lm_head,
                "vector": self.norms, "bias": self.biases}.get(e.kind, "skip")

    def apply(self, entries: list[Entry], adapter: bool = True) -> None:
        """Set each entry's policy; for an adapter (not a spectrum), refuse a low-rank tied embedding."""
        self.check()
        for e in entries:
            if e.policy != "skip":
                e.policy = self.of(e)
            if adapter and e.tied and e.policy == "lowrank":
                raise ReadaptError(
                    f"--embeddings lowrank: {e.module} is tied to lm_head, and PEFT cannot load a low-rank delta of "
                    f"a tied matrix as one model (unmerged it adapts the input side only; with ensure_weight_tying "
                    f"merge_and_unload adds it twice, PEFT issue #2777): use --embeddings dense (exact: the changed "
                    f"rows as PEFT trainable tokens, tied to lm_head) or --embeddings skip")


def _run(entries: list[Entry], delta_of: Callable[[str], torch.Tensor], tuned_of: Callable[[str], torch.Tensor],
         nbytes: Callable[[str], int], out: Path, *, tau, rank, svd, device, factor_dtype, base_model,
         provenance: dict, overwrite: bool, inputs: Sequence[Path], verify: bool, config: dict) -> dict:
    """Factor every low-rank tensor as it streams by, write the adapter, verify it the way PEFT loads it.

    Pass 1 (one delta tensor in memory at a time) yields the factors into the adapter file and records
    which dense tensors changed; pass 2 re-reads only those (norms, biases, dense embeddings) as tuned values.
    """
    from readapt.addends import PREFIX, save_lora

    dev = parse_device(device)
    embeddings: set[str] = set()  # modules written as lora_embedding_A/B
    clamped: list[str] = []
    dense: list[Entry] = []  # 'dense' tensors whose delta is nonzero
    rows: dict[str, torch.Tensor] = {}  # tied embeddings carried dense: the changed rows (trainable tokens)
    extra_config: dict = {}  # filled by extra(), read by save_lora once every tensor is written

    def factors() -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        todo = [e for e in entries if e.kind not in ("tied", "nonfloat", "unknown")]
        with progress(sum(nbytes(e.name) for e in todo), "lowrank") as bar:
            for e in todo:
                d = delta_of(e.name)  # float32 Δ, one tensor in memory
                if not is_finite(d):
                    raise ReadaptError(f"tensor {e.name!r} has NaN/Inf values in the delta (they come from the "
                                       f"inputs); nothing was written")
                bar.update(nbytes(e.name))
                if e.policy != "lowrank":
                    e.energy = energy_of(d)
                    if e.policy == "dense" and e.energy > 0:
                        e.kept, e.rank = e.energy, -1
                        dense.append(e)
                        if e.tied:
                            rows[e.name] = d.ne(0).any(dim=1).nonzero().view(-1)
                            e.rows = len(rows[e.name])
                    elif e.policy == "dense":
                        e.note = "unchanged: nothing to carry"
                    else:
                        e.note = "skipped by policy: its delta is lost"
                    continue
                f = factorize(d.to(dev), tau=tau, rank=rank, svd=svd)
                del d
                e.rank, e.energy, e.kept = f.rank, f.energy, f.kept
                if f.clamped:
                    clamped.append(e.name)
                if f.rank == 0:
                    e.note = "delta is all zero: skipped (rank 0)"
                    continue
                if e.kind == "embedding":
                    embeddings.add(e.module)
                yield e.module, f.B.to("cpu", factor_dtype), f.A.to("cpu", factor_dtype)

    def extra() -> Iterator[tuple[str, torch.Tensor]]:
        lora = {e.module for e in entries if e.policy == "lowrank" and e.rank > 0}
        to_save: list[str] = []
        for e in dense:
            if e.name in rows:  # PEFT trainable tokens: the tuned rows R, tied to lm_head by PEFT
                r = rows.pop(e.name)
                extra_config.setdefault("trainable_token_indices", {})[e.module] = r.tolist()
                e.note = (f"tied to lm_head: its {len(r)} changed rows carried as the tuned rows (PEFT "
                          f"trainable_token_indices, tied to lm_head)")
                yield f"{PREFIX}{e.module}.token_adapter.trainable_tokens_delta", tuned_of(e.name)[r]
            elif e.kind == "bias" and e.module in lora:
                extra_config["bias"] = "lora_only"  # PEFT loads <module>.base_layer.bias into the layer
                e.note = "carried as the tuned <module>.base_layer.bias (PEFT bias='lora_only')"
                yield f"{PREFIX}{e.module}.base_layer.bias", tuned_of(e.name)
            elif e.module not in to_save:
                to_save.append(e.module)
        for mod in to_save:  # PEFT modules_to_save: every parameter of the module, tuned values
            for e in entries:
                if e.module == mod and e.kind not in ("tied", "nonfloat", "unknown"):
                    if e.policy == "lowrank":
                        e.note = "weight unchanged, bias changed: module carried dense (modules_to_save)"
                    elif not e.note:
                        e.note = "carried dense (PEFT modules_to_save)"
                    yield f"{PREFIX}{e.name}", tuned_of(e.name)
        if to_save:
            extra_config["modules_to_save"] = to_save

    with output_folder(out, overwrite, inputs=inputs) as tmp:
        save_lora(tmp, factors(), base_model=base_model, extra_tensors=extra(), extra_config=extra_config,
                  embeddings=embeddings)
        if clamped:
            warnings.warn(f"--rank {rank} is above min(out, in) or the numerical rank of {len(clamped)} tensors "
                          f"({', '.join(clamped[:3])}{' ...' if len(clamped) > 3 else ''}): clamped to it",
                          stacklevel=3)
        if verify:
            verify_peft(tmp, config)
        report = _report(entries, tau=tau, rank=rank, svd=svd, provenance=provenance)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(report))
    return report


def extract_lowrank(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, *,
                    tau: float | None = None, rank: int | None = None, svd: str = "auto",
                    device: str | None = None, policy: Policy | None = None, dtype: str | None = None,
                    skip_missing: bool = False, overwrite: bool = False, allow_pickle: bool = False,
                    verify: bool = True, read: ReadOptions | None = None) -> dict:
    """LoRE-Adapter of TUNED − BASE in one streaming pass (no delta written): a PEFT LoRA at `out`.

    Per 2-D weight Δ = U S Vᵀ, keep k(τ) = min{k : Σ_{i≤k}σᵢ²/Σσⱼ² ≥ τ} (or k = rank) directions:
    B = U_k S_k, A = V_kᵀ, saved with scale 1. One base/tuned tensor pair in memory at a time.
    Returns the report (also written to `out/lore_report.json`).
    """
    check_rule(tau, rank)
    policy = policy or Policy()
    policy.check()
    pair = Pair.open(base, tuned, ReadOptions.of(read, allow_pickle), skip_missing=skip_missing)
    b, t = pair.base, pair.tuned
    config = _need_config(b.config, b.path)
    entries = classify(config, pair.names, b.shape, pair.floating)
    policy.apply(entries)
    provenance = {"base": recorded_name(base), "tuned": recorded_name(tuned), "skipped_missing": pair.skipped}

    return _run(entries, pair.delta, t.read, lambda n: b.infos[n].end - b.infos[n].start, Path(out), tau=tau,
                rank=rank, svd=svd, device=device, factor_dtype=parse_dtype(dtype) or torch.float32,
                base_model=recorded_name(base), provenance=provenance, overwrite=overwrite, inputs=[b.path, t.path],
                verify=verify, config=config)


def compress(delta_dir: str | os.PathLike, out: str | os.PathLike, *, tau: float | None = None,
             rank: int | None = None, svd: str = "auto", device: str | None = None, policy: Policy | None = None,
             base: str | os.PathLike | None = None, dtype: str | None = None, overwrite: bool = False,
             verify: bool = True, allow_pickle: bool = False, read: ReadOptions | None = None) -> dict:
    """LoRE-Adapter of a delta folder (readapt extract): a PEFT LoRA at `out` (same rule as extract_lowrank).

    Dense tensors (norms, biases, dense embeddings) are saved as tuned = base + Δ, so they need the base:
    `base`, else the base recorded in the delta's manifest; with --norms skip --biases skip none is needed.
    """
    from readapt.addends import DeltaFolder

    check_rule(tau, rank)
    policy = policy or Policy()
    policy.check()
    if not is_delta_folder(Path(delta_dir)):
        raise ReadaptError(f"{delta_dir} is not a delta folder (no readapt_delta.json); make one with "
                           f"`readapt extract BASE TUNED -o DELTA`, or pass BASE TUNED to `readapt extract --tau`")
    d = DeltaFolder(delta_dir)
    config = _need_config(d.config, d.path)
    entries = classify(config, d.ckpt.names, d.ckpt.shape, lambda n: d.ckpt.dtype(n).is_floating_point)
    policy.apply(entries)
    b = None
    inputs = [d.path]
    if any(e.policy == "dense" for e in entries):
        spec = base or (d.manifest.get("base") or {}).get("path")
        if spec is None or (base is None and not Path(spec).exists()):
            raise ReadaptError(f"norms/biases/dense embeddings are saved as tuned values (PEFT modules_to_save), "
                               f"which needs the base checkpoint; the one in {d.path}'s manifest ({spec}) is gone. "
                               f"Pass --base BASE, or --norms skip --biases skip (and no dense embeddings)")
        b = Checkpoint.open(spec, ReadOptions.of(read, allow_pickle))
        inputs.append(b.path)

    def tuned_of(n):
        base_t = b.read(n)
        return d.tuned(n, base_t).to(base_t.dtype)  # Θ = Φ + Δ (with the delta's recorded exceptions)

    return _run(entries, lambda n: d.ckpt.read(n).float(), tuned_of,
                lambda n: d.ckpt.infos[n].end - d.ckpt.infos[n].start, Path(out), tau=tau, rank=rank, svd=svd,
                device=device, factor_dtype=parse_dtype(dtype) or torch.float32,
                base_model=recorded_name(base) if base else (d.manifest.get("base") or {}).get("spec"),
                overwrite=overwrite, inputs=inputs,
                provenance={"delta": recorded_name(delta_dir), "base_for_dense": str(b.path.absolute()) if b else None},
                verify=verify, config=config)


def _need_config(config: dict | None, where: Path) -> dict:
    if not config:
        raise ReadaptError(f"{where} has no config.json (or the delta manifest no base_config): readapt needs the "
                           f"model config to tell linear layers from embeddings and to write a PEFT adapter")
    return config


# ---------------------------------------------------------------------------------------------------
# verification: load what was written the way PEFT does, refuse if anything would be ignored


def verify_peft(folder: Path, config: dict) -> None:
    """Inject the written adapter_config into the model class (meta device) with PEFT and load the
    written tensor names/shapes with PEFT's own `set_peft_model_state_dict`; raise if PEFT would ignore
    any tensor (unexpected key), misses any factor, or wraps another set of modules than was written."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    cfg = LoraConfig.from_pretrained(str(folder))
    model = meta_model(config)
    written = Checkpoint.open(folder)
    sd = {n: torch.empty(written.shape(n), dtype=written.dtype(n), device="meta") for n in written.names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel(model, cfg, low_cpu_mem_usage=True)
        try:
            result = set_peft_model_state_dict(pm, sd, low_cpu_mem_usage=True)
        except RuntimeError as err:  # size mismatch
            raise ReadaptError(f"PEFT cannot load the adapter just written to {folder}: {err}") from None
    if result.unexpected_keys:
        raise ReadaptError(f"PEFT would ignore {len(result.unexpected_keys)} tensors of the adapter written to "
                           f"{folder} ({', '.join(result.unexpected_keys[:3])}); this is a readapt bug, please report")
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    expected = set((cfg.rank_pattern or {}).keys())
    if wrapped != expected:
        raise ReadaptError(f"PEFT wraps {sorted(wrapped ^ expected)[:3]} differently from what was written to "
                           f"{folder}; this is a readapt bug, please report")
    missing = [k for k in result.missing_keys if ".lora_" in k and ".default" in k]
    if missing:
        raise ReadaptError(f"PEFT finds no value for {len(missing)} LoRA factors in {folder} ({missing[:3]})")


# ---------------------------------------------------------------------------------------------------
# reports


def _params(e: Entry) -> tuple[int, int]:
    """(parameters in the delta tensor, parameters the adapter spends on it)."""
    full = math.prod(e.shape)
    if e.policy == "dense" and e.rank == -1:
        return full, (e.rows * e.shape[1] if e.rows else full) if e.energy > 0 else 0
    if e.policy == "lowrank" and len(e.shape) == 2:
        return full, e.rank * sum(e.shape)
    return full, 0


def _report(entries: list[Entry], *, tau, rank, svd, provenance: dict, spectra: dict | None = None) -> dict:
    total_p = sum(_params(e)[0] for e in entries if e.kind not in ("tied", "nonfloat", "unknown"))
    kept_p = sum(_params(e)[1] for e in entries)
    energy = sum(e.energy for e in entries)
    kept_e = sum(e.kept for e in entries)
    by_kind: dict[str, dict] = {}
    for e in entries:
        k = by_kind.setdefault(e.kind, {"tensors": 0, "policy": e.policy, "params": 0, "params_kept": 0,
                                        "energy": 0.0, "energy_kept": 0.0})
        full, kept = _params(e)
        k["tensors"] += 1
        k["params"] += full if e.kind not in ("tied", "nonfloat", "unknown") else 0
        k["params_kept"] += kept
        k["energy"] += e.energy
        k["energy_kept"] += e.kept
    return {
        "format": "readapt-lore-report", "readapt_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rule": {"tau": tau} if tau is not None else {"rank": rank}, "svd": svd, "source": provenance,
        "params_delta": total_p, "params_kept": kept_p, "params_kept_share": kept_p / total_p if total_p else 0.0,
        "energy_delta": energy, "energy_kept_share": kept_e / energy if energy else 1.0,
        "relative_error": math.sqrt(max(energy - kept_e, 0.0) / energy) if energy else 0.0,
        "by_kind": by_kind,
        "tensors": [{**asdict(e), "shape": list(e.shape),
                     "retained": (e.kept / e.energy if e.energy else None)} for e in entries],
    }


def summary(report: dict) -> str:
    """A one-screen text summary of a LoRE report."""
    rule = report["rule"]
    head = f"τ={rule['tau']:g}" if "tau" in rule else f"rank {rule['rank']}"
    lines = [f"{head} keeps {100 * report['params_kept_share']:.1f}% of the delta's parameters "
             f"({report['params_kept']:,} of {report['params_delta']:,}) and "
             f"{100 * report['energy_kept_share']:.1f}% of its energy ‖Δ‖² "
             f"(relative error ‖Δ−BA‖/‖Δ‖ = {report['relative_error']:.4f})",
             f"{'kind':<10} {'tensors':>7} {'policy':>8} {'params kept':>12} {'energy kept':>12}"]
    for kind, k in report["by_kind"].items():
        pk = f"{100 * k['params_kept'] / k['params']:.1f}%" if k["params"] else "-"
        ek = f"{100 * k['energy_kept'] / k['energy']:.1f}%" if k["energy"] else "-"
        lines.append(f"{kind:<10} {k['tensors']:>7} {k['policy']:>8} {pk:>12} {ek:>12}")
    ranks = [t["rank"] for t in report["tensors"] if t["policy"] == "lowrank" and t["rank"] >= 0]
    if ranks:
        lines.append(f"ranks: min {min(ranks)}, median {sorted(ranks)[len(ranks) // 2]}, max {max(ranks)}; "
                     f"rank-0 (all-zero) tensors skipped: {sum(r == 0 for r in ranks)}")
    notes = [t for t in report["tensors"] if t["note"] and t["kind"] in ("tied", "unknown")]
    for t in notes[:5]:
        lines.append(f"note: {t['name']}: {t['note']}")
    return "\n".join(lines)


def _card(report: dict) -> str:
    rule = report["rule"]
    rule_text = (f"k(τ) = min{{k : Σ_{{i≤k}} σᵢ² / Σ σⱼ² ≥ {rule['tau']:g}}}" if "tau" in rule
                 else f"k = {rule['rank']} (clamped to each matrix's rank)")
    return f"""---
library_name: peft
tags: [readapt, lore-adapter, lora]
---
# LoRE-Adapter (low-rank RE-Adapter)

Made by readapt {report['readapt_version']} on {report['created']} from {json.dumps(report['source'])}.
Per 2-D weight Δ = U S Vᵀ: {rule_text}; B = U_k S_k, A = V_kᵀ (SVD: {report['svd']}), scale 1
(rank_pattern = alpha_pattern).

    {summary(report).replace(chr(10), chr(10) + '    ')}

Load with `peft.PeftModel.from_pretrained(base_model, THIS_FOLDER)`, or merge with any scale:
`readapt merge BASE --add THIS_FOLDER:0.5 -o OUT`. Per-tensor ranks and energies: `{REPORT}`.
"""


# ---------------------------------------------------------------------------------------------------
# spectrum report


def spectrum(source: str | os.PathLike, tuned: str | os.PathLike | None, out: str | os.PathLike, *,
             tau: float = 0.5, svd: str = "gram", device: str | None = None, policy: Policy | None = None,
             layers: Sequence[int] | None = None, skip_missing: bool = False, overwrite: bool = False,
             allow_pickle: bool = False, read: ReadOptions | None = None) -> dict:
    """Singular-value spectrum of every 2-D delta tensor (delta folder, or TUNED − BASE) → report at `out`:

    spectrum.json (per tensor: shape, ‖Δ‖², k(τ), v_k, parameters kept k·(m+n); whole model at each τ of
    TAU_GRID), spectrum.safetensors (σ per tensor), figure2.png (v_k against k for chosen layers, like
    the paper's Figure 2), figure3.png (share of the delta's parameters kept against τ, Figure 3).
    Returns the report; `summary(report)` is the terminal view.
    """
    from readapt.addends import DeltaFolder

    if not (isinstance(tau, (int, float)) and 0 < tau <= 1):
        raise ReadaptError(f"--tau {tau!r} is outside (0, 1]")
    if svd not in ("exact", "gram", "auto"):
        raise ReadaptError(f"--svd {svd!r}: the spectrum needs every singular value: use gram or exact")
    svd = "gram" if svd == "auto" else svd
    policy = policy or Policy()
    policy.check()
    dev = parse_device(device)
    if tuned is None:
        if not is_delta_folder(Path(source)):
            raise ReadaptError(f"{source} is not a delta folder: give a delta folder, or BASE and TUNED")
        d = DeltaFolder(source)
        config, ckpt, inputs = _need_config(d.config, d.path), d.ckpt, [d.path]
        names = d.ckpt.names
        floats = lambda n: ckpt.dtype(n).is_floating_point  # noqa: E731
        delta_of = lambda n: ckpt.read(n).float()  # noqa: E731
        provenance = {"delta": recorded_name(source)}
    else:
        pair = Pair.open(source, tuned, ReadOptions.of(read, allow_pickle), skip_missing=skip_missing)
        b, names = pair.base, pair.names
        config, ckpt, inputs = _need_config(b.config, b.path), b, [b.path, pair.tuned.path]
        floats, delta_of = pair.floating, pair.delta
        provenance = {"base": recorded_name(source), "tuned": recorded_name(tuned)}
    entries = classify(config, names, ckpt.shape, floats)
    depths = sorted({ly for e in entries if (ly := _layer_of(e.name)) is not None})
    missing = [ly for ly in layers or () if ly not in depths]
    if missing:
        have = ("not numbered" if not depths else f"{depths[0]} to {depths[-1]}"
                if depths == list(range(depths[0], depths[-1] + 1)) else ", ".join(map(str, depths)))
        raise ReadaptError(f"--layers {','.join(map(str, missing))}: no such layer; this model's layers are {have}")
    policy.apply(entries, adapter=False)
    spectra: dict[str, torch.Tensor] = {}
    with progress(sum(ckpt.infos[e.name].end - ckpt.infos[e.name].start for e in entries if e.policy != "skip"),
                  "spectrum") as bar:
        for e in entries:
            if e.policy == "skip":
                continue
            D = delta_of(e.name)
            if not is_finite(D):
                raise ReadaptError(f"tensor {e.name!r} has NaN/Inf values in the delta (in the inputs)")
            e.energy = energy_of(D)
            if e.policy == "dense":
                e.kept, e.rank = e.energy, -1
                e.rows = int(D.ne(0).any(dim=1).sum()) if e.tied else 0  # as extract carries it
            else:
                D = D.to(dev)
                X = D if D.shape[0] <= D.shape[1] else D.T
                S = (torch.linalg.svdvals(X) if svd == "exact"
                     else gram_eig(X @ X.T, vectors=False).clamp_min(0).sqrt()).cpu()
                spectra[e.name] = S
                e.rank = rank_at(S, tau)
                e.kept = float(S[:e.rank].double().square().sum())
                if e.rank == 0:
                    e.note = "delta is all zero: rank 0"
            bar.update(ckpt.infos[e.name].end - ckpt.infos[e.name].start)
    report = _report(entries, tau=tau, rank=None, svd=svd, provenance=provenance)
    grid = []
    for g in sorted(set(TAU_GRID) | {tau}):
        kept = sum(_params(e)[1] if e.policy != "lowrank" else (rank_at(spectra[e.name], g) * sum(e.shape)
                   if e.name in spectra else 0) for e in entries)
        grid.append({"tau": g, "params_kept_share": kept / report["params_delta"] if report["params_delta"] else 0})
    report["tau_grid"] = grid
    with output_folder(out, overwrite, inputs=inputs) as tmp:
        write_file(tmp / "spectrum.safetensors", ((n, s.contiguous()) for n, s in spectra.items()),
                   metadata={"readapt": "spectrum"})
        (tmp / "spectrum.json").write_text(json.dumps(report, indent=2) + "\n")
        _plot(tmp, entries, spectra, report, tau, layers)
        (tmp / "README.md").write_text(
            f"# Spectrum of a RE-Adapter (readapt {__version__})\n\nSource: {json.dumps(provenance)}; SVD: {svd}.\n\n"
            f"    {summary(report).replace(chr(10), chr(10) + '    ')}\n\n"
            f"- `spectrum.json`: per tensor k(τ), retained energy v_k, parameters kept k·(m+n); `tau_grid`: the "
            f"whole model's share of parameters kept at each τ\n- `spectrum.safetensors`: σ of every tensor\n"
            f"- `figure2.png`: v_k against k (cf. RE-Adapt Figure 2); `figure3.png`: parameters kept against τ "
            f"(cf. Figure 3)\n")
    return report


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    return None


def _plot(folder: Path, entries: list[Entry], spectra: dict, report: dict, tau: float,
          layers: Sequence[int] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # Figure 2: cumulative explained variance v_k against k, one panel per module type, a few depths
    with_layer = [(e, _layer_of(e.name)) for e in entries if e.name in spectra]
    depths = sorted({ly for _, ly in with_layer if ly is not None})
    if layers is None and depths:
        layers = sorted({depths[0], depths[len(depths) // 2], depths[-1]})
    types = []
    for e, ly in with_layer:
        t = e.name.rsplit(".", 2)[-2] if ly is not None else e.kind
        if t not in types:
            types.append(t)
    cols = min(4, max(1, len(types)))
    rows = max(1, math.ceil(len(types) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, t in zip(axes.flat, types):
        for e, ly in with_layer:
            if (e.name.rsplit(".", 2)[-2] if ly is not None else e.kind) != t:
                continue
            if ly is not None and layers is not None and ly not in layers:
                continue
            v = explained(spectra[e.name]).numpy()
            ax.plot(range(1, len(v) + 1), v, label=f"layer {ly}" if ly is not None else e.kind)
        ax.axhline(tau, color="grey", ls="--", lw=0.8)
        ax.set_title(t)
        ax.set_xlabel("rank k")
        ax.set_ylabel("explained variance v_k")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    fig.suptitle("Cumulative explained variance of Δ = U S Vᵀ (cf. RE-Adapt Figure 2)")
    fig.tight_layout()
    fig.savefig(folder / "figure2.png", dpi=120)
    plt.close(fig)
    # Figure 3: share of the delta's parameters kept against τ
    fig, ax = plt.subplots(figsize=(5, 3.5))
    g = report["tau_grid"]
    ax.plot([p["tau"] for p in g], [100 * p["params_kept_share"] for p in g], marker="o")
    ax.axvline(tau, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("τ (explained variance kept per layer)")
    ax.set_ylabel("% of the delta's parameters kept")
    ax.set_title("LoRE-Adapter size against τ (cf. RE-Adapt Figure 3)")
    fig.tight_layout()
    fig.savefig(folder / "figure3.png", dpi=120)
    plt.close(fig)
