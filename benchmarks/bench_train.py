"""Training benchmarks, CPU unless a GPU is visible.

    python benchmarks/bench_train.py speed                        # tokens/s and peak RSS, tiny + small model
    python benchmarks/bench_train.py step-memory CKPT [--max-length 512 --batch-size 1 --rank 64 --no-dora
                                                      --dtype bfloat16]

`speed` builds models from a config (no downloads) and word-level text, then times `readapt.training.train`
in a fresh subprocess per setting, so that the peak RSS (ru_maxrss) belongs to that run alone:
  demo    the demo world's model: Llama, 4 layers, hidden 128, MLP 512, vocab 256, tied (1.1M parameters);
          batch 64 x 64 tokens, rank 32 (LoRA and DoRA), as the demo trains its knowledge adapter
  small   Llama, 8 layers, hidden 512, MLP 1408, vocab 8192 (34M parameters); batch 8 x 256, rank 64 DoRA,
          whole batch at once / micro-batches of 2 / gradient checkpointing
  1b      (only with --only 1b, meant for a GPU) TinyLlama-1.1B's shape; batch 20 x 1024 in micro-batches of
          4, DoRA r=64, gradient checkpointing: the paper's setting

`step-memory CKPT` measures ONE LoRA/DoRA training step (forward, backward, AdamW step) with batch 1 and
max length 512 on a checkpoint folder: the memory a fine-tune of that checkpoint needs at the least, to be
compared with the memory of a training-free port (PortLLM). Python callers:
`step_memory(ckpt, batch_size=1, max_length=512, rank=64, dora=True) -> dict` (it too runs in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "demo": dict(vocab=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, tie_word_embeddings=True),
    "small": dict(vocab=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, tie_word_embeddings=False),
    # TinyLlama-1.1B's shape: for a GPU (`--only 1b`); the paper's setting, batch 20 x 1024, DoRA r=64
    "1b": dict(vocab=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, tie_word_embeddings=False),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(folder: Path, size: str, max_length: int, seed: int = 0) -> Path:
    """A random-weight Llama of the given size + word-level tokenizer over w0..w{vocab-5}."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    s = dict(SIZES[size])
    vocab = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(s.pop("vocab") - 4)]
    cfg = LlamaConfig(vocab_size=len(vocab), max_position_embeddings=max(max_length, 64), bos_token_id=1,
                      eos_token_id=2, pad_token_id=3, **s)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)  # bf16 on disk, as released models are
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def corpus(path: Path, vocab: int, n_tokens: int, seed: int = 0) -> Path:
    """Documents of 20-200 words; word i+1 depends on word i, so there is something to learn."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        done = 0
        while done < n_tokens:
            n = rng.randint(20, 200)
            w = rng.randrange(vocab - 4)
            words = []
            for _ in range(n):
                words.append(f"w{w}")
                w = (w * 7 + rng.randrange(3)) % (vocab - 4)
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
            done += n + 1
    return path


def _child_speed(size: str, batch: int, micro: int, length: int, rank: int, dora: bool, steps: int,
                 threads: int | None = None, checkpointing: bool = False) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from readapt.checkpoint import Checkpoint
    from readapt.training import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build(tmp / "base", size, length)
        data = corpus(tmp / "data.jsonl", SIZES[size]["vocab"], (batch * (steps + 2)) * length)
        ck = Checkpoint.open(base)
        params = sum(math.prod(ck.shape(n)) for n in ck.names)
        rss0 = rss_mb()
        t0 = time.perf_counter()
        out = train(base, data, tmp / "out", rank=rank, alpha=2 * rank, dora=dora, lr=2e-3, max_steps=steps,
                    batch_size=batch, micro_batch_size=micro, max_length=length, save_every=None, quiet=True,
                    gradient_checkpointing=checkpointing)
        wall = time.perf_counter() - t0
        log = [json.loads(l) for l in (out / "training_log.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in log[1:]]  # the first step warms up
    tps = len(steady) / sum(1 / t for t in steady)  # harmonic mean = total tokens / total time
    return {"size": size, "parameters": params, "batch": batch, "micro_batch": micro, "max_length": length,
            "rank": rank, "dora": dora, "gradient_checkpointing": checkpointing, "steps": steps,
            "threads": torch.get_num_threads(),
            "tokens_per_s": round(tps), "s_per_step": round(batch * length / tps, 4),
            "wall_s_incl_setup": round(wall, 2), "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            "rss_before_train_mb": round(rss0), "peak_rss_mb": round(peak_rss_mb()),
            "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count()}


def _child_step(ckpt: str, batch_size: int, max_length: int, rank: int, dora: bool, dtype: str | None = None) -> dict:
    """Load CKPT, wrap it with a fresh adapter, run one training step on random tokens; report memory.

    dtype of the frozen base: default bfloat16 on a GPU that supports it (what `readapt train` does there),
    else float32 (what it does on CPU); the adapter and optimizer state are float32 either way."""
    import torch

    from readapt.trainmodel import lora_model

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if dtype:
        dtype = getattr(torch, dtype)
    else:
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    rss0 = rss_mb()
    t0 = time.perf_counter()
    model = lora_model(ckpt, rank=rank, alpha=2 * rank, dropout=0.05, dora=dora, dtype=dtype).to(dev)
    load_s = time.perf_counter() - t0
    rss_loaded, peak_loaded = rss_mb(), peak_rss_mb()
    if cuda:
        torch.cuda.synchronize()
        gpu_loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    x = torch.randint(0, model.config.vocab_size, (batch_size, max_length), device=dev)
    t0 = time.perf_counter()
    with torch.autocast(dev, dtype=dtype, enabled=cuda and dtype != torch.float32):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    r = {"checkpoint": ckpt, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
         "batch_size": batch_size, "max_length": max_length, "rank": rank, "dora": dora,
         "parameters": sum(p.numel() for p in model.parameters()),
         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
         "load_s": round(load_s, 2), "step_s": round(step_s, 3), "loss": float(loss),
         "rss_start_mb": round(rss0), "rss_after_load_mb": round(rss_loaded), "peak_rss_load_mb": round(peak_loaded),
         "peak_rss_mb": round(peak_rss_mb())}
    if cuda:
        r["gpu_after_load_mb"] = round(gpu_loaded / 2**20)
        r["gpu_peak_step_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return r


def _in_subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(size: str, batch: int, micro: int, length: int, rank: int, dora: bool, steps: int,
          threads: int | None = None, checkpointing: bool = False) -> dict:
    """Train `steps` steps of a `size` model in a fresh process; tokens/s (after the first step), peak RSS."""
    args = [size, batch, micro, length, rank, dora, steps, threads, checkpointing]
    return _in_subprocess(["speed", json.dumps(args)])


def step_memory(ckpt: str, batch_size: int = 1, max_length: int = 512, rank: int = 64, dora: bool = True,
                dtype: str | None = None) -> dict:
    """Peak memory of one LoRA/DoRA training step on checkpoint folder `ckpt`, measured in a fresh process
    (peak RSS; on a GPU also peak allocated GPU memory). dtype: "float32", "bfloat16" or None (default)."""
    return _in_subprocess(["step", json.dumps([str(ckpt), batch_size, max_length, rank, dora, dtype])])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, args = sys.argv[2], json.loads(sys.argv[3])
        r = _child_speed(*args) if kind == "speed" else _child_step(*args)
        print(json.dumps(r))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--steps", type=int, default=10)
    sp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    sp.add_argument("--only", choices=sorted(SIZES), default=None, help="one model size only")
    sm = sub.add_parser("step-memory")
    sm.add_argument("checkpoint")
    sm.add_argument("--batch-size", type=int, default=1)
    sm.add_argument("--max-length", type=int, default=512)
    sm.add_argument("--rank", type=int, default=64)
    sm.add_argument("--dora", action=argparse.BooleanOptionalAction, default=True)
    sm.add_argument("--dtype", default=None, help="base dtype: float32 (CPU default) or bfloat16 (GPU default)")
    a = ap.parse_args()
    if a.cmd == "step-memory":
        print(json.dumps(step_memory(a.checkpoint, a.batch_size, a.max_length, a.rank, a.dora, a.dtype), indent=2))
        return
    # size, batch, micro-batch, block, rank, DoRA, gradient checkpointing
    settings = [("demo", 64, 64, 64, 32, False, False), ("demo", 64, 64, 64, 32, True, False),
                ("small", 8, 8, 256, 64, True, False), ("small", 8, 2, 256, 64, True, False),
                ("small", 8, 8, 256, 64, True, True), ("1b", 20, 4, 1024, 64, True, True)]
    for size, batch, micro, length, rank, dora, ckpt in settings:
        if a.only == size or (a.only is None and size != "1b"):
            r = speed(size, batch, micro, length, rank, dora, a.steps, a.threads, ckpt)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
