"""Checkpoint streaming: read a Hugging Face checkpoint one tensor at a time, write one shard at a time.

Every checkpoint job in readapt (extract, merge, compress, port) goes through this module:

    ckpt = Checkpoint.open("meta-llama/Llama-3.1-8B")      # folder, or model id in the local HF cache
    with output_folder(out, overwrite=False, inputs=[ckpt.path]) as tmp:
        write_tensors(tmp, plan, ((n, f(ckpt.read(n))) for n, *_ in plan))

Why not `safetensors.safe_open` / `save_file`? `safe_open` memory-maps the whole file, and every page a
job touches stays in its resident set until the file is closed, so peak RSS (as `/usr/bin/time -v`
counts it) grows with the shard size; `save_file` needs the whole shard in memory. Here a tensor is read
with one `readinto` into a buffer we own and written with one `write`, so memory is bounded by the
largest tensor; elementwise jobs (extract, delta/checkpoint merges) go further and read, combine and
write aligned blocks of 1M elements (`aligned_blocks`, `Blocks`), so no tensor is ever held whole. The
format is plain safetensors (8-byte header length, JSON header, raw little-endian data) and the tests
check that safetensors itself loads what we write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from readapt.errors import ReadaptError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}
    dt = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ReadaptError(f"unknown dtype {name!r}: use float32, bfloat16, float16 or float64")
    return dt


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '2GiB', or a plain number of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ReadaptError(f"cannot read size {size!r}: write it like 5GB, 500MB or 1000000")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


# ---------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range [start, end)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; raises ReadaptError for a corrupt or truncated file."""
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ReadaptError(f"{bad}: it is {size} bytes long (truncated?). Re-download or re-create it.")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ReadaptError(f"{bad}: header length {n} exceeds the file size {size} (truncated or corrupt)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReadaptError(f"{bad}: its header is not JSON ({err}); the file is corrupt") from None
    header.pop("__metadata__", None)
    base, infos, spans = 8 + n, {}, []
    for name, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            shape = tuple(int(d) for d in h["shape"])
            start, end = (int(o) for o in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ReadaptError(f"{bad}: tensor {name!r} has a malformed header entry {h!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * dtype.itemsize or start < 0:
            raise ReadaptError(f"{bad}: tensor {name!r} claims shape {list(shape)} {h['dtype']} "
                               f"but spans {end - start} bytes")
        if base + end > size:
            raise ReadaptError(f"{bad}: tensor {name!r} ends at byte {base + end} but the file has only "
                               f"{size} bytes (truncated download?). Re-download or re-create it.")
        infos[name] = TensorInfo(path, dtype, shape, base + start, base + end)
        spans.append((start, end))
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise ReadaptError(f"{bad}: tensors overlap in the data section (corrupt file)")
    return infos


def resolve_model(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder, or a model id ("org/name", optional "@revision") already in the local HF cache.

    Never touches the network: the cache is looked up with huggingface_hub's
    `snapshot_download(local_files_only=True)`.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ReadaptError(f"{path} is a file; pass the checkpoint folder that contains it")
        return path
    text = str(spec)
    repo_id, _, revision = text.partition("@")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) is None:
        raise ReadaptError(f"{text!r} does not exist: pass a checkpoint folder or a model id like org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        from huggingface_hub import constants

        where = cache_dir or constants.HF_HUB_CACHE
        raise ReadaptError(
            f"{text!r} is neither a local folder nor a model in the local Hugging Face cache ({where}). "
            f"readapt works offline: download it first (`hf download {repo_id}`) or pass a folder path."
        ) from None


class Checkpoint:
    """The tensors of a checkpoint folder (model, delta or PEFT adapter), read one at a time.

    Layouts: `model.safetensors`; shards + `*.safetensors.index.json`; `adapter_model.safetensors`;
    any other `*.safetensors` files; pickled `pytorch_model*.bin` only with `allow_pickle=True`
    (then `torch.load(weights_only=True, mmap=True)`).
    """

    def __init__(self, path: Path, infos: dict[str, TensorInfo], config: dict | None, pickled: bool = False):
        self.path = path
        self.infos = infos
        self.config = config
        self.pickled = pickled
        self._pickle_cache: tuple[Path, dict] | None = None

    @classmethod
    def open(cls, spec: str | os.PathLike, allow_pickle: bool = False) -> Checkpoint:
        path = resolve_model(spec)
        config = None
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            return cls(path, _read_index(path, index[0]), config)
        files = sorted(path.glob("*.safetensors"))
        if files:
            infos: dict[str, TensorInfo] = {}
            for f in files:
                for name, info in read_header(f).items():
                    if name in infos:
                        raise ReadaptError(f"tensor {name!r} is stored twice in {path} ({infos[name].file.name} "
                                           f"and {f.name}); remove the stray file")
                    infos[name] = info
            return cls(path, infos, config)
        pickles = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles and not allow_pickle:
            raise ReadaptError(
                f"{path} holds only pickled weights ({', '.join(p.name for p in pickles[:3])}); readapt does "
                f"not unpickle by default. Convert them to safetensors, or pass --allow-pickle "
                f"(allow_pickle=True) to read them with torch.load(weights_only=True)."
            )
        if pickles:
            return cls(path, _read_pickles(pickles), config, pickled=True)
        raise ReadaptError(f"no weights in {path}: expected *.safetensors files (or a .safetensors.index.json)")

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.infos[name].dtype

    @property
    def nbytes(self) -> int:
        return sum(i.end - i.start for i in self.infos.values())

    def stored(self, name: str) -> torch.Tensor | TensorInfo:
        """What `write_tensors` needs to copy `name` unchanged: its location (safetensors, copied in
        blocks without loading it) or, for pickled checkpoints, the tensor."""
        return self.read(name) if self.pickled else self.infos[name]

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, in a fresh buffer the caller owns (safe to modify in place)."""
        info = self.infos[name]
        if self.pickled:
            return self._read_pickled(name, info)
        buf = torch.empty(info.end - info.start, dtype=torch.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(buf.numpy())
        if got != buf.numel():
            raise ReadaptError(f"{info.file} was truncated while reading tensor {name!r}")
        return buf.view(info.dtype).view(info.shape)

    def _read_pickled(self, name: str, info: TensorInfo) -> torch.Tensor:
        if self._pickle_cache is None or self._pickle_cache[0] != info.file:
            self._pickle_cache = (info.file, torch.load(info.file, map_location="cpu", weights_only=True, mmap=True))
        return self._pickle_cache[1][name].clone()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.infos)} tensors)"


def _read_index(path: Path, index_file: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ReadaptError(f"{index_file} is not a valid index (no weight_map: {err})") from None
    headers: dict[str, dict[str, TensorInfo]] = {}
    infos: dict[str, TensorInfo] = {}
    for name, fname in weight_map.items():
        if fname not in headers:
            shard = path / fname
            if not shard.is_file():
                raise ReadaptError(f"{index_file.name} lists shard {fname} but {shard} does not exist "
                                   f"(incomplete download?)")
            headers[fname] = read_header(shard)
        if name not in headers[fname]:
            raise ReadaptError(f"{index_file.name} says tensor {name!r} is in {fname}, but it is not there")
        infos[name] = headers[fname][name]
    return dict(sorted(infos.items(), key=lambda kv: (kv[1].file.name, kv[1].start)))


def _read_pickles(files: Sequence[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many types for bad pickles
            raise ReadaptError(f"cannot read {f} with torch.load(weights_only=True): {err}") from None
        for name, t in sd.items():
            if isinstance(t, torch.Tensor):
                infos[name] = TensorInfo(f, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
    return infos


# ---------------------------------------------------------------------------------------------------
# writing


def is_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`. A float32 sum is ~40x faster than isfinite().all() on CPU and is finite
    whenever every element is, unless it overflows: only then is the exact check run."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())

Plan = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def shard_plan(plan: Plan, max_shard_bytes: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split `plan` in order into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        n = _nbytes(entry[1], entry[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


COPY_BLOCK = 1 << 24  # bytes per block when a stored tensor is copied unchanged
BLOCK = 1 << 20  # elements per float32 work block of an elementwise job (4 MB: stays in cache while checked)


@dataclass
class Blocks:
    """A tensor computed block by block: its dtype and shape, and its elements as consecutive 1-D blocks.
    `write_tensors` writes each block as it comes, so the whole tensor never exists in memory."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    blocks: Iterable[torch.Tensor]


def aligned_blocks(*stored: TensorInfo | torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The same BLOCK-element slice of each of `stored` (`Checkpoint.stored` values of one shape), read
    side by side, in their stored dtypes."""
    return zip(*(read_blocks(s, BLOCK * s.dtype.itemsize) for s in stored))


def float32_view(block: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """`block` as float32: itself if it is float32, else converted into the reused buffer `buf`."""
    return block if block.dtype == torch.float32 else buf[: block.numel()].copy_(block)


def read_blocks(stored: TensorInfo | torch.Tensor, nbytes: int | None = None) -> Iterator[torch.Tensor]:
    """A tensor as consecutive 1-D blocks of at most `nbytes` bytes (whole elements), in its stored dtype.

    `stored` is what `Checkpoint.stored` returns: a safetensors location, read block by block into one
    reused buffer (each block is valid until the next one is read), or a tensor, split into views.
    Default block: COPY_BLOCK bytes."""
    nbytes = nbytes or COPY_BLOCK
    if isinstance(stored, torch.Tensor):
        yield from stored.reshape(-1).split(max(1, nbytes // stored.element_size()))
        return
    info, size = stored, stored.dtype.itemsize
    step = max(size, nbytes // size * size)
    buf = torch.empty(min(step, info.end - info.start), dtype=torch.uint8)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        left = info.end - info.start
        while left:
            view = buf[: min(left, buf.numel())]
            if f.readinto(view.numpy()) != view.numel():
                raise ReadaptError(f"{info.file} was truncated while reading a tensor")
            left -= view.numel()
            yield view.view(info.dtype)


def write_tensors(folder: Path, plan: Plan, tensors: Iterable[tuple[str, torch.Tensor | TensorInfo | Blocks]], *,
                  prefix: str = "model", max_shard_size: int | str = "5GB",
                  metadata: dict[str, str] | None = None, check_finite: bool = True) -> list[Path]:
    """Stream `tensors` (in `plan` order, matching its dtypes and shapes) into safetensors shards.

    One shard -> `{prefix}.safetensors`; several -> `{prefix}-0000i-of-0000n.safetensors` plus
    `{prefix}.safetensors.index.json` (the layout transformers and peft load). Each shard's header is
    written first from the plan, then each tensor's bytes as it arrives: one tensor in memory at a time.
    A TensorInfo instead of a tensor (`Checkpoint.stored`) is copied unchanged from its file in 16 MB
    blocks; a `Blocks` is written block by block as it is computed. Non-finite values raise ReadaptError naming the tensor (check_finite=False: the caller
    checked the tensors it computed; copied blocks are always checked).
    """
    folder = Path(folder)
    shards = shard_plan(plan, parse_size(max_shard_size))
    names = [f"{prefix}.safetensors"] if len(shards) == 1 else [
        f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    it = iter(tensors)
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards):
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, dtype, shape in shard:
            n = _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, dtype, shape in shard:
                got_name, t = next(it)
                if got_name != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"writer expected {name} {dtype} {list(shape)}, got {got_name} "
                                       f"{t.dtype} {list(t.shape)}")  # a bug in the job, not user input
                copied = isinstance(t, TensorInfo)
                blocks = read_blocks(t) if copied else t.blocks if isinstance(t, Blocks) else [t.contiguous().view(-1)]
                written = 0
                for block in blocks:
                    if (copied or check_finite) and not is_finite(block):
                        raise ReadaptError(f"tensor {name!r} has NaN/Inf values; nothing was written. Check the "
                                           f"inputs and scales (a NaN in an input tensor propagates).")
                    f.write(block.view(torch.uint8).numpy().data)
                    written += block.numel() * block.element_size()
                if written != _nbytes(dtype, shape):
                    raise RuntimeError(f"writer got {written} bytes for {name}, expected {_nbytes(dtype, shape)}")
                weight_map[name] = fname
                t = block = blocks = None  # not held while the producer computes the next tensor
        total += offset
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names]


def write_file(path: Path, tensors: Iterable[tuple[str, torch.Tensor]],
               metadata: dict[str, str] | None = None) -> Path:
    """Stream tensors whose shapes are not known in advance into one safetensors file.

    Data goes to a spool file first (one tensor in memory at a time); the header is then written and
    the spool copied after it in chunks. Used for adapters, whose ranks are known only after each SVD.
    """
    path = Path(path)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    spool = path.with_name(path.name + ".spool")
    offset = 0
    with open(spool, "wb") as f:
        for name, t in tensors:
            if not is_finite(t):
                raise ReadaptError(f"tensor {name!r} has NaN/Inf values; nothing was written")
            n = t.numel() * t.element_size()
            header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
            offset += n
            del t  # not held while the producer computes the next tensor
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out, open(spool, "rb") as src:
        out.write(struct.pack("<Q", len(raw)) + raw)
        shutil.copyfileobj(src, out, 1 << 24)
    spool.unlink()
    return path


@contextmanager
def output_folder(path: str | os.PathLike, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it to `path`, on any failure delete it.

    Refuses an existing `path` unless `overwrite`, and refuses a `path` that is (or contains, or lies
    inside) one of the `inputs`, so a job can never clobber what it reads.
    """
    out = Path(path).expanduser().absolute()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        o = out.resolve()
        if o == src or src in o.parents or o in src.parents:
            raise ReadaptError(f"output folder {out} overlaps the input {src}; choose another -o")
    if out.exists() and not overwrite:
        raise ReadaptError(f"output folder {out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise ReadaptError(f"output path {out} is a file, not a folder")
    tmp = out.parent / f".{out.name}.readapt-tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        raise ReadaptError(f"cannot create the output folder {out}: {err.strerror or err} "
                           f"({err.filename or out.parent}); choose another -o") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.readapt-old-{os.getpid()}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy everything but weights and README from checkpoint folder `src` (config, generation config,
    tokenizer, chat template, ...) into `dst`; returns the names copied."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name != "README.md" \
                and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied


def progress(total_bytes: int, desc: str):
    """A tqdm bar counting bytes (quiet when stderr is not a terminal and READAPT_PROGRESS is unset)."""
    from tqdm.auto import tqdm

    quiet = not sys.stderr.isatty() and not os.environ.get("READAPT_PROGRESS")
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=quiet, leave=False)


# ---------------------------------------------------------------------------------------------------
# configs

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
