"""LoRE-Adapt's plan and account for every delta tensor: which tensor is what (read off the model class),
how each kind is carried (Policy), and the report of what was kept.

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
"""

from __future__ import annotations

import datetime
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from readapt._version import __version__
from readapt.errors import ReadaptError
from readapt.userfiles import config_errors

EMBEDDING_POLICIES = ("lowrank", "dense", "skip")
VECTOR_POLICIES = ("dense", "skip")


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
    residual: float | None = None  # ‖Δ − BA‖² where measured (else energy − kept: see factorize.residual_of)
    note: str = ""


def meta_model(config: dict):
    """The model class of `config` instantiated on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = (config or {}).get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ReadaptError(f"config.json has model_type {model_type!r}, which this transformers does not know: "
                           f"cannot tell linear layers from embeddings or write a PEFT adapter for it")
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


def need_config(config: dict | None, where: Path) -> dict:
    if not config:
        raise ReadaptError(f"{where} has no config.json (or the delta manifest no base_config): readapt needs the "
                           f"model config to tell linear layers from embeddings and to write a PEFT adapter")
    return config


def params(e: Entry) -> tuple[int, int]:
    """(parameters in the delta tensor, parameters the adapter spends on it)."""
    full = math.prod(e.shape)
    if e.policy == "dense" and e.rank == -1:
        return full, (e.rows * e.shape[1] if e.rows else full) if e.energy > 0 else 0
    if e.policy == "lowrank" and len(e.shape) == 2:
        return full, e.rank * sum(e.shape)
    return full, 0


def _lost(e: Entry) -> float:
    """‖Δ − BA‖² of a tensor: measured where the factorization measured it, else energy − kept."""
    return e.residual if e.residual is not None else max(e.energy - e.kept, 0.0)


def lore_report(entries: list[Entry], *, tau, rank, svd, provenance: dict) -> dict:
    """The LoRE report (lore_report.json, spectrum.json): parameters and energy kept, overall, per kind and
    per tensor; the relative error of a tensor is ‖Δ − BA‖/‖Δ‖, from the residual the factorization
    measured, else sqrt(1 − kept/energy) (BA an orthogonal projection of Δ: ‖Δ − BA‖² = ‖Δ‖² − ‖BA‖²)."""
    total_p = sum(params(e)[0] for e in entries if e.kind not in ("tied", "nonfloat", "unknown"))
    kept_p = sum(params(e)[1] for e in entries)
    energy = sum(e.energy for e in entries)
    kept_e = sum(e.kept for e in entries)
    lost = sum(_lost(e) for e in entries)
    by_kind: dict[str, dict] = {}
    for e in entries:
        k = by_kind.setdefault(e.kind, {"tensors": 0, "policy": e.policy, "params": 0, "params_kept": 0,
                                        "energy": 0.0, "energy_kept": 0.0})
        full, kept = params(e)
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
        "relative_error": math.sqrt(lost / energy) if energy else 0.0,
        "by_kind": by_kind,
        "tensors": [{**asdict(e), "shape": list(e.shape), "retained": (e.kept / e.energy if e.energy else None),
                     "relative_error": math.sqrt(_lost(e) / e.energy) if e.energy else None}
                    for e in entries],
    }
