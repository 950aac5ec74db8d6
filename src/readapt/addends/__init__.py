"""What can be added to a base checkpoint (merge, load_merged, port): the kinds of addend and how they open.

    base.py     Addend (the interface every kind implements) and Kind
    stored.py   DeltaFolder (Ψ = Δ), CheckpointDifference (Ψ = Θ − Φ): elementwise, read in blocks
    lora.py     LoraAdapter: PEFT LoRA folders (reading, checks, rows); save_lora
    variants.py LoraTerm (s·B·A) and the variants LoraVariant / DoraVariant, as PEFT's LoraVariant
    ported.py   PortedDelta: a delta folder through port's name and row mapping
    open.py     open_addend (which kind, and does it fit the base), normalise (the (spec, scale) list)
"""

from readapt.addends.base import Addend, Kind
from readapt.addends.lora import PREFIX, LoraAdapter, read_adapter_config, save_lora
from readapt.addends.open import KINDS, AddSpec, normalise, open_addend
from readapt.addends.ported import PortedDelta
from readapt.addends.stored import CheckpointDifference, DeltaFolder
from readapt.addends.variants import DoraVariant, LoraTerm, LoraVariant

__all__ = ["KINDS", "PREFIX", "AddSpec", "Addend", "CheckpointDifference", "DeltaFolder", "DoraVariant", "Kind",
           "LoraAdapter", "LoraTerm", "LoraVariant", "PortedDelta", "normalise", "open_addend",
           "read_adapter_config", "save_lora"]
