"""Where the demo's training time goes: one training step of the demo world's model, and what would make it faster.

    python benchmarks/bench_demo_steps.py [--steps 20] [--only matmul,full,lora]

One torch thread (the demo runs two jobs at once on two cores, one thread each); a random-weight model of the
demo's shape (Llama, 4 layers, hidden 128, MLP 512, vocab 243, tied: 1.07M weights), no downloads.

  matmul  GFLOP/s of one float32 and one bfloat16 matmul of the model's shapes: the ceiling for a step
  full    a full-model AdamW step as Φ pre-trains (16 rows of 64 tokens), float32 / bfloat16 autocast,
          scaled-dot-product / eager attention, and float32 with the forward under torch.compile
  lora    a readapt.train step (PEFT LoRA, AdamW, clipping) as the task patch (2 blocks of 128, rank 16) and the
          knowledge adapter (8 blocks of 128, rank 64, dropout 0.05, LoRA and DoRA) train, with variants

A compiled setting's first step (timed apart; warm-up excluded) is its compile, which the inductor cache on disk
(TORCHINDUCTOR_CACHE_DIR) spares a later process with the same shapes.

Each setting reports ms per step (median of `--steps` after 5 warm-up steps) and tokens per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def model(attn: str = "sdpa", dtype=torch.float32):
    """The default demo's model (demoworld.models.model_config, the world's 243-token vocabulary), random weights."""
    from transformers import LlamaForCausalLM

    from readapt.demoworld.models import model_config
    from readapt.demoworld.settings import FULL

    config = model_config(FULL, 243)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def timed(step, steps: int) -> float:
    """Median seconds of `step()` over `steps` calls, after 5 warm-up calls."""
    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(label: str, step, steps: int, tokens: int, compiled: bool) -> None:
    """One table row: ms per step and tokens per second; a compiled setting's first step (its compile) apart."""
    t0 = time.perf_counter()
    step()
    first = f" (first step {time.perf_counter() - t0:.0f} s)" if compiled else ""
    t = timed(step, steps)
    print(f"| {label}{first} | {t * 1e3:.0f} | {tokens / t:,.0f} |")


def matmul(steps: int) -> None:
    print("| matmul [M, K] x [K, N] | float32 GFLOP/s | bfloat16 GFLOP/s |\n|---|---|---|")
    for m, k, n in ((1024, 128, 512), (1024, 512, 128), (256, 128, 128), (2048, 128, 64)):
        rates = []
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            rates.append(2 * m * k * n / timed(lambda: a @ b, steps * 10) / 1e9)
        print(f"| [{m}, {k}] x [{k}, {n}] | {rates[0]:.0f} | {rates[1]:.0f} |")


def full(steps: int) -> None:
    print("\n| full-model step, 16 x 64 tokens | ms/step | tokens/s |\n|---|---|---|")
    x = torch.randint(4, 243, (16, 64))
    for attn, autocast, compiled in (("sdpa", False, False), ("sdpa", True, False), ("eager", False, False),
                                     ("eager", True, False), ("sdpa", False, True)):
        net = model(attn).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        forward = torch.compile(net.forward, dynamic=False) if compiled else net.forward

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = forward(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        label = f"{attn}, {'bfloat16 autocast' if autocast else 'float32'}{', torch.compile' if compiled else ''}"
        report(label, step, steps, x.numel(), compiled)


def lora(steps: int) -> None:
    from peft import LoraConfig, get_peft_model

    print("\n| LoRA step (PEFT, AdamW, clipping) | ms/step | tokens/s |\n|---|---|---|")
    f32, bf16 = torch.float32, torch.bfloat16
    settings = (  # (label, batch, rank, dropout, dora, base dtype, forward under torch.compile)
        ("task patch: batch 2, r16", 2, 16, 0.0, False, f32, False),
        ("  batch 8, r16", 8, 16, 0.0, False, f32, False),
        ("  batch 2, r16, bfloat16 base", 2, 16, 0.0, False, bf16, False),
        ("  batch 2, r16, torch.compile", 2, 16, 0.0, False, f32, True),
        ("knowledge adapter: batch 8, r64, dropout 0.05", 8, 64, 0.05, False, f32, False),
        ("  batch 16 (version 7)", 16, 64, 0.05, False, f32, False),
        ("  dropout 0", 8, 64, 0.0, False, f32, False),
        ("  r16", 8, 16, 0.05, False, f32, False),
        ("  torch.compile", 8, 64, 0.05, False, f32, True),
        ("  DoRA", 8, 64, 0.05, True, f32, False),
        ("  DoRA, dropout 0", 8, 64, 0.0, True, f32, False),
    )
    for label, batch, rank, dropout, dora, dtype, compiled in settings:
        net = get_peft_model(model(dtype=dtype), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                            use_dora=dora, target_modules="all-linear")).train()
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        x = torch.randint(4, 243, (batch, 128))
        forward = torch.compile(net.forward, dynamic=False) if compiled else net.forward

        def step():
            forward(input_ids=x, labels=x).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        report(label, step, steps, x.numel(), compiled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", default="matmul,full,lora")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for part in args.only.split(","):
        {"matmul": matmul, "full": full, "lora": lora}[part](args.steps)


if __name__ == "__main__":
    main()
