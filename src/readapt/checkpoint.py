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

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import struct
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from readapt.errors import ReadaptError, os_error
from readapt.userfiles import BOOL, NON_NEGATIVE_INT, STRING, STRINGS, check_fields, load, members, \
    open_regular

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what readapt computes in and writes


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16; None stays None. Only OUTPUT_DTYPES: float8
    variants are storage formats without the arithmetic a merge needs."""
    if name is None:
        return None
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}
    dt = name if isinstance(name, torch.dtype) else getattr(torch, aliases.get(name, name), None) \
        if isinstance(name, str) else None
    if dt not in OUTPUT_DTYPES:
        raise ReadaptError(f"dtype {name!r} is not one readapt computes in or writes: use float32, bfloat16, "
                           f"float16 or float64")
    return dt


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '2GiB', '1.5GB', or a plain number of bytes (at least 1)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    value = float(m.group(1)) * (1024 if m.group(3) else 1000) ** ("KMGT".find(m.group(2).upper()) + 1 if
                                                                    m.group(2) else 0) if m else math.nan
    if isinstance(size, bool) or not 1 <= value < math.inf:
        raise ReadaptError(f"cannot read size {size!r}: write it like 5GB, 500MB or 1000000 (bytes, at least 1)")
    return int(value)


def parse_device(device: str | None, default: str = "cpu") -> torch.device:
    """'cpu', 'cuda', 'cuda:1', 'mps'... -> torch.device, refused unless torch can use it here (a one-line
    error instead of torch's AssertionError inside `.to()`)."""
    try:
        dev = torch.device(device or default)
    except (RuntimeError, TypeError):
        raise ReadaptError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        gpu = "CUDA GPU" if dev.type == "cuda" else f"{dev.type} device"
        raise ReadaptError(f"--device {device or default}: no {gpu} is visible to torch here; use --device cpu")
    if dev.index is not None and dev.index >= getattr(backend, "device_count", lambda: 1)():
        raise ReadaptError(f"--device {device}: torch sees only {backend.device_count()} {dev.type} device(s) "
                           f"here (numbered from 0)")
    return dev


# ---------------------------------------------------------------------------------------------------
# reading

MAX_HEADER = 100_000_000  # bytes of JSON per safetensors file: safetensors' own MAX_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range [start, end)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header: exactly the format's rules, as safetensors checks them.

        8 bytes   N, little-endian u64, at most MAX_HEADER (else "header too large", before reading it)
        N bytes   UTF-8 JSON starting with '{': {name: {"dtype", "shape", "data_offsets"}, ...,
                  "__metadata__": {str: str}}; keys unique and valid Unicode (userfiles.members)
                  dtype: one of DTYPES; shape: integers >= 0 whose running product stays below 2**64
                  data_offsets: [begin, end] integers, end - begin = prod(shape) * itemsize
        the rest  the tensors' data: sorted by offset they tile it exactly, from 0 to the end of the
                  file, with no gap or overlap

    Memory: the header text plus one TensorInfo per tensor (shapes shared); the JSON is parsed one
    member at a time, never as one dict of dicts. Time: linear in N.
    """
    bad = f"{path} is not a valid safetensors file"
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ReadaptError(f"{bad}: it is {size} bytes long (truncated?). Re-download or re-create it.")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise ReadaptError(f"{bad}: header too large ({n} bytes; the cap is {MAX_HEADER}, as in safetensors)")
        if n > size - 8:
            raise ReadaptError(f"{bad}: header length {n} exceeds the file size {size} (truncated or corrupt)")
        raw = f.read(n)
    if raw[:1] != b"{":
        raise ReadaptError(f"{bad}: its header does not start with '{{' (the file is corrupt)")
    infos: dict[str, TensorInfo] = {}
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
    entries = members(raw, f"the header of {path}")
    del raw  # the parser keeps only the decoded text
    for name, entry in entries:
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ReadaptError(f"{bad}: __metadata__ must map strings to strings (the file is corrupt)")
            continue
        infos[name] = _tensor_info(path, name, entry, 8 + n, bad, shapes)
    _check_tiling(infos, 8 + n, size, bad)
    return infos


_U64 = 1 << 64


def _tensor_info(path: Path, name: str, h, base: int, bad: str, shapes: dict) -> TensorInfo:
    """One header entry, checked: the format's types (safetensors' serde types: usize, not float or bool),
    a dtype readapt reads, and a byte span that matches dtype and shape. `shapes` interns equal shapes."""
    if type(h) is not dict or not {"dtype", "shape", "data_offsets"} <= h.keys():
        raise ReadaptError(f"{bad}: tensor {name!r} has a malformed header entry (need dtype, shape and "
                           f"data_offsets): {str(h)[:80]}")
    dtype = DTYPES.get(h["dtype"]) if type(h["dtype"]) is str else None
    if dtype is None:
        raise ReadaptError(f"{bad}: tensor {name!r} has dtype {str(h['dtype'])[:40]!r}; readapt reads "
                           f"{', '.join(DTYPES)}")
    shape, offsets = h["shape"], h["data_offsets"]
    both = shape + offsets if type(shape) is list and type(offsets) is list and len(offsets) == 2 else [-1]
    if not (_INT.issuperset(map(type, both)) and min(both) >= 0 and max(both) < _U64):  # serde's usize
        raise ReadaptError(f"{bad}: tensor {name!r} has shape {str(shape)[:60]} and data_offsets "
                           f"{str(offsets)[:60]}; both must be lists of integers >= 0 (two offsets)")
    numel = math.prod(shape)
    if numel >= _U64 or (numel == 0 and any(math.prod(shape[:i]) >= _U64 for i in range(2, len(shape)))):
        raise ReadaptError(f"{bad}: tensor {name!r} has shape {shape}, whose size overflows 64 bits")
    if shape and max(shape) >= 1 << 63:
        raise ReadaptError(f"{bad}: tensor {name!r} has a dimension of 2**63 or more, which torch cannot hold")
    start, end = offsets
    if end - start != numel * dtype.itemsize:
        raise ReadaptError(f"{bad}: tensor {name!r} claims shape {shape} {h['dtype']} but spans {end - start} "
                           f"bytes")
    shape = tuple(shape)
    return TensorInfo(path, dtype, shapes.setdefault(shape, shape), base + start, base + end)


_INT = {int}  # not bool, not float


def _check_tiling(infos: dict[str, TensorInfo], base: int, size: int, bad: str) -> None:
    """Sorted by (start, end), the tensors' spans must tile [base, size) exactly, as safetensors requires:
    no gap (a hidden payload), no overlap, nothing after the last tensor."""
    at = base
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start != at:
            name = next(k for k, v in infos.items() if v is info)
            where = "overlaps the tensor before it" if info.start < at else f"leaves a gap of {info.start - at} bytes"
            raise ReadaptError(f"{bad}: tensor {name!r} {where} in the data section (the file is corrupt)")
        at = info.end
    if at != size:
        what = f"ends at byte {at} but the file has {size} bytes"
        hint = "(truncated download?). Re-download or re-create it." if at > size else "(trailing bytes: corrupt)"
        raise ReadaptError(f"{bad}: the tensor data {what} {hint}")


def resolve_model(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder, or a model id ("org/name", optional "@revision") already in the local HF cache.

    Never touches the network: the cache is looked up with huggingface_hub's
    `snapshot_download(local_files_only=True)`. An empty string is refused (not the current folder).
    """
    if not str(spec).strip():
        raise ReadaptError("an empty path was given where a checkpoint folder or model id is expected")
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


# the config.json fields readapt itself reads, and what they must be (transformers checks the rest)
CONFIG_FIELDS = {"model_type": STRING, "architectures": STRINGS, "tie_word_embeddings": BOOL,
                 "max_position_embeddings": NON_NEGATIVE_INT, "vocab_size": NON_NEGATIVE_INT}


def read_config(folder: Path) -> dict | None:
    """`folder`/config.json, checked (userfiles.load, CONFIG_FIELDS), or None if there is none."""
    file = folder / "config.json"
    if not os.path.lexists(file):
        return None
    return check_fields(load(file), file, CONFIG_FIELDS)


def hub_repo(folder: Path) -> Path | None:
    """The repo cache (`.../models--org--name`) of a Hugging Face cache snapshot folder, else None."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return None


def weight_file(folder: Path, name: str | Path) -> Path:
    """`folder`/`name`, refused unless it lies inside `folder` once links are followed (a Hugging Face
    cache snapshot's files link into its repo's blobs/: exactly that is allowed too), so that an index or
    a link cannot make readapt read, and then let an output replace, another model's files."""
    file = folder / name
    real = file.resolve()
    repo = hub_repo(folder)
    roots = [folder.resolve()] + ([repo / "blobs"] if repo else [])
    if not any(root in real.parents for root in roots):
        raise ReadaptError(f"{file} lies outside the checkpoint folder {folder} (it is {real}); readapt reads only "
                           f"weight files inside the folder: copy the file in, or pass the folder that holds it")
    return file


class Checkpoint:
    """The tensors of a checkpoint folder (model, delta or PEFT adapter), read one at a time.

    Layouts: `model.safetensors`; shards + `*.safetensors.index.json`; `adapter_model.safetensors`;
    any other `*.safetensors` files; pickled `pytorch_model*.bin` only with `allow_pickle=True`
    (then `torch.load(weights_only=True, mmap=True)`). Every weight file must be a regular file inside
    the folder (`weight_file`); config.json, if present, is checked by `read_config`.
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
        config = read_config(path)
        index = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        pickles = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if index:
            infos, pickled = _read_index(path, index[0]), False
        elif files:
            infos, pickled = {}, False
            for f in files:
                for name, info in read_header(weight_file(path, f.name)).items():
                    if name in infos:
                        raise ReadaptError(f"tensor {name!r} is stored twice in {path} ({infos[name].file.name} "
                                           f"and {f.name}); remove the stray file")
                    infos[name] = info
        elif pickles and not allow_pickle:
            raise ReadaptError(
                f"{path} holds only pickled weights ({', '.join(p.name for p in pickles[:3])}); readapt does "
                f"not unpickle by default. Convert them to safetensors, or pass --allow-pickle "
                f"(allow_pickle=True) to read them with torch.load(weights_only=True)."
            )
        elif pickles:
            infos, pickled = _read_pickles([weight_file(path, p.name) for p in pickles]), True
        else:
            raise ReadaptError(f"no weights in {path}: expected *.safetensors files (or a .safetensors.index.json)")
        if not infos:
            raise ReadaptError(f"no tensors in {path}: its weight files are empty")
        return cls(path, infos, config, pickled)

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
        with open_regular(info.file) as f:
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
    weight_map = load(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ReadaptError(f"{index_file} is not a valid index: its weight_map must map tensor names to shard "
                           f"file names")
    headers: dict[str, dict[str, TensorInfo]] = {}
    infos: dict[str, TensorInfo] = {}
    for name, fname in weight_map.items():
        if fname not in headers:
            shard = weight_file(path, fname)
            if not os.path.lexists(shard):
                raise ReadaptError(f"{index_file.name} lists shard {fname} but {shard} does not exist "
                                   f"(incomplete download?)")
            headers[fname] = read_header(shard)
        if name not in headers[fname]:
            raise ReadaptError(f"{index_file.name} says tensor {name!r} is in {fname}, but it is not there")
        infos[name] = headers[fname][name]
    return dict(sorted(infos.items(), key=lambda kv: (str(kv[1].file), kv[1].start)))


def _read_pickles(files: Sequence[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for f in files:
        open_regular(f).close()  # a FIFO would block torch.load
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
    with open_regular(info.file) as f:
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


def check_output(path: str | os.PathLike, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The absolute output path, after the checks `output_folder` makes before any work: not an existing
    folder unless `overwrite`, not a file, a name the file system can hold, and no overlap with an input
    (the output is not, does not contain and does not lie inside any input, nor, for a Hugging Face cache
    snapshot, the repo's blobs/ that its files link to: every file a job reads is guarded)."""
    if not str(path).strip():
        raise ReadaptError("an empty output path was given (it would mean the current folder); choose another -o")
    out = Path(path).expanduser().absolute()
    if len(os.fsencode(out.name)) > _name_max(out):
        raise ReadaptError(f"output name {out.name[:40]}... is {len(os.fsencode(out.name))} bytes long; the file "
                           f"system allows {_name_max(out)}: choose a shorter -o")
    o = out.resolve()
    for src in inputs:
        src = Path(src).expanduser()
        repo = hub_repo(src) if src.is_dir() else None
        for guarded in [src.resolve()] + ([repo / "blobs"] if repo else []):
            if o == guarded or guarded in o.parents or o in guarded.parents:
                raise ReadaptError(f"output folder {out} overlaps the input {guarded}; choose another -o")
    if out.exists() and not overwrite:
        raise ReadaptError(f"output folder {out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise ReadaptError(f"output path {out} is a file, not a folder")
    return out


@contextmanager
def output_folder(path: str | os.PathLike, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it to `path`, on any failure delete it.

    Refuses what `check_output` refuses, and a `path` that another run is writing: an exclusive lock
    (flock) on `.NAME.readapt-lock` beside it is held until the output is committed. Under the lock it
    removes temporary siblings that dead runs left (`.NAME.readapt-tmp-PID`, PID not running: a SIGKILL or
    a power cut). On failure the parent folders it created are removed too. Signals (Ctrl-C, SIGTERM,
    SIGHUP, SIGQUIT) are ignored while the output is committed or removed, so a second Ctrl-C cannot
    leave half of it. An OSError inside (a full disk, a name too long) becomes a one-line ReadaptError.
    Sibling names are shortened (with a hash) to fit the file system's name limit.
    """
    out = check_output(path, overwrite, inputs)
    created = [p for p in out.parents if not p.exists()]  # deepest first
    done = False
    try:
        with _locked(out):
            check_output(out, overwrite)  # again, under the lock: the run that held it may have just written it
            _remove_stale(out)
            tmp = _sibling(out, f"tmp-{os.getpid()}")
            try:
                tmp.mkdir()
                yield tmp
                with _signals_ignored():
                    _commit(tmp, out, overwrite)
            except BaseException as err:
                with _signals_ignored():
                    shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(err, OSError):
                    raise os_error(err, f"nothing was written to {out}") from None
                raise
        done = True
    except OSError as err:  # creating the parent folders or the lock
        raise os_error(err, f"cannot create the output folder {out}; choose another -o") from None
    finally:
        if not done:
            with _signals_ignored():
                for p in created:
                    try:
                        p.rmdir()
                    except OSError:
                        break


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:  # created by something else than a readapt run while this one worked
            raise ReadaptError(f"output folder {out} appeared while the job ran; pass --overwrite to replace it")
        trash = _sibling(out, f"old-{os.getpid()}")
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def _name_max(out: Path) -> int:
    """The longest file name (bytes) the file system holding `out` allows (255 on ext4, xfs, btrfs)."""
    for folder in out.parents:
        if folder.exists():
            try:
                return os.pathconf(folder, "PC_NAME_MAX")
            except (OSError, ValueError, AttributeError):
                break
    return 255


def _sibling(out: Path, tag: str) -> Path:
    """`.NAME.readapt-TAG` beside `out`; NAME is shortened to a prefix plus a hash of the whole name when
    the result could exceed the name limit (with any TAG up to 24 bytes), so any valid -o works."""
    room = _name_max(out) - len(".") - len(".readapt-") - 24
    stem = out.name
    if len(os.fsencode(stem)) > room:
        digest = hashlib.sha256(os.fsencode(stem)).hexdigest()[:16]
        stem = os.fsencode(stem)[: room - 17].decode("utf-8", "ignore") + "-" + digest
    return out.parent / f".{stem}.readapt-{tag}"


def _remove_stale(out: Path) -> None:
    """Remove `out`'s temporary siblings whose run is gone (called under the lock, so none is being
    written by a live readapt run; the PID check keeps those of an older readapt that did not lock)."""
    prefix = _sibling(out, "").name
    for p in out.parent.glob(glob.escape(prefix) + "*-*"):
        kind, _, pid = p.name[len(prefix):].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on `.NAME.readapt-lock` beside `out` (created, and removed after). The
    lock is re-taken if the file was replaced between open and flock (another run removing it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _sibling(out, "lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ReadaptError(f"another readapt run is writing {out} (it holds {lock}); wait for it to end or "
                               f"choose another -o") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


_SIGNALS = [getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, s)]


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM, SIGHUP and SIGQUIT while a commit or a cleanup runs (the job is ending
    anyway); only the main thread can set handlers, elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


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
