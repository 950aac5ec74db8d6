"""Port benchmark: peak memory of `readapt port --merge` vs one LoRA training step on the same model.

    python benchmarks/bench_port.py [--work benchmarks/_work/port] [--rank 64] [--no-train]
                                    [--layers 8 --hidden 1024 --intermediate 2816]   # make_pair's sizes

PortLLM's headline (Khan et al. 2024) is that porting a patch costs far less memory than re-fine-tuning
the new version (12.2x less GPU memory than LoRA). Here, on the synthetic 168M-parameter float32 Llama
pair of benchmarks/make_pair.py ("base" = version 1, "instruct" = version 2: a rank-16 change plus noise):

  1. a rank-64 patch on every linear layer of version 1 (lora_alpha 128), written as a PEFT adapter:
     LoRA, and DoRA (magnitudes = ‖W_v1‖ per row, moved by up to 10%), random nonzero factors;
  2. each measured in a fresh process (peak RSS = its VmHWM, wall time):
       port LoRA --merge                  θ′ + s·B·A, written as a model folder
       port LoRA --merge --from v1        + the drift pass (reads v1, v2 and the patch once more)
       port DoRA --merge --from v1        + the magnitude rescaling
       train step LoRA / DoRA             benchmarks/bench_train.step_memory: load version 2, wrap it
                                          with a rank-64 adapter, one forward/backward/AdamW step,
                                          batch 1, max length 512 (the least a re-fine-tune needs)
  3. the ratio train-step peak / port peak, and the same above the bare `import torch` process
     (what the job itself adds; the interpreter with torch costs ~220 MB whatever the model size).

Prints one JSON line per measurement and a summary; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def make_adapter(old: Path, out: Path, rank: int, dora: bool, seed: int = 0) -> Path:
    """A PEFT LoRA/DoRA adapter on every linear layer of `old`, written one module at a time."""
    import torch

    from readapt.addends import PREFIX
    from readapt.checkpoint import Checkpoint, output_folder, write_file

    ckpt = Checkpoint.open(old)
    mods = [n[: -len(".weight")] for n in ckpt.names if n.endswith(".weight") and any(m in n for m in LINEAR)]

    def tensors():
        for i, mod in enumerate(mods):
            g = torch.Generator().manual_seed(seed * 7919 + i)
            out_f, in_f = ckpt.shape(mod + ".weight")
            yield f"{PREFIX}{mod}.lora_A.weight", torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            yield f"{PREFIX}{mod}.lora_B.weight", torch.randn(out_f, rank, generator=g) * 1e-3
            if dora:
                m = torch.linalg.norm(ckpt.read(mod + ".weight").float(), dim=1)
                yield f"{PREFIX}{mod}.lora_magnitude_vector", m * (1 + 0.1 * torch.rand(out_f, generator=g))

    with output_folder(out, overwrite=True) as tmp:
        write_file(tmp / "adapter_model.safetensors", tensors())
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(old), "r": rank,
               "lora_alpha": 2 * rank, "target_modules": [m.split(".")[-1] for m in LINEAR], "lora_dropout": 0.0,
               "bias": "none", "use_dora": dora, "use_rslora": False, "fan_in_fan_out": False,
               "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True}
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def peak_rss_mb() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: after fork+exec that also counts the parent's
    RSS at fork time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _child(kind: str, args: list) -> dict:
    if kind == "torch":
        import torch  # noqa: F401

        return {"peak_rss_mb": peak_rss_mb()}
    if kind == "setup":  # the inputs, built in a child so that the measuring parent stays small
        from make_pair import make_pair

        work, rank, layers, hidden, intermediate = Path(args[0]), *args[1:]
        pair = work / "pair"
        if not (pair / "instruct" / "config.json").is_file():
            make_pair(pair, layers=layers, hidden=hidden, intermediate=intermediate)
        for dora in (False, True):
            make_adapter(pair / "base", work / f"{'dora' if dora else 'lora'}-r{rank}", rank, dora)
        return {"parameters": sum(p.stat().st_size for p in (pair / "instruct").glob("*.safetensors")) // 4}
    from readapt.cli import main

    t0 = time.perf_counter()
    rc = main(args)
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": peak_rss_mb()}


def _run(kind: str, args: list) -> dict:
    out = subprocess.run([sys.executable, __file__, "_child", kind, json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, str(HERE))
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        print(json.dumps(_child(sys.argv[2], json.loads(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "port")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--no-train", action="store_true", help="skip the training-step measurements")
    ap.add_argument("--no-dora-train", action="store_true", help="skip the DoRA training step (the heaviest run)")
    ap.add_argument("--layers", type=int, default=8, help="model size (make_pair); a pair in --work is reused")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    a = ap.parse_args()
    params = _run("setup", [str(a.work), a.rank, a.layers, a.hidden, a.intermediate])["parameters"]
    old, new = a.work / "pair" / "base", a.work / "pair" / "instruct"
    lora, dora = a.work / f"lora-r{a.rank}", a.work / f"dora-r{a.rank}"
    results = {"torch import": _run("torch", [])}
    runs = {
        "port LoRA --merge": [str(lora), "--to", str(new), "-o", str(a.work / "out"), "--merge", "--overwrite"],
        "port LoRA --merge --from v1": [str(lora), "--to", str(new), "--from", str(old), "-o", str(a.work / "out"),
                                        "--merge", "--overwrite"],
        "port DoRA --merge --from v1": [str(dora), "--to", str(new), "--from", str(old), "-o", str(a.work / "out"),
                                        "--merge", "--overwrite"],
    }
    for name, argv in runs.items():
        results[name] = _run("cli", ["port", *argv])
        print(json.dumps({"run": name, **results[name]}), flush=True)
    if not a.no_train:
        from bench_train import step_memory

        for name, d in (("train step LoRA", False), ("train step DoRA", True))[: 1 if a.no_dora_train else 2]:
            r = step_memory(str(new), batch_size=1, max_length=512, rank=a.rank, dora=d)
            results[name] = {"peak_rss_mb": r["peak_rss_mb"], "wall_s": r["load_s"] + r["step_s"], "step": r}
            print(json.dumps({"run": name, **r}), flush=True)
    base = results["torch import"]["peak_rss_mb"]
    print(f"\nmodel: {params / 1e6:.0f}M parameters float32 ({new}); rank {a.rank}; `import torch` alone: {base} MB")
    print(f"{'run':32s} {'peak RSS MB':>12s} {'above torch':>12s} {'wall s':>8s}")
    for name, r in results.items():
        if name != "torch import":
            print(f"{name:32s} {r['peak_rss_mb']:12d} {r['peak_rss_mb'] - base:12d} {r['wall_s']:8.1f}")
    ports = [k for k in results if k.startswith("port")]
    for t in (k for k in results if k.startswith("train")):
        for p in ports:
            tr, pr = results[t]["peak_rss_mb"], results[p]["peak_rss_mb"]
            print(f"{t} / {p}: {tr / pr:.1f}x peak RSS, {(tr - base) / max(pr - base, 1):.1f}x above torch")


if __name__ == "__main__":
    main()
