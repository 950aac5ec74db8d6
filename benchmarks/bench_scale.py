"""Real scale: every checkpoint job on a synthetic pair with Llama-3-8B's tensor names and shapes.

    python benchmarks/bench_scale.py build     [--work DIR]   # the pair, a rank-64 LoRA, a tokenizer (once)
    python benchmarks/bench_scale.py jobs      [--work DIR] [--only extract merge-0.5 ...]
    python benchmarks/bench_scale.py svd       [--work DIR]   # LoRE per matrix shape: randomized vs gram
    python benchmarks/bench_scale.py slices    [--work DIR] [--mergekit VENV] [--only ...]
    python benchmarks/bench_scale.py mergekit  [--work DIR] [--mergekit VENV]
    python benchmarks/bench_scale.py exactness [--work DIR]   # blocked LoRA/DoRA terms vs whole / PEFT
    python benchmarks/bench_scale.py table     [--work DIR]   # every result so far, as markdown

DIR defaults to $READAPT_SCALE_DIR or /work/scale-bench (outside the repository: the pair is 32 GB).

build: base and instruct, bfloat16, untied, 32 layers, hidden 4096, intermediate 14336, 32 heads / 8 KV
heads, vocab 128256 (8.03B parameters, 16.06 GB each, ~5 GB shards + index, config.json of a
LlamaForCausalLM, a word-level tokenizer of 128256 tokens). instruct = base + a rank-16 perturbation +
noise in every matrix (base + noise for norms). Both are generated block by block (≤ 4M elements) and
streamed through readapt's writer (`write_tensors` with `Blocks`), each block from its own seed (tensor
name, block index), so any slice of layers is bit-identical to the same tensors of the full pair and the
generator holds a few blocks at a time. Also a rank-64 PEFT LoRA (lora_alpha 128, float32, nonzero A
and B) on every linear layer, lm_head and embed_tokens, made for the base. "v2" for port is the instruct
checkpoint (no third 16 GB checkpoint: disk).

jobs: each CLI job as a user runs it, under `nice -n 19 /usr/bin/time -v` (wall, CPU, peak RSS; RSS of
anonymous memory sampled every 0.2 s beside it), after `sync` and, where allowed (root), dropping the
page cache (cold reads); `cat` of the same input bytes to /dev/null the same way. The output is deleted
after each measurement. Throughput = (input bytes + output bytes) / wall.

svd: Δ of one matrix of each shape (layer 0, embed_tokens) factorized in this process by
`factorize(rank=64, svd=randomized|gram)` and `factorize(tau=0.5, svd=gram)`: seconds per matrix, and the
model total as Σ count × seconds.

slices: 1-layer and 4-layer slices of the same shapes (embed_tokens, lm_head, the first layers), built,
measured, deleted: readapt extract --rank 64 (randomized), --svd gram, --tau 0.5, and --embeddings/--lm-head
dense (what mergekit writes for them), and mergekit-extract-lora --max-rank 64. Per layer = (t4 − t1) / 3;
the 32-layer figure is extrapolated as t4 + 28 × per layer. (No 0-layer slice: with embeddings dense,
neither tool writes an adapter without a linear layer.)

mergekit: `readapt merge BASE --add INSTRUCT:0.5` and mergekit-yaml task_arithmetic (weight 0.5, float32
arithmetic, bfloat16 output: the same math) one after the other on the 8B pair (time, memory), then both
again on the 1-layer slice with every output tensor compared (per-tensor SHA-256, and elementwise in bf16
ulps).

Disk: the jobs that write a 16 GB checkpoint run with their output drained (`Sink`): each finished 5 GB
shard is fsync'ed and truncated while the job writes the next, so the disk holds one shard at a time
and ~7 GB free are enough beside the 32.9 GB of inputs.

Every result is appended to DIR/results.jsonl with the load average before and after. Nothing here is
asserted by the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPE = {"layers": 32, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}
if os.environ.get("READAPT_SCALE_SHAPE") == "tiny":  # --tiny: a smoke test of the script itself
    SHAPE = {"layers": 2, "hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 2, "vocab": 1024}
RANK = 64
GEN_BLOCK = 1 << 22  # elements per generated block
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GB = 1e9


def work_dir(arg: Path | None) -> Path:
    return Path(arg or os.environ.get("READAPT_SCALE_DIR") or "/work/scale-bench")


def plan_of(layers: int):
    import torch

    from make_pair import llama_plan

    s = SHAPE
    return llama_plan(layers, s["hidden"], s["intermediate"], s["vocab"], s["heads"], s["kv_heads"], torch.bfloat16)


def plan_bytes(layers: int) -> int:
    return sum(math.prod(shape) * 2 for _, _, shape in plan_of(layers))


def need_space(where: Path, nbytes: int, what: str, margin: int = 2 * 10**9) -> None:
    """Refuse to start when the file system holding `where` has less than `nbytes` + margin free."""
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < nbytes + margin:
        raise SystemExit(f"{what} needs {(nbytes + margin) / GB:.1f} GB free in {where} ({nbytes / GB:.1f} GB "
                         f"+ {margin / GB:.0f} GB margin); {free / GB:.1f} GB are free. Free some space or pass "
                         f"--work on another disk.")


# ---------------------------------------------------------------------------------------------------
# the synthetic pair


def _gen(name: str, block: int, stream: int, seed: int):
    import torch

    key = (zlib.crc32(name.encode()) << 24) ^ (block << 4) ^ stream ^ (seed << 56)
    return torch.Generator().manual_seed(key & (2**63 - 1))


def tensor_blocks(name: str, shape: tuple[int, ...], instruct: bool, seed: int = 0, rank: int = 16):
    """The elements of one bf16 tensor as 1-D blocks of whole rows (≤ GEN_BLOCK elements):
    base W = 0.02·N(0,1) (norms 1 + 0.1·N), instruct W + 0.3·(0.02/√r)·U V + 0.002·N (norms W + 0.01·N),
    U: rows×r from the block's seed, V: r×in from the tensor's."""
    import torch

    if len(shape) == 1:
        w = 1.0 + 0.1 * torch.randn(shape, generator=_gen(name, 0, 0, seed))
        if instruct:
            w += 0.01 * torch.randn(shape, generator=_gen(name, 0, 1, seed))
        yield w.to(torch.bfloat16)
        return
    m, n = shape
    rows = max(1, GEN_BLOCK // n)
    V = torch.randn(rank, n, generator=_gen(name, 0, 3, seed)).mul_(0.3 * 0.02 / rank ** 0.5) if instruct else None
    for b, r0 in enumerate(range(0, m, rows)):
        r1 = min(m, r0 + rows)
        w = torch.randn(r1 - r0, n, generator=_gen(name, b, 0, seed)).mul_(0.02)
        if instruct:
            g = _gen(name, b, 1, seed)
            w.addmm_(torch.randn(r1 - r0, rank, generator=g), V)
            w.add_(torch.randn(r1 - r0, n, generator=g), alpha=0.002)
        yield w.to(torch.bfloat16).view(-1)


def config(layers: int) -> dict:
    s = SHAPE
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"], "num_hidden_layers": layers, "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"], "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "bos_token_id": 128000,
        "eos_token_id": 128001, "torch_dtype": "bfloat16",
    }


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with 128256 tokens (readapt's checkpoint jobs do not read it; port reads it
    for vocabulary tensors and finds it identical on both sides)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(128000)}
    vocab.update({f"<|reserved_special_token_{i}|>": 128000 + i for i in range(256)})
    vocab["<|begin_of_text|>"], vocab["<|end_of_text|>"] = 128000, 128001
    del vocab["<|reserved_special_token_0|>"], vocab["<|reserved_special_token_1|>"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "model_max_length": 8192}, indent=2) + "\n")


def build_pair(out: Path, layers: int, seed: int = 0) -> None:
    """out/base and out/instruct (skipped when already complete)."""
    from readapt.checkpoint import Blocks, output_folder, write_tensors

    plan = plan_of(layers)
    for which in ("base", "instruct"):
        if (out / which / "config.json").is_file():
            continue
        tensors = ((n, Blocks(dt, shape, tensor_blocks(n, shape, which == "instruct", seed))) for n, dt, shape in plan)
        with output_folder(out / which, overwrite=True) as tmp:
            write_tensors(tmp, plan, tensors, max_shard_size="5GB", metadata={"bench_scale": which})
            (tmp / "config.json").write_text(json.dumps(config(layers), indent=2) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps(
                {"bos_token_id": 128000, "eos_token_id": 128001}) + "\n")
            write_tokenizer(tmp)


def build_lora(base: Path, out: Path, rank: int = RANK, seed: int = 0) -> None:
    """A PEFT LoRA (float32, lora_alpha = 2r) on every linear layer, lm_head and embed_tokens of `base`,
    written one module at a time: A = N/√in, B = 0.01·N (embedding: lora_embedding_A r×vocab = N,
    lora_embedding_B dim×r = 0.01·N/√r)."""
    import torch

    from readapt.checkpoint import Checkpoint, output_folder, write_file

    if (out / "adapter_config.json").is_file():
        return
    ckpt = Checkpoint.open(base)
    prefix = "base_model.model."
    mods = [n.removesuffix(".weight") for n in ckpt.names
            if n.endswith(".weight") and (any(m in n for m in LINEAR) or n in ("lm_head.weight", "model.embed_tokens.weight"))]

    def tensors():
        for mod in mods:
            g = _gen(mod, 0, 5, seed)
            out_f, in_f = ckpt.shape(mod + ".weight")
            if mod.endswith("embed_tokens"):  # Ψ = s·(B_e A_e)ᵀ: vocab×dim
                yield f"{prefix}{mod}.lora_embedding_A", torch.randn(rank, out_f, generator=g)
                yield f"{prefix}{mod}.lora_embedding_B", torch.randn(in_f, rank, generator=g) * (0.01 / rank ** 0.5)
                continue
            yield f"{prefix}{mod}.lora_A.weight", torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            yield f"{prefix}{mod}.lora_B.weight", torch.randn(out_f, rank, generator=g) * 0.01

    with output_folder(out, overwrite=True) as tmp:
        write_file(tmp / "adapter_model.safetensors", tensors())
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
               "lora_alpha": 2 * rank, "target_modules": [m.split(".")[-1] for m in LINEAR] + ["lm_head", "embed_tokens"],
               "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
               "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True}
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# measuring


def drop_caches() -> bool:
    """sync, then drop the page cache if this process may (root): the next job reads cold."""
    subprocess.run(["sync"], check=True)
    if os.environ.get("READAPT_SCALE_WARM"):
        return False
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return out


def _rss_anon_kb(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            m = re.search(r"RssAnon:\s+(\d+)", Path(f"/proc/{p}/status").read_text())
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def folder_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def weight_bytes(*folders: Path) -> int:
    return sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors"))


class Sink:
    """Frees the disk behind a job's finished output shards while it runs: when a newer shard file exists,
    each older one (closed by the writer, which writes them one after the other) is fsync'ed (the
    write-back the job would cause anyway) and truncated to 0 bytes, keeping its name (mergekit renames
    its shards at the end). The disk then holds one shard of the output at a time. Records every
    shard's size for the throughput."""

    def __init__(self, output: Path):
        self.output, self.sizes, self.fsync_s = output, {}, 0.0

    def files(self) -> list[Path]:
        dirs = [self.output, *self.output.parent.glob(f".{self.output.name}.readapt-tmp-*")]
        return [f for d in dirs if d.is_dir() for f in d.glob("*.safetensors")]

    def poll(self, final: bool = False) -> None:
        files = []
        for f in self.files():
            try:
                files.append((f.stat().st_mtime_ns, f))
            except OSError:
                pass
        files.sort()
        for _, f in files if final else files[:-1]:
            try:
                size = f.stat().st_size
                if size == 0:
                    continue
                self.sizes[f.name] = size
                if final:
                    continue
                s = time.perf_counter()
                fd = os.open(f, os.O_WRONLY)
                try:
                    os.fsync(fd)
                    os.ftruncate(fd, 0)
                finally:
                    os.close(fd)
                self.fsync_s += time.perf_counter() - s
            except OSError:
                pass


SINK_SITE = """# written by benchmarks/bench_scale.py: the job's output is drained while it runs (Sink), so the disk
# needs one shard of it, not all of it; readapt's check of the free space (checkpoint.writer.need_space) is
# told about the space the drain gives back. Only the benchmark's own child processes import this.
import os, shutil
_disk_usage = shutil.disk_usage


def disk_usage(path):
    u = _disk_usage(path)
    return type(u)(u.total, u.used, u.free + int(os.environ["READAPT_BENCH_DRAINED_BYTES"]))


shutil.disk_usage = disk_usage
"""


def sink_env(work: Path) -> dict:
    """The environment of a drained job: a sitecustomize that adds the 16 GB the drain frees to the free space
    readapt checks before writing (the drain keeps one 5 GB shard on disk at a time)."""
    site = work / "sink-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SINK_SITE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "READAPT_BENCH_DRAINED_BYTES": str(20 * 10**9)}


def measure(work: Path, name: str, cmd: list[str] | str, inputs: int, output: Path | None = None,
            keep: bool = False, extra: dict | None = None, sink: bool = False) -> dict:
    """Run one command cold, niced, under /usr/bin/time -v; record and return its figures. With `sink`, the
    output's finished shards are truncated while it runs (see Sink): the disk never holds the whole output."""
    if output is not None and not keep:
        shutil.rmtree(output, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stats = logs / f"{name}.time"
    cold = drop_caches()
    load0 = os.getloadavg()
    shell = isinstance(cmd, str)
    full = f"nice -n 19 /usr/bin/time -v -o {stats} {cmd}" if shell else ["nice", "-n", "19", "/usr/bin/time", "-v",
                                                                         "-o", str(stats), *cmd]
    sunk = Sink(output) if sink and output is not None else None
    env = sink_env(work) if sunk else None
    with open(logs / f"{name}.log", "w") as log:
        proc = subprocess.Popen(full, shell=shell, stdout=log, stderr=subprocess.STDOUT, env=env)
        anon, stop = [0], threading.Event()

        def sample():
            while not stop.wait(0.2):
                anon[0] = max(anon[0], _rss_anon_kb(_descendants(proc.pid)))

        def drain():
            while not stop.wait(0.5):
                sunk.poll()

        threads = [threading.Thread(target=f, daemon=True) for f in ([sample, drain] if sunk else [sample])]
        for th in threads:
            th.start()
        rc = proc.wait()
        stop.set()
        for th in threads:
            th.join()
    t = stats.read_text()
    if rc != 0:
        raise SystemExit(f"{name} failed (exit {rc}): {cmd}\n{(logs / f'{name}.log').read_text()[-3000:]}")
    el = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", t).group(1)
    wall = sum(float(x) * 60 ** i for i, x in enumerate(reversed(el.split(":"))))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", t).group(1)) for k in ("User", "System"))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
    s0 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    sync_s = time.perf_counter() - s0
    written = folder_bytes(output) if output is not None else 0
    if sunk is not None:
        sunk.poll(final=True)
        written = sum(sunk.sizes.values()) + sum(f.stat().st_size for f in output.rglob("*")
                                                 if f.is_file() and not f.name.endswith(".safetensors"))
    row = {"job": name, "cmd": cmd if shell else " ".join(cmd), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
           "sync_after_s": round(sync_s, 2), "peak_rss_mb": round(rss / 1024), "peak_anon_mb_sampled": round(anon[0] / 1024),
           "read_gb": round(inputs / GB, 3), "written_gb": round(written / GB, 3),
           "gb_per_s": round((inputs + written) / GB / max(wall, 0.01), 3), "cold_cache": cold,
           "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), **(extra or {})}
    if sunk is not None:
        row["sink_fsync_s"] = round(sunk.fsync_s, 1)
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    if output is not None and not keep:
        shutil.rmtree(output, ignore_errors=True)
    return row


def record(work: Path, row: dict) -> None:
    row = {**row, "load": [round(x, 2) for x in os.getloadavg()], "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def readapt_cmd() -> str:
    return str(Path(sys.executable).parent / "readapt")


# ---------------------------------------------------------------------------------------------------
# parts


def part_build(work: Path) -> None:
    pair, lora = work / "pair", work / f"lora-r{RANK}"
    todo = sum(plan_bytes(SHAPE["layers"]) for w in ("base", "instruct") if not (pair / w / "config.json").is_file())
    need_space(work, todo + 10**9, "building the 8B-shaped pair (2 × 16.06 GB) and the LoRA (0.74 GB)")
    py = sys.executable
    if todo:
        measure(work, "build-pair", [py, __file__, "_build_pair", str(pair), str(SHAPE["layers"])], 0, pair, keep=True)
    if not (lora / "adapter_config.json").is_file():
        measure(work, "build-lora", [py, __file__, "_build_lora", str(pair / "base"), str(lora)], 0, lora, keep=True)
    print(f"pair: {pair} ({folder_bytes(pair) / GB:.2f} GB), LoRA: {lora} ({folder_bytes(lora) / GB:.2f} GB)")


def part_jobs(work: Path, only: list[str] | None) -> None:
    pair, lora = work / "pair", work / f"lora-r{RANK}"
    base, inst, out = pair / "base", pair / "instruct", work / "out"
    if not (inst / "config.json").is_file() or not (lora / "adapter_config.json").is_file():
        raise SystemExit(f"no pair in {work}: run `bench_scale.py build` first")
    nb, nl = weight_bytes(base), weight_bytes(lora)
    need_space(work, 5 * 10**9, "a job writing a 16 GB checkpoint in 5 GB shards (finished shards are truncated)")
    ra, py = readapt_cmd(), sys.executable
    shards = lambda *d: " ".join(str(f) for x in d for f in sorted(x.glob("*.safetensors")))  # noqa: E731
    jobs = {
        "import-torch": ([py, "-c", "import torch"], 0, None),
        "import-readapt-cli": ([py, "-c", "import readapt.cli"], 0, None),
        "cat-pair": (f"cat {shards(base, inst)} > /dev/null", 2 * nb, None),
        "cat-base-lora": (f"cat {shards(base, lora)} > /dev/null", nb + nl, None),
        "extract": ([ra, "extract", str(base), str(inst), "-o", str(out), "--dtype", "bfloat16"], 2 * nb, out),
        "merge-0.5": ([ra, "merge", str(base), "--add", f"{inst}:0.5", "-o", str(out)], 2 * nb, out),
        "merge-lora": ([ra, "merge", str(base), "--add", str(lora), "-o", str(out)], nb + nl, out),
        "merge-lora-whole-tensors": ([ra, "merge", str(base), "--add", str(lora), "-o", str(out), "--whole-tensors"],
                                     nb + nl, out),
        "port-lora-merge-from": ([ra, "port", str(lora), "--merge", "--from", str(base), "--to", str(inst), "-o",
                                  str(out)], 2 * nb + nl, out),
        "extract-rank64-randomized": ([ra, "extract", str(base), str(inst), "-o", str(out), "--rank", str(RANK),
                                       "--svd", "randomized"], 2 * nb, out),
        "extract-rank64-gram": ([ra, "extract", str(base), str(inst), "-o", str(out), "--rank", str(RANK),
                                 "--svd", "gram"], 2 * nb, out),
        "extract-tau0.5": ([ra, "extract", str(base), str(inst), "-o", str(out), "--tau", "0.5"], 2 * nb, out),
        "extract-rank64-cuda": ([ra, "extract", str(base), str(inst), "-o", str(out), "--rank", str(RANK),
                                 "--device", "cuda"], 2 * nb, out),
        "extract-tau0.5-cuda": ([ra, "extract", str(base), str(inst), "-o", str(out), "--tau", "0.5", "--device",
                                 "cuda"], 2 * nb, out),
    }
    extra_runs = ("extract-rank64-gram", "extract-tau0.5", "merge-lora-whole-tensors", "extract-rank64-cuda",
                  "extract-tau0.5-cuda")  # slow, a comparison, or a GPU
    default = [k for k in jobs if k not in extra_runs]
    for name in only or default:
        cmd, inputs, output = jobs[name]
        measure(work, name, cmd, inputs, output, extra={"model": "8B-shaped", "layers": SHAPE["layers"]},
                sink=name in ("extract", "merge-0.5", "merge-lora", "merge-lora-whole-tensors", "port-lora-merge-from"))


def part_svd(work: Path) -> None:
    """Seconds per matrix of each shape, in this process (torch's default threads), niced."""
    import torch

    from readapt.checkpoint import Checkpoint

    try:
        from readapt.factorize import factorize
    except ImportError:
        from readapt.lowrank import factorize
    os.nice(19)
    base, inst = Checkpoint.open(work / "pair" / "base"), Checkpoint.open(work / "pair" / "instruct")
    p = "model.layers.0."
    shapes = {  # representative tensor -> how many of its shape the model has
        p + "self_attn.q_proj.weight": 64, p + "self_attn.k_proj.weight": 64, p + "mlp.gate_proj.weight": 64,
        p + "mlp.down_proj.weight": 32, "model.embed_tokens.weight": 2,
    }
    totals: dict[str, float] = {}
    for name, count in shapes.items():
        D = inst.read(name).float().sub_(base.read(name).float())
        for label, kw in (("rank64-randomized", {"rank": RANK, "svd": "randomized"}),
                          ("rank64-gram", {"rank": RANK, "svd": "gram"}), ("tau0.5-gram", {"tau": 0.5, "svd": "gram"})):
            load0 = os.getloadavg()[0]
            s = time.perf_counter()
            f = factorize(D, **kw)
            dt = time.perf_counter() - s
            totals[label] = totals.get(label, 0.0) + count * dt
            record(work, {"job": f"svd-{label}", "tensor": name, "shape": list(D.shape), "count": count,
                          "seconds": round(dt, 2), "rank": f.rank, "kept": round(f.kept / f.energy, 4),
                          "threads": torch.get_num_threads(), "load_before": round(load0, 2)})
        del D
    record(work, {"job": "svd-total-estimate", "seconds": {k: round(v, 1) for k, v in totals.items()},
                  "matrices": sum(shapes.values())})


def part_slices(work: Path, mergekit: Path, only: list[str] | None) -> None:
    ra, py = readapt_cmd(), sys.executable
    mk = mergekit / "bin" / "mergekit-extract-lora"
    runs = {
        "rank64-randomized": lambda b, t, o: [ra, "extract", str(b), str(t), "-o", str(o), "--rank", str(RANK)],
        "rank64-gram": lambda b, t, o: [ra, "extract", str(b), str(t), "-o", str(o), "--rank", str(RANK), "--svd", "gram"],
        "tau0.5": lambda b, t, o: [ra, "extract", str(b), str(t), "-o", str(o), "--tau", "0.5"],
        "rank64-dense-emb": lambda b, t, o: [ra, "extract", str(b), str(t), "-o", str(o), "--rank", str(RANK),
                                             "--embeddings", "dense", "--lm-head", "dense"],
        "mergekit-extract-lora": lambda b, t, o: [str(mk), "--model", str(t), "--base-model", str(b), "--out-path",
                                                  str(o), "--max-rank", str(RANK), "--quiet"],
    }
    chosen = only or list(runs)
    if "mergekit-extract-lora" in chosen and not mk.exists():
        raise SystemExit(f"no {mk}: make the venv (see benchmarks/README.md) or pass --mergekit")
    for layers in (1, 4):
        folder = work / f"slice{layers}"
        need_space(work, 2 * plan_bytes(layers) + 3 * 10**9, f"the {layers}-layer slice and its adapters")
        if not (folder / "instruct" / "config.json").is_file():
            measure(work, f"build-slice{layers}", [py, __file__, "_build_pair", str(folder), str(layers)], 0, folder,
                    keep=True)
        b, t, o = folder / "base", folder / "instruct", work / "out-slice"
        for name in chosen:
            row = measure(work, f"slice{layers}-{name}", runs[name](b, t, o), 2 * weight_bytes(b), o, keep=True,
                          extra={"model": f"{layers}-layer slice", "layers": layers})
            if layers == 4 and name in ("rank64-randomized", "rank64-gram", "mergekit-extract-lora"):
                from bench_lowrank import adapter_error

                record(work, {"job": f"slice4-{name}-error", **adapter_error(b, t, o), "of": row["job"]})
            shutil.rmtree(o, ignore_errors=True)
        shutil.rmtree(folder)
    results = [json.loads(x) for x in (work / "results.jsonl").read_text().splitlines()]
    last = {r["job"]: r for r in results}
    for name in chosen:
        t1, t4 = last.get(f"slice1-{name}"), last.get(f"slice4-{name}")
        if t1 and t4:
            per = (t4["wall_s"] - t1["wall_s"]) / 3
            per_cpu = (t4["cpu_s"] - t1["cpu_s"]) / 3
            record(work, {"job": f"extrapolated-{name}", "per_layer_wall_s": round(per, 1),
                          "per_layer_cpu_s": round(per_cpu, 1), "fixed_wall_s": round(t1["wall_s"] - per, 1),
                          "model_32_layers_wall_s": round(t4["wall_s"] + 28 * per),
                          "model_32_layers_cpu_s": round(t4["cpu_s"] + 28 * per_cpu),
                          "peak_rss_mb_slice1_slice4": [t1["peak_rss_mb"], t4["peak_rss_mb"]]})


def _headers(folder: Path):
    """(file, data start, header) of each safetensors file in `folder`."""
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            yield f, 8 + n, {k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"}


def tensor_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of each tensor's bytes (with dtype and shape) in a safetensors folder, read in 16 MB blocks."""
    out = {}
    for f, start, header in _headers(folder):
        with open(f, "rb") as fh:
            for name, h in header.items():
                a, b = h["data_offsets"]
                fh.seek(start + a)
                d = hashlib.sha256(f"{h['dtype']}{h['shape']}".encode())
                left = b - a
                while left:
                    chunk = fh.read(min(left, 1 << 24))
                    d.update(chunk)
                    left -= len(chunk)
                out[name] = d.hexdigest()
    return out


def ulp_compare(a_file: Path, b_folder: Path) -> dict:
    """The bf16 tensors of one safetensors file against the same names in another folder: bit-identical
    share, max distance in bf16 ulps (bit patterns mapped to ordered integers)."""
    import torch
    from safetensors import safe_open

    where = {name: f for f, _, header in _headers(b_folder) for name in header}
    same = total = worst = 0

    def ordered(t):
        u = t.view(torch.int16).int() & 0xFFFF
        return torch.where(u >= 0x8000, -(u & 0x7FFF), u)

    with safe_open(a_file, "pt") as fa:
        for name in fa.keys():
            x = fa.get_tensor(name)
            with safe_open(where[name], "pt") as fb:
                y = fb.get_tensor(name)
            d = (ordered(x) - ordered(y)).abs()
            same += int((d == 0).sum())
            total += d.numel()
            worst = max(worst, int(d.max()))
    return {"elements": total, "bit_identical": same, "share": same / total, "max_ulp": worst}


def part_mergekit(work: Path, mergekit: Path) -> None:
    """Task arithmetic at weight 0.5: readapt and mergekit on the 8B pair (time, memory; outputs drained by
    Sink), then both again on the 1-layer slice with every output tensor compared."""
    base, inst = work / "pair" / "base", work / "pair" / "instruct"
    ours, theirs = work / "out-readapt", work / "out-mergekit"
    mk = mergekit / "bin" / "mergekit-yaml"
    if not mk.exists():
        raise SystemExit(f"no {mk}: make the venv (see benchmarks/README.md) or pass --mergekit")

    def config_file(b: Path, t: Path) -> Path:
        cfg = work / "mergekit-task-arithmetic.yml"
        cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {t}\n"
                       f"    parameters:\n      weight: 0.5\ndtype: float32\nout_dtype: bfloat16\n")
        return cfg

    nb = weight_bytes(base)
    need_space(work, 5 * 10**9, "task arithmetic on the 8B pair (5 GB shards, finished ones truncated)")
    extra = {"model": "8B-shaped", "layers": SHAPE["layers"]}
    measure(work, "merge-0.5-side-by-side", [readapt_cmd(), "merge", str(base), "--add", f"{inst}:0.5", "-o", str(ours)],
            2 * nb, ours, extra=extra, sink=True)
    measure(work, "mergekit-task-arithmetic", [str(mk), str(config_file(base, inst)), str(theirs)], 2 * nb, theirs,
            extra=extra, sink=True)
    sl = work / "slice1"
    need_space(work, 4 * plan_bytes(1), "the 1-layer slice and both merged copies of it")
    if not (sl / "instruct" / "config.json").is_file():
        measure(work, "build-slice1", [sys.executable, __file__, "_build_pair", str(sl), "1"], 0, sl, keep=True)
    b, t, ns = sl / "base", sl / "instruct", weight_bytes(sl / "base")
    extra = {"model": "1-layer slice", "layers": 1}
    measure(work, "slice1-merge-0.5", [readapt_cmd(), "merge", str(b), "--add", f"{t}:0.5", "-o", str(ours)], 2 * ns,
            ours, keep=True, extra=extra)
    measure(work, "slice1-mergekit-task-arithmetic", [str(mk), str(config_file(b, t)), str(theirs)], 2 * ns, theirs,
            keep=True, extra=extra)
    d_ours, d_theirs = tensor_digests(ours), tensor_digests(theirs)
    differ = sorted(n for n in d_ours if d_ours[n] != d_theirs.get(n))
    ulps = [ulp_compare(f, theirs) for f in sorted(ours.glob("*.safetensors"))]
    record(work, {"job": "task-arithmetic-agreement", "on": "1-layer slice", "tensors": len(d_ours),
                  "tensors_bit_identical": len(d_ours) - len(differ), "differ": differ[:20],
                  "missing_in_mergekit": sorted(set(d_ours) - set(d_theirs))[:20],
                  "elements": sum(u["elements"] for u in ulps), "bit_identical": sum(u["bit_identical"] for u in ulps),
                  "max_ulp": max(u["max_ulp"] for u in ulps)})
    for folder in (ours, theirs, sl):
        shutil.rmtree(folder)


def _ulp_stats(a, b) -> dict:
    """Share of bit-identical elements and the largest distance in ulps of two float tensors of one dtype."""
    import torch

    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    mask = (1 << (8 * a.element_size() - 1)) - 1

    def ordered(t):
        i = t.contiguous().view(bits).long()
        return torch.where(i < 0, -(i & mask), i)

    d = (ordered(a) - ordered(b)).abs()
    return {"elements": d.numel(), "bit_identical_share": round(float((d == 0).double().mean()), 6), "max_ulp": int(d.max())}


def part_exactness(work: Path) -> None:
    """Blocked LoRA/DoRA terms against the whole-tensor arithmetic at Llama-3-8B shapes.

    1. LoRA, every matrix shape of the 8B model (rank 64, float32 factors): `LoraTerm.rows` over
       `checkpoint.row_spans` against the rows of `LoraTerm.delta` (PEFT's product B·A, transposed for
       the embedding), bit for bit or not, one shape at a time (the embedding's product is 2.1 GB).
    2. PEFT's own merge_and_unload of a DoRA and a LoRA adapter (rank 64) on an Embedding and a Linear
       lm_head of 128256 × 1024 (the 8B vocabulary; dimension 1024 to fit beside other jobs) against
       `readapt merge` (blocks of rows, and --whole-tensors), float32: share bit for bit, max ulp."""
    import torch

    from readapt.addends import LoraTerm
    from readapt.checkpoint import row_spans

    s, r = SHAPE, RANK
    kv = s["hidden"] // s["heads"] * s["kv_heads"]
    shapes = {"q_proj/o_proj": (s["hidden"], s["hidden"]), "k_proj/v_proj": (kv, s["hidden"]),
              "gate_proj/up_proj": (s["intermediate"], s["hidden"]), "down_proj": (s["hidden"], s["intermediate"]),
              "lm_head": (s["vocab"], s["hidden"]), "embed_tokens (transposed)": (s["vocab"], s["hidden"])}
    g = torch.Generator().manual_seed(0)
    for label, (rows, cols) in shapes.items():
        transposed = label.startswith("embed")
        B = torch.randn(cols if transposed else rows, r, generator=g) * 0.01
        A = torch.randn(r, rows if transposed else cols, generator=g) / cols ** 0.5
        term = LoraTerm(B, A, 2.0, transposed)
        whole = term.delta()
        spans = row_spans((rows, cols))
        same = all(torch.equal(term.rows(r0, r1), whole[r0:r1]) for r0, r1 in spans)
        record(work, {"job": "exactness-lora-rows", "shape": label, "rows_cols": [rows, cols], "rank": r,
                      "blocks": len(spans), "bit_for_bit": same, "threads": torch.get_num_threads()})
        del whole, term, A, B
    _peft_exactness(work)


def _peft_exactness(work: Path, vocab: int | None = None, dim: int = 1024) -> None:
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from torch import nn

    import readapt

    vocab = vocab or SHAPE["vocab"]

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, dim)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = Inner(), nn.Linear(dim, vocab, bias=False)

    root = work / "exactness"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    torch.manual_seed(0)
    m = Model()
    base = root / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, base / "model.safetensors")
    for dora in (False, True):
        pm = get_peft_model(m, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["embed_tokens", "lm_head"],
                                          use_dora=dora))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "lora_embedding_B" in n:
                    p.normal_(0, 0.01)
                if "magnitude" in n:
                    p.mul_(1 + 0.1 * torch.rand_like(p))
        ad = root / ("dora" if dora else "lora")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(ad)
        want = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
        del pm
        m = Model()  # the base again (merge_and_unload merged into the module)
        m.load_state_dict(load_file(base / "model.safetensors"))
        for whole in (False, True):
            out = readapt.merge(base, root / "out", [(ad, 1.0)], whole_tensors=whole, overwrite=True)
            got = load_file(out / "model.safetensors")
            for name, w in want.items():
                record(work, {"job": "exactness-peft", "adapter": "DoRA" if dora else "LoRA", "tensor": name,
                              "shape": list(w.shape), "path": "whole tensors" if whole else "row blocks",
                              **_ulp_stats(got[name], w), "threads": torch.get_num_threads()})
            del got
        del want
    shutil.rmtree(root)


def part_table(work: Path) -> None:
    rows = [json.loads(x) for x in (work / "results.jsonl").read_text().splitlines()]
    print("| job | wall s | CPU s | peak RSS MB | anon MB (sampled) | GB read + written | GB/s | load before → after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "wall_s" in r:
            print(f"| {r['job']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']} | {r['peak_anon_mb_sampled']} "
                  f"| {r['read_gb']:.2f} + {r['written_gb']:.2f} | {r['gb_per_s']:.3f} | {r['load_before'][0]} → "
                  f"{r['load_after'][0]} |")
    for r in rows:
        if "wall_s" not in r:
            print(json.dumps(r))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_build_pair":  # child processes, measured by the parent
        build_pair(Path(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_build_lora":
        build_lora(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("build", "jobs", "svd", "slices", "mergekit", "exactness", "table"))
    ap.add_argument("--work", type=Path, default=None, help="default: $READAPT_SCALE_DIR or /work/scale-bench")
    ap.add_argument("--mergekit", type=Path, default=Path("/work/mk-venv"), help="venv with mergekit 0.1.5")
    ap.add_argument("--only", nargs="+", default=None, help="jobs/slices: these runs only")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 256, vocab 1024: a smoke test of this script")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache before each run")
    a = ap.parse_args()
    if a.warm:
        os.environ["READAPT_SCALE_WARM"] = "1"
    if a.tiny and os.environ.get("READAPT_SCALE_SHAPE") != "tiny":  # re-run with the shape set for the children too
        os.environ["READAPT_SCALE_SHAPE"] = "tiny"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    work = work_dir(a.work)
    if a.part == "build":
        part_build(work)
    elif a.part == "jobs":
        part_jobs(work, a.only)
    elif a.part == "svd":
        part_svd(work)
    elif a.part == "slices":
        part_slices(work, a.mergekit, a.only)
    elif a.part == "mergekit":
        part_mergekit(work, a.mergekit)
    elif a.part == "exactness":
        part_exactness(work)
    else:
        part_table(work)


if __name__ == "__main__":
    main()
