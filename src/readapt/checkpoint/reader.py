"""Reading checkpoints: a Hugging Face folder (or a model id in the local cache) one tensor at a time.

    ckpt = Checkpoint.open("meta-llama/Llama-3.1-8B", ReadOptions())   # folder, or model id in the HF cache
    ckpt.names, ckpt.shape(n), ckpt.dtype(n)                            # from the headers alone
    ckpt.read(n)                                                        # one tensor, in a buffer we own
    for a, b in aligned_blocks(x.stored(n), y.stored(n)): ...           # BLOCK elements of each, side by side
    for r0, r1 in row_spans(ckpt.shape(n)): read_rows(ckpt.stored(n), r0, r1)   # blocks of whole rows

This module and the rest of readapt.checkpoint are the only code that touches weight files. Why not
`safetensors.safe_open`? By default it memory-maps the whole file, and every page a job touches stays in
its resident set until the file is closed, so peak RSS (as `/usr/bin/time -v` counts it) grows with the
shard size. Here a tensor is read with one `readinto` into a buffer we own, so memory is bounded by the
largest tensor; elementwise jobs (extract, delta/checkpoint merges) go further and read aligned blocks of
BLOCK elements (`aligned_blocks`) into one reused buffer, so no tensor is ever held whole; LoRA terms read
blocks of whole rows (`row_spans`, `read_rows`).

safetensors 0.8's `safe_open(..., backend="pread")` does not map the file, but `get_slice` cuts along the
first axis only (no flat element ranges: a block is whole rows, and one row may exceed BLOCK) and returns
a fresh tensor per slice. Measured with benchmarks/bench_checkpoint.py on the 168M float32 pair, these
reads (benchmarks/pread_readapt.py: the same jobs, header validation ours, data through pread get_tensor /
get_slice) against ours, paired in one round robin, median of 3 on a loaded 2-core machine: peak RSS
0.38-0.39 GB against 0.24-0.25 GB, wall 35-41 s against 9.6-11.3 s (extract, merge --add DELTA, merge
--add INSTRUCT:0.5; outputs identical byte for byte). So the reader stays ours.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from readapt.checkpoint.configs import read_config
from readapt.checkpoint.header import TensorInfo, read_header
from readapt.errors import ReadaptError
from readapt.userfiles import load, open_regular

COPY_BLOCK = 1 << 24  # bytes per block when a stored tensor is copied unchanged
BLOCK = 1 << 20  # elements per float32 work block of an elementwise job (4 MB: stays in cache while checked)
MIN_ROWS = 16  # rows per block of a LoRA term at least (row_spans): see there


@dataclass(frozen=True)
class ReadOptions:
    """How a job reads checkpoints, decided once (by the caller, or from the CLI's --allow-pickle) and passed
    to everything that opens one (`Checkpoint.open`, `Pair.open`, `open_addend`, the jobs).

    allow_pickle: read folders that hold only pickled `pytorch_model*.bin` / `.pt` weights, with
    `torch.load(weights_only=True, mmap=True)`; refused by default (nothing is unpickled unless asked)."""

    allow_pickle: bool = False

    @classmethod
    def of(cls, read: ReadOptions | None, allow_pickle: bool = False) -> ReadOptions:
        """`read`, or else the options the keyword `allow_pickle` of the public functions describes."""
        if read is not None and allow_pickle:
            raise TypeError("pass read=ReadOptions(allow_pickle=True) or allow_pickle=True, not both")
        return read if read is not None else cls(allow_pickle=allow_pickle)


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




def recorded_name(spec: str | os.PathLike) -> str:
    """How an output records a model it was made from: a local folder's absolute path, or the model id
    ("org/name", "org/name@revision") of one found in the Hugging Face cache, so that it resolves from
    any working directory (PEFT's base_model_name_or_path, the delta manifest)."""
    path = Path(spec).expanduser()
    return str(path.absolute()) if path.exists() else str(spec)


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
    def open(cls, spec: str | os.PathLike, read: ReadOptions | None = None, *,
             allow_pickle: bool = False) -> Checkpoint:
        """The checkpoint `spec` (folder or model id), read as `read` says (or `allow_pickle`)."""
        read = ReadOptions.of(read, allow_pickle)
        path = resolve_model(spec)
        config = read_config(path)
        index = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(p for p in path.glob("*.safetensors") if p.name != EXACT_FILE)
        pickles = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if index:
            infos, pickled = _read_index(path, index[0]), False
        elif files:
            infos, pickled = _read_files(path, files), False
        elif pickles and not read.allow_pickle:
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


DELTA_MANIFEST = "readapt_delta.json"  # marks a delta folder (readapt extract)
EXACT_FILE = "readapt_exact.safetensors"  # a float32 delta's round-trip exceptions (readapt.roundtrip), not weights
ADAPTER_CONFIG = "adapter_config.json"  # marks a PEFT adapter folder


def is_delta_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / DELTA_MANIFEST).is_file()


def is_peft_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def open_model(spec: str | os.PathLike, read: ReadOptions | None = None, *, fix: str) -> Checkpoint:
    """A model checkpoint; a PEFT adapter or a delta folder in its place is refused, saying what to do (`fix`)."""
    path = resolve_model(spec)
    if is_peft_folder(path) or is_delta_folder(path):
        what = "a PEFT adapter" if is_peft_folder(path) else "a delta folder"
        raise ReadaptError(f"{spec} is {what}, not a model: {fix}")
    return Checkpoint.open(path, read)


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


def _read_files(path: Path, files: Sequence[Path]) -> dict[str, TensorInfo]:
    """The headers of every safetensors file of a folder without an index; a tensor in two files is refused."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(weight_file(path, f.name)).items():
            if name in infos:
                raise ReadaptError(f"tensor {name!r} is stored twice in {path} ({infos[name].file.name} "
                                   f"and {f.name}); remove the stray file")
            infos[name] = info
    return infos


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


def row_spans(shape: Sequence[int], block: int | None = None) -> list[tuple[int, int]]:
    """Consecutive row ranges [r0, r1) covering a tensor of `shape` (rows: the first dimension), each about
    `block` elements (default BLOCK) and at least MIN_ROWS rows; a shorter tail joins the range before it.

    Why MIN_ROWS: a LoRA term is computed per block as B[rows]·A, and it must equal the rows of the whole
    product B·A bit for bit (PEFT's merge computes it whole). torch's CPU BLAS (MKL) computes each element
    as the same sequential dot product over the rank for any number of rows from 12 up, but takes other
    kernels, with another summation order, for 1-3, 5-7 and 9-11 rows (measured; tests/test_merge.py
    checks the blocked merge against PEFT)."""
    rows = shape[0] if len(shape) else 1
    per_row = math.prod(shape[1:])
    step = max(MIN_ROWS, (block or BLOCK) // max(1, per_row))
    spans = [(r, min(rows, r + step)) for r in range(0, rows, step)] or [(0, 0)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < MIN_ROWS:
        spans[-2:] = [(spans[-2][0], rows)]
    return spans


def read_rows(stored: TensorInfo | torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of a stored tensor (`Checkpoint.stored`: a safetensors location, or a tensor) in a fresh
    buffer the caller owns, in the stored dtype: one seek and one read, the rest of the tensor untouched."""
    if isinstance(stored, torch.Tensor):
        return stored[r0:r1].clone()
    shape, size = stored.shape, stored.dtype.itemsize
    row_bytes = math.prod(shape[1:]) * size
    buf = torch.empty((r1 - r0) * row_bytes, dtype=torch.uint8)
    with open_regular(stored.file) as f:
        f.seek(stored.start + r0 * row_bytes)
        if f.readinto(buf.numpy()) != buf.numel():
            raise ReadaptError(f"{stored.file} was truncated while reading a tensor")
    return buf.view(stored.dtype).view(r1 - r0, *shape[1:])
