"""config.json: the fields readapt reads, checked; and whether two configs describe the same architecture.

    read_config(folder)                        # config.json checked (CONFIG_FIELDS), or None
    compare_configs(a, b, "the base", "X")     # (errors: SHAPE_FIELDS differ, warnings: anything else)
    check_configs(base, other.config, "X")     # raise the errors, warn the warnings

One rule for every job that puts two checkpoints together (extract, LoRE, merge, port): a field that
changes tensor shapes or the tensor set is an error; any other difference (rope_theta, sliding_window...)
is a warning that a weight difference cannot carry it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from readapt.errors import ReadaptError
from readapt.userfiles import BOOL, NON_NEGATIVE_INT, STRING, STRINGS, check_fields, load

# the config.json fields readapt itself reads, and what they must be (transformers checks the rest)
CONFIG_FIELDS = {"model_type": STRING, "architectures": STRINGS, "tie_word_embeddings": BOOL,
                 "max_position_embeddings": NON_NEGATIVE_INT, "vocab_size": NON_NEGATIVE_INT}


def read_config(folder: Path) -> dict | None:
    """`folder`/config.json, checked (userfiles.load, CONFIG_FIELDS), or None if there is none."""
    file = folder / "config.json"
    if not os.path.lexists(file):
        return None
    return check_fields(load(file), file, CONFIG_FIELDS)


# fields whose difference changes tensor shapes or the tensor set: an error
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "moe_intermediate_size",
                "num_experts", "num_local_experts")
# fields that say nothing about the weights
IGNORED_FIELDS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures",
                  "bos_token_id", "eos_token_id", "pad_token_id", "output_attentions", "output_hidden_states",
                  "return_dict", "_attn_implementation_autoset", "initializer_range")


def compare_configs(a: dict | None, b: dict | None, a_name: str, b_name: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) between two config.json dicts.

    Errors: fields that change the tensors (hidden size, layers, vocab, tying...). Warnings: every other
    differing field (rope_theta, rope_scaling, sliding_window, max_position_embeddings, softcapping...),
    which a weight difference cannot carry: the output keeps `a`'s value (a is the base written to).
    """
    if not a or not b:
        return [], []
    errors, warnings = [], []
    for key in sorted(set(a) | set(b)):
        if key in IGNORED_FIELDS or a.get(key) == b.get(key):
            continue
        text = f"config field {key!r}: {a_name} has {a.get(key)!r}, {b_name} has {b.get(key)!r}"
        if key in SHAPE_FIELDS:
            errors.append(text)
        else:
            warnings.append(text + f" (a weight difference cannot carry it; the output keeps {a_name}'s value)")
    return errors, warnings


def check_configs(base, other_config: dict | None, other_label: str) -> None:
    """Refuse `other_config` if it changes the architecture of the checkpoint `base`; warn about the rest."""
    errors, warns = compare_configs(base.config, other_config, "the base", other_label)
    if errors:
        raise ReadaptError("the architectures differ: " + "; ".join(errors))
    for w in warns:
        warnings.warn(w, stacklevel=3)
