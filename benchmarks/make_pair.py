"""Build a synthetic Llama checkpoint pair for benchmarks (random weights, real tensor names and shapes).

    python benchmarks/make_pair.py OUT_DIR [--layers 8] [--hidden 1024] [--intermediate 2816]
                                           [--vocab 32000] [--dtype float32] [--shard-size 2GB]

writes OUT_DIR/base and OUT_DIR/instruct, where instruct = base + a rank-16 perturbation + noise in every
2-D tensor (the shape of a real instruction-tuning delta: a few strong directions over a noise floor)
and base + noise for the norms. Defaults give the 168M-parameter float32 pair the benchmarks use.
Tensors are generated and written one at a time with readapt's streaming writer, so building an 8B pair
needs no more memory than its largest tensor.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from readapt.checkpoint import output_folder, write_tensors
from readapt.numerics import parse_dtype


def llama_plan(layers: int, hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
               dtype: torch.dtype):
    head_dim = hidden // heads
    plan = [("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "self_attn.q_proj.weight", dtype, (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", dtype, (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", dtype, (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", dtype, (hidden, heads * head_dim)),
            (p + "mlp.gate_proj.weight", dtype, (intermediate, hidden)),
            (p + "mlp.up_proj.weight", dtype, (intermediate, hidden)),
            (p + "mlp.down_proj.weight", dtype, (hidden, intermediate)),
            (p + "input_layernorm.weight", dtype, (hidden,)),
            (p + "post_attention_layernorm.weight", dtype, (hidden,)),
        ]
    plan += [("model.norm.weight", dtype, (hidden,)), ("lm_head.weight", dtype, (vocab, hidden))]
    return plan


def make_pair(out: Path, layers: int = 8, hidden: int = 1024, intermediate: int = 2816, vocab: int = 32000,
              heads: int = 16, kv_heads: int = 16, dtype: str = "float32", shard_size: str = "2GB",
              rank: int = 16, seed: int = 0) -> tuple[Path, Path]:
    dt = parse_dtype(dtype)
    plan = llama_plan(layers, hidden, intermediate, vocab, heads, kv_heads, dt)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "dtype": str(dt).removeprefix("torch."),
    }

    def base_tensor(i: int, name: str, shape) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 100003 + i)
        if len(shape) == 1:
            return 1.0 + 0.1 * torch.randn(shape, generator=g)
        return torch.randn(shape, generator=g) * 0.02

    def tensors(instruct: bool):
        for i, (name, _, shape) in enumerate(plan):
            w = base_tensor(i, name, shape)
            if instruct:
                g = torch.Generator().manual_seed(seed * 100003 + i + 7919)
                if len(shape) == 2:
                    u = torch.randn(shape[0], rank, generator=g)
                    v = torch.randn(rank, shape[1], generator=g)
                    w += (u @ v) * (0.02 / rank ** 0.5) * 0.3 + torch.randn(shape, generator=g) * 0.002
                else:
                    w += torch.randn(shape, generator=g) * 0.01
            yield name, w.to(dt)

    paths = []
    for which in ("base", "instruct"):
        with output_folder(out / which, overwrite=True) as tmp:
            write_tensors(tmp, plan, tensors(which == "instruct"), max_shard_size=shard_size)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        paths.append(out / which)
    return paths[0], paths[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shard-size", default="2GB")
    a = ap.parse_args()
    base, inst = make_pair(a.out, a.layers, a.hidden, a.intermediate, a.vocab, a.heads, a.kv_heads, a.dtype,
                           a.shard_size)
    n = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"wrote {base} and {inst} ({n / 1e9:.2f} GB each)")


if __name__ == "__main__":
    main()
