"""Writing a ported patch for the new base: the retargeted PEFT adapter and the ported delta folder.

    write_peft(folder, adapter, items, new, old, to)   tensors under the new module names, vocabulary rows
                                                      remapped, DoRA magnitudes rescaled, modules_to_save
                                                      copies rebuilt on the new tensors; config retargeted
    write_delta(folder, ported, report, max_shard)    Δ under the new names, with a manifest of its origin

DoRA (Liu et al. 2024) magnitudes m were learned for the old W (DoRA starts m at ‖W_old‖), so the port
carries the learned ratio: m′ = m ⊙ ‖W_new‖ / ‖W_old‖ when the old base is known, m verbatim otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from readapt._version import __version__
from readapt.addends import PREFIX, DoraVariant, LoraAdapter, PortedDelta
from readapt.checkpoint import DELTA_MANIFEST, Checkpoint, write_file, write_tensors
from readapt.errors import ReadaptError
from readapt.numerics import is_finite
from readapt.portmap import Item, remap_rows


def write_peft(folder: Path, src: LoraAdapter, items: list[Item], new: Checkpoint, old: Checkpoint | None,
                to) -> None:
    """The adapter's tensors under the new module names, vocabulary rows remapped, DoRA m rescaled,
    modules_to_save copies rebuilt on the new tensors, base_layer copies dropped; adapter_config retargeted."""
    modules: dict[str, str] = {}  # old module -> new module, for LoRA-factor modules

    def tensors():
        for it in items:
            mod = src.modules[it.name]
            new_mod = it.new_name.rsplit(".", 1)[0]
            for part, key in mod.parts.items():
                if part.startswith("base_layer"):
                    continue
                t = _ported_part(src, it, part, key, new, old)
                if part.startswith("lora_"):
                    modules[mod.name] = new_mod
                head = PREFIX if key.startswith(PREFIX) else ""
                yield head + new_mod + key[len(head) + len(mod.name):], t
                del t

    write_file(folder / "adapter_model.safetensors", tensors(), metadata={"readapt": "port"})
    (folder / "adapter_config.json").write_text(json.dumps(_retargeted_config(src, modules, new, to), indent=2) + "\n")


def _ported_part(src: LoraAdapter, it: Item, part: str, key: str, new: Checkpoint,
                 old: Checkpoint | None) -> torch.Tensor:
    """One saved tensor of a module, as the new base needs it."""
    mod = src.modules[it.name]
    embedding = "lora_embedding_A" in mod.parts
    t = src.ckpt.read(key)
    if not is_finite(t):
        raise ReadaptError(f"the patch {src.path} has NaN/Inf values in {key!r} "
                           f"({src.ckpt.infos[key].file.name}): it cannot be ported")
    if part in ("weight", "bias") or part.startswith("modules_to_save"):
        P = t.float().sub_(old.read(it.name).float())  # the patch, on the old tensor's rows
        if it.rows is not None:
            P = remap_rows(P, it.rows)
        return new.read(it.new_name).float().add_(P).to(t.dtype)  # new tensor + P
    if part == "lora_magnitude_vector":
        return _dora_magnitude(t, it, new, old, embedding)
    if it.rows is not None and embedding and part == "lora_embedding_A":
        return remap_rows(t, it.rows, dim=1)  # A: r×vocab, columns are tokens
    if it.rows is not None and not embedding and part in ("lora_B.weight", "lora_B.bias"):
        if src.config.get("fan_in_fan_out"):
            raise ReadaptError(f"{src.path}: vocabulary rows of the fan_in_fan_out layer {mod.name} "
                               f"cannot be remapped (not supported)")
        return remap_rows(t, it.rows)  # B: vocab×r, rows are tokens
    return t.clone()


def _retargeted_config(src: LoraAdapter, modules: dict[str, str], new: Checkpoint, to) -> dict:
    """adapter_config.json for the new base: its name, and, where modules were renamed or dropped, exactly the
    carried modules under their new names with their own r and alpha."""
    cfg = dict(src.config)
    cfg["base_model_name_or_path"] = str(Path(to).absolute()) if Path(to).expanduser().is_dir() else str(to)
    n_lora = len({src.modules[n].name for n in src.modules if any(p.startswith("lora_") for p in src.modules[n].parts)})
    if modules and (any(a != b for a, b in modules.items()) or len(modules) < n_lora):
        cfg["rank_pattern"] = {b: src.rank_alpha(a)[0] for a, b in modules.items()}
        cfg["alpha_pattern"] = {b: src.rank_alpha(a)[1] for a, b in modules.items()}
        cfg["target_modules"] = "^(" + "|".join(re.escape(m) for m in modules.values()) + ")$"
        cfg["layers_to_transform"] = cfg["layers_pattern"] = None
    if (new.config or {}).get("architectures") and isinstance(cfg.get("auto_mapping"), dict):
        cfg["auto_mapping"] = {**cfg["auto_mapping"], "base_model_class": new.config["architectures"][0]}
    return cfg


def _dora_magnitude(m: torch.Tensor, it: Item, new: Checkpoint, old: Checkpoint | None,
                    embedding: bool) -> torch.Tensor:
    """m′ = m ⊙ ‖W_new‖ / ‖W_old‖ (old base known) or m (unknown); rows of new tokens: m′ = ‖W_new‖ (no change).
    Norms as PEFT's DoRA takes them, read in blocks of rows (DoraVariant.stored_norm)."""
    n_new = DoraVariant.stored_norm(new.stored(it.new_name), embedding)
    mf = m.float()
    if it.rows is not None and not embedding:  # m has one entry per vocabulary row
        mf = remap_rows(mf, it.rows, fill=n_new)
    if old is not None:
        n_old = DoraVariant.stored_norm(old.stored(it.name), embedding)
        if it.rows is not None and not embedding:
            n_old = remap_rows(n_old, it.rows, fill=n_new)
        ratio = torch.where(n_old > 0, n_new / n_old, torch.ones_like(n_new))
        keep = it.rows >= 0 if it.rows is not None and not embedding else torch.ones_like(mf, dtype=torch.bool)
        mf = torch.where(keep, mf * ratio, mf)
    return mf.to(m.dtype)


def write_delta(folder: Path, ported: PortedDelta, report: dict, max_shard_size) -> None:
    """The ported delta folder: Δ under the new names (rows remapped), and a manifest saying where it came from."""
    ckpt = ported.src.ckpt
    plan = [(n, ckpt.dtype(it.name), it.new_shape) for n, it in ported.items.items()]
    write_tensors(folder, plan, ((n, ported.stored(n)) for n, _, _ in plan), max_shard_size=max_shard_size,
                  metadata={"readapt": "delta", "formula": "delta ported by readapt port"})
    manifest = {**ported.src.manifest,
                "created": report["created"], "readapt_version": __version__,
                "formula": "delta ported to a new base by readapt port (PortLLM): see port_report.json",
                "base": {"spec": report["new_base"]["spec"], "path": report["new_base"]["path"],
                         "model_type": report["new_base"]["model_type"]},
                "tuned": None,  # the old tuned model is no base + Δ here: see ported_from
                "base_config": ported.config, "tensor_count": len(plan),
                "skipped": [m["name"] for m in report["modules"] if m["status"] == "skipped"],
                "ported_from": {"delta": report["patch"]["path"], "base": ported.src.manifest.get("base"),
                                "tuned": ported.src.manifest.get("tuned")}}
    (folder / DELTA_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
