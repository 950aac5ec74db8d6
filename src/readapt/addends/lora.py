"""PEFT LoRA adapter folders (DoRA as a variant of LoRA): their weight-space difference per base tensor,
and writing them.

Reading (what `merge` and `port` add to a base):

    LoRA   Ψ[W] = s · B A                (s = alpha/r, or alpha/√r with rsLoRA; B: out×r, A: r×in)
           (embedding: lora_embedding_A r×vocab, lora_embedding_B dim×r, Ψ = s · (B A)ᵀ: vocab×dim)
           (fan_in_fan_out layers store Wᵀ, so Ψ = s · (B A)ᵀ)
    DoRA   Ψ[W] = W′ − W,  W′ = m ⊙ (W + sBA) / ‖W + sBA‖    (norm per output row; per column for
           embeddings), computed in float32 exactly as PEFT's merge does, so α·Ψ with α=1 gives PEFT's
           merge_and_unload and α=0 gives W.  Liu et al. 2024, "DoRA", eq. 5.
           As in PEFT (its `LoraVariant`), DoRA is a variant object of the LoRA adapter (`DoraVariant`):
           it checks the magnitudes and defines the full weight W′; everything else is LoRA's.
    lora_bias / modules_to_save tensors: their difference from the base tensor.
    In blocks of rows (`rows`, what merge, load_merged and port use): Ψ[rows] = s·B[rows]·A, bit for bit the
           rows of the whole product (the same dot product over the rank per element; checkpoint.row_spans);
           DoRA's W′ rows with the norm of each output row (bit for bit), or for an embedding the norm of
           each dimension over the vocabulary summed in float64 over the blocks (`DoraVariant.stored_norm`).
    trainable tokens (`trainable_token_indices` R, `<module>.token_adapter.trainable_tokens_delta` = the new
           rows V): W′ = W with W′[R] = V (PEFT's index_copy), Ψ = W′ − W.

Tied embeddings: PEFT saves, for an adapter made with `ensure_weight_tying=True`, a copy of the embedding
LoRA on lm_head (lora_A = lora_embedding_Bᵀ, lora_B = lora_embedding_Aᵀ). Unmerged, PEFT applies the one
ΔE to both sides of the shared matrix, so on a base that stores no lm_head (it is the embedding) that
copy is the same tensor's same delta: `drop_tied_copies` drops it and merge adds ΔE once. (PEFT's own
merge_and_unload adds it twice, PEFT issue #2777.)

The per-module r and alpha honour `rank_pattern` / `alpha_pattern` with PEFT's own matcher
(`peft.utils.other.get_pattern_key`), so a key means here exactly what it means to PEFT.
Copies of the base layers that PEFT stores next to embedding adapters (`*.base_layer.weight`, saved
when embeddings are targeted) are not part of the patch: they are checked for shape and ignored.

Writing (`save_lora`): a LoRA folder whose `rank_pattern` and `alpha_pattern` carry one fully qualified
key per module (PEFT matches `(.*\\.)?key$` and takes the first hit, so short keys like `layers.1.q_proj`
would also catch `layers.11.q_proj`), with alpha = r so that the scale is 1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from readapt.addends.base import Addend, Kind
from readapt.addends.variants import DoraVariant, LoraTerm, LoraVariant
from readapt.checkpoint import Checkpoint, ReadOptions, TensorInfo, is_peft_folder, read_rows, write_file
from readapt.errors import ReadaptError
from readapt.userfiles import BOOL, NUMBER, OBJECT, POSITIVE_INT, STRING, check_fields, load, one_of

PREFIX = "base_model.model."
_TOKENS = "token_adapter.trainable_tokens_delta"
_FACTOR = re.compile(
    r"^(?P<mod>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector|base_layer\.weight|base_layer\.bias|modules_to_save\.[^.]+\.(?:weight|bias)|"
    r"token_adapter\.trainable_tokens_delta|weight|bias)$"
)


@dataclass
class _Module:
    """The saved pieces of one adapted module (tensor names in the adapter file)."""

    name: str
    parts: dict[str, str] = field(default_factory=dict)


def read_adapter_config(file: Path) -> dict:
    """adapter_config.json, checked once: the fields readapt reads have PEFT's types (r > 0, finite
    lora_alpha, rank_pattern/alpha_pattern keys that compile as PEFT uses them: `(.*\\.)?(KEY)$`)."""
    config = check_fields(load(file), file, {
        "peft_type": STRING, "r": POSITIVE_INT, "lora_alpha": NUMBER, "rank_pattern": OBJECT,
        "alpha_pattern": OBJECT, "use_rslora": BOOL, "use_dora": BOOL, "fan_in_fan_out": BOOL,
        "bias": one_of("none", "all", "lora_only"), "base_model_name_or_path": STRING, "auto_mapping": OBJECT,
    }, required=("r", "lora_alpha"))
    for name, values in (("rank_pattern", POSITIVE_INT), ("alpha_pattern", NUMBER)):
        for key, value in (config.get(name) or {}).items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as err:
                raise ReadaptError(f"{file}: {name} key {key!r} is not a valid regular expression ({err})") from None
            check_fields({key: value}, f"{file} ({name})", {key: values})
    check_fields(config.get("auto_mapping") or {}, f"{file} (auto_mapping)", {"base_model_class": STRING})
    return config


class LoraAdapter(Addend):
    """A PEFT LoRA adapter folder (plain, or with the DoRA variant) as a source of Ψ[name] for a base."""

    kind = Kind.LORA

    def __init__(self, folder: str | Path, label: str | None = None, read: ReadOptions | None = None):
        self.path = Path(folder)
        self.label = label or str(folder)
        cfg_file = self.path / "adapter_config.json"
        self.config = read_adapter_config(cfg_file)
        if self.config.get("peft_type", "LORA") != "LORA":
            raise ReadaptError(f"{cfg_file}: peft_type {self.config.get('peft_type')!r} is not supported "
                               f"(readapt reads LoRA and DoRA adapters)")
        self.variant = DoraVariant if self.config.get("use_dora") else LoraVariant
        self._kept_for, self._kept = None, {}  # what `rows` reuses across the blocks of one tensor (`kept`)
        self.ckpt = Checkpoint.open(self.path, read)  # adapter_model.safetensors (or .bin, if allowed)
        self.modules: dict[str, _Module] = {}  # base tensor name -> pieces
        for key in self.ckpt.names:
            rest = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = _FACTOR.match(rest)
            if m is None:
                raise ReadaptError(f"{self.path}: cannot interpret adapter tensor {key!r} (not a LoRA factor)")
            mod, part = m.group("mod"), m.group("part")
            target = mod + (".bias" if part.endswith("bias") else ".weight")
            if part in ("weight", "bias"):  # a modules_to_save copy saved under the plain name
                mod, target = rest.rsplit(".", 1)[0], rest
            self.modules.setdefault(target, _Module(mod)).parts[part] = key
        self._check_parts()

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return is_peft_folder(folder)

    @classmethod
    def open_for(cls, spec, folder: Path, base: Checkpoint, *, read: ReadOptions, skip_missing: bool) -> Addend:
        addend = cls(folder, label=str(spec), read=read)
        addend.drop_tied_copies(base.infos)  # PEFT's ensure_weight_tying copy: the embedding's own delta
        return addend

    def _check_parts(self) -> None:
        """Refuse a half-present adapter, which would merge silently as something else: lora_A without
        lora_B (or the reverse; the same for embeddings), lora_B.bias without the module's factors; the
        variant checks the DoRA magnitudes."""
        for target, mod in self.modules.items():
            p, where = mod.parts, f"{self.path}: module {mod.name}"
            for a, b in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
                if (a in p) != (b in p):
                    have, lack = (a, b) if a in p else (b, a)
                    raise ReadaptError(f"{where} has {have} but no {lack}: the adapter is incomplete")
            weight = self.modules.get(target.removesuffix("bias") + "weight") if target.endswith(".bias") else None
            if "lora_B.bias" in p and (weight is None or "lora_A.weight" not in weight.parts):
                raise ReadaptError(f"{where} has lora_B.bias but no lora_A/lora_B weights: the adapter is incomplete")
            self.variant.check(where, p, "lora_A.weight" in p or "lora_embedding_A" in p)

    # -- per-module rank, alpha and scale ------------------------------------------------------------

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, alpha) of `module`, from rank_pattern/alpha_pattern matched as PEFT matches them."""
        c = self.config
        rp, ap = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
        if rp or ap:  # importing peft costs ~120 MB of RSS: only when there are patterns to match
            from peft.utils.other import get_pattern_key
        r = rp.get(get_pattern_key(rp.keys(), module), c["r"]) if rp else c["r"]
        alpha = ap.get(get_pattern_key(ap.keys(), module), c["lora_alpha"]) if ap else c["lora_alpha"]
        return r, alpha

    def scale(self, module: str, rank: int) -> float:
        """s = alpha / r (alpha / √r with use_rslora), r and alpha from rank_pattern/alpha_pattern."""
        r, alpha = self.rank_alpha(module)
        if r != rank:
            raise ReadaptError(f"{self.path}: module {module} has rank {rank} factors but adapter_config.json "
                               f"gives it r={r} (rank_pattern); the adapter is inconsistent")
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    # -- the addend -------------------------------------------------------------------------------------

    def made_on(self) -> tuple[str | None, str | None]:
        return self.config.get("base_model_name_or_path"), (self.config.get("auto_mapping") or {}).get(
            "base_model_class")

    def targets(self) -> dict[str, tuple[int, ...] | None]:
        """Base tensor name -> the shape the adapter expects it to have (None: not known from files)."""
        out: dict[str, tuple[int, ...] | None] = {}
        for target, mod in self.modules.items():
            p, shape = mod.parts, None
            if "lora_A.weight" in p and "lora_B.weight" in p:
                a, b = self.ckpt.shape(p["lora_A.weight"]), self.ckpt.shape(p["lora_B.weight"])
                shape = (a[1], b[0]) if self.config.get("fan_in_fan_out") else (b[0], a[1])
            elif "lora_embedding_A" in p:
                shape = (self.ckpt.shape(p["lora_embedding_A"])[1], self.ckpt.shape(p["lora_embedding_B"])[0])
            elif _TOKENS in p:
                shape = None  # rows R of a matrix whose row count the adapter does not record
            else:
                full = [k for part, k in p.items() if part.startswith(("base_layer", "modules_to_save")) or
                        part in ("weight", "bias")]
                if full:
                    shape = self.ckpt.shape(full[0])
                elif "lora_B.bias" in p:
                    shape = self.ckpt.shape(p["lora_B.bias"])
            out[target] = shape
        return out

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """Ψ[name] in float32 for the float32 base tensor `base` (None if the adapter leaves it alone)."""
        target = self.target(name, base)
        return target.sub_(base) if target is not None else self._lora(name)

    def target(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """The full weight this adapter gives `name` where it defines one (trainable tokens, modules_to_save,
        the variant's: DoRA's W′); None for plain LoRA terms, whose merge is base + s·B·A."""
        mod = self.modules.get(name)
        if mod is None:
            return None
        if _TOKENS in mod.parts:
            return self._tokens(name, mod, base)
        saved = self._saved(mod)
        if saved is not None:  # a full replacement tensor
            return self.ckpt.read(mod.parts[saved]).float()
        return self.variant.target(self, name, mod, base)

    def rows(self, name: str, W: torch.Tensor, r0: int, base: TensorInfo | torch.Tensor
             ) -> tuple[torch.Tensor | None, bool]:
        """Rows r0 … r0 + len(W) of what `target` / `delta` give for `name`, from the factors: s·B[rows]·A,
        DoRA's W′ rows, a saved full tensor's rows, trainable tokens in those rows; (None, False) if the
        adapter leaves `name` alone. 2-D tensors (1-D ones, biases, are merged whole)."""
        mod = self.modules.get(name)
        if mod is None:
            return None, False
        r1 = r0 + len(W)
        if _TOKENS in mod.parts:
            return self._tokens(name, mod, W, r0, base.shape[0]), True
        saved = self._saved(mod)
        if saved is not None:
            return read_rows(self.ckpt.stored(mod.parts[saved]), r0, r1).float(), True
        target = self.variant.target_rows(self, name, mod, W, r0, base)
        if target is not None:
            return target, True
        term = self.kept(name, "term", lambda: self.term(name))
        return (None if term is None else term.rows(r0, r1)), False

    def kept(self, name: str, key: str, make: Callable[[], object]):
        """make(), computed once for the base tensor `name` and kept while its blocks are merged (factors,
        DoRA's m and norms: small next to the tensor); the first call for another tensor drops them."""
        if self._kept_for != name:
            self._kept_for, self._kept = name, {}
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    def _saved(self, mod: _Module) -> str | None:
        """The part of `mod` that is a full replacement tensor (modules_to_save; base_layer.bias with
        bias="lora_only"/"all", which PEFT loads), or None."""
        return next((k for k in mod.parts if k.startswith("modules_to_save") or k in ("weight", "bias")
                     or (k == "base_layer.bias" and self.config.get("bias", "none") != "none")), None)

    def factored(self, name: str) -> bool:
        """Whether Ψ[name] is a plain LoRA term s·B·A, so that a sum of such terms can stay factored (a fold):
        factors, and no full weight (trainable tokens, a saved tensor, the DoRA variant's W′)."""
        mod = self.modules.get(name)
        p = mod.parts if mod is not None else {}
        return (self.variant is LoraVariant and ("lora_A.weight" in p or "lora_embedding_A" in p)
                and _TOKENS not in p and self._saved(mod) is None)

    def _tokens(self, name: str, mod: _Module, W: torch.Tensor, r0: int = 0, total: int | None = None
                ) -> torch.Tensor:
        """W′ = W with rows R replaced by the saved values (PEFT's TrainableTokensLayer merge). W: the whole
        tensor, or its rows r0 … r0 + len(W) of `total`."""
        spec = self.config.get("trainable_token_indices")
        if isinstance(spec, dict):  # {layer name: R}: PEFT matches the module by name or name suffix
            spec = next((v for k, v in spec.items() if mod.name == k or mod.name.endswith("." + k)), None)
        values = self.ckpt.read(mod.parts[_TOKENS])
        if not isinstance(spec, list) or len(spec) != values.shape[0]:
            raise ReadaptError(f"{self.path}: {mod.name} has {values.shape[0]} trainable-token rows but "
                               f"adapter_config.json's trainable_token_indices gives it {spec!r:.60}")
        rows, total = torch.tensor(spec, dtype=torch.long), len(W) if total is None else total
        if len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < total):
            raise ReadaptError(f"{self.path}: trainable_token_indices of {mod.name} reach row {int(rows.max())}, "
                               f"but the base's {name} has {total} rows: it was made for another base")
        here = (rows >= r0) & (rows < r0 + len(W))
        return W.clone().index_copy_(0, rows[here] - r0, values[here].to(W.dtype))

    def drop_tied_copies(self, stored: Container[str]) -> list[str]:
        """Drop the Linear LoRA modules that are PEFT's tied copy of an embedding LoRA of this adapter
        (lora_A = lora_embedding_Bᵀ, lora_B = lora_embedding_Aᵀ, exactly) on a tensor the base does not
        store (`stored`: the base's tensor names): the base ties it to that embedding, whose delta already
        covers it. Returns their tensor names."""
        embeddings = [m.parts for m in self.modules.values() if "lora_embedding_A" in m.parts]
        found = []
        for target, mod in self.modules.items():
            p = mod.parts
            if target in stored or "lora_A.weight" not in p or not embeddings:
                continue
            A, B = self.ckpt.read(p["lora_A.weight"]), self.ckpt.read(p["lora_B.weight"])
            for e in embeddings:
                eA, eB = self.ckpt.read(e["lora_embedding_A"]), self.ckpt.read(e["lora_embedding_B"])
                if A.shape == eB.T.shape and B.shape == eA.T.shape and torch.equal(A, eB.T) and torch.equal(B, eA.T):
                    found.append(target)
                    break
        for target in found:
            del self.modules[target]
        return found

    def term(self, name: str) -> LoraTerm | None:
        """The factors of the LoRA term on the weight `name` (a Linear or an embedding), None if it has none."""
        mod = self.modules.get(name)
        p = mod.parts if mod is not None else {}
        if "lora_A.weight" in p:
            A, B = self.ckpt.read(p["lora_A.weight"]).float(), self.ckpt.read(p["lora_B.weight"]).float()
            return LoraTerm(B, A, self.scale(mod.name, A.shape[0]), bool(self.config.get("fan_in_fan_out")))
        if "lora_embedding_A" in p:  # A: r×vocab, B: dim×r
            A, B = self.ckpt.read(p["lora_embedding_A"]).float(), self.ckpt.read(p["lora_embedding_B"]).float()
            return LoraTerm(B, A, self.scale(mod.name, A.shape[0]), transposed=True)
        return None

    def _lora(self, name: str) -> torch.Tensor | None:
        """s·B·A for `name` (out×in; vocab×dim for embeddings), or s·b for a lora_B.bias."""
        mod = self.modules[name]
        if "lora_B.bias" in mod.parts and name.endswith(".bias"):
            a_key = self.modules[name[: -len("bias")] + "weight"].parts["lora_A.weight"]
            return self.ckpt.read(mod.parts["lora_B.bias"]).float().mul_(self.scale(mod.name, self.ckpt.shape(a_key)[0]))
        term = self.term(name)
        return None if term is None else term.delta()  # None: only a base_layer copy, not part of the patch


def save_lora(folder: Path, factors: Iterable[tuple[str, torch.Tensor, torch.Tensor]], *,
              base_model: str | None, extra_config: Mapping | None = None,
              extra_tensors: Iterable[tuple[str, torch.Tensor]] = (), embeddings: Container[str] = ()) -> dict:
    """Write a PEFT LoRA adapter with scale 1 per module: Ψ[module.weight] = B A.

    Modules in `embeddings` (nn.Embedding, Δ: vocab×dim = B A) are written as PEFT's
    lora_embedding_A = Bᵀ (k×vocab), lora_embedding_B = Aᵀ (dim×k), for which PEFT's Ψ = (B_e A_e)ᵀ = B A.

    factors: (module name e.g. "model.layers.0.self_attn.q_proj", B: out×k, A: k×in); each rank k
    goes into rank_pattern and alpha_pattern under the module's fully qualified name. Streams: one
    factor pair in memory at a time. Returns the adapter_config written.
    """
    ranks: dict[str, int] = {}

    def tensors():
        for mod, B, A in factors:
            ranks[mod] = A.shape[0]
            if mod in embeddings:
                yield f"{PREFIX}{mod}.lora_embedding_A", B.T.contiguous()
                yield f"{PREFIX}{mod}.lora_embedding_B", A.T.contiguous()
                continue
            yield f"{PREFIX}{mod}.lora_A.weight", A.contiguous()
            yield f"{PREFIX}{mod}.lora_B.weight", B.contiguous()
        yield from extra_tensors

    write_file(folder / "adapter_model.safetensors", tensors())
    if not ranks:
        raise ReadaptError("no module has a nonzero factor: there is nothing to write as an adapter")
    r = max(ranks.values())
    revision = None
    if base_model and "@" in base_model and not Path(base_model).expanduser().exists():
        base_model, _, revision = base_model.partition("@")  # a model id with a revision: PEFT keeps them apart
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": revision,
        "r": r, "lora_alpha": r, "rank_pattern": dict(ranks), "alpha_pattern": dict(ranks),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None,
        **(extra_config or {}),
    }
    # target_modules as an exact regex over the written modules, so nothing else is wrapped
    config["target_modules"] = "^(" + "|".join(re.escape(m) for m in ranks) + ")$"
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
