"""Tiny Hugging Face checkpoints built at test time (no downloads, no committed weights).

    save_tiny(path, "llama")                     # float32, untied, single file
    save_tiny(path, "qwen2", dtype=torch.bfloat16, max_shard_size="200KB")   # sharded bf16
    tuned = perturb(path, other_path, scale=0.01)  # same architecture, weights moved

Families: llama, mistral, qwen2 (q/k/v biases), gemma2 (tied embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(60)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s> ' + m['role'] + ' ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s> assistant ' }}{% endif %}"
)


def tiny_config(family: str = "llama", **overrides):
    """A ~30k-parameter config of the given family with 2 layers."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    if family == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False)
    elif family == "mistral":
        cfg = MistralConfig(**common, tie_word_embeddings=False, sliding_window=32)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=False)
    elif family == "gemma2":
        cfg = Gemma2Config(**common, head_dim=4, tie_word_embeddings=True)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    # randomise norms too, so that every tensor carries information
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def save_tiny(path, family: str = "llama", seed: int = 0, dtype=torch.float32, max_shard_size="50GB",
              **overrides) -> Path:
    """Save a tiny model + tokenizer + generation config to `path`; returns the path."""
    path = Path(path)
    model = tiny_model(family, seed=seed, dtype=dtype, **overrides)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(path)
    return path


def perturb(src, dst, scale: float = 0.01, seed: int = 1, max_shard_size="50GB") -> Path:
    """Copy checkpoint `src` to `dst` with every float tensor moved by scale*N(0,1) (an "instruct" model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_((p.float() + noise).to(p.dtype))
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(dst)
    return Path(dst)


def read_all(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder (single file or shards), via safetensors itself (a delta's
    round-trip exceptions, readapt_exact.safetensors, are not weights)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(p for p in Path(folder).glob("*.safetensors") if p.name != "readapt_exact.safetensors"):
        out.update(load_file(f))
    return out


def config_of(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
