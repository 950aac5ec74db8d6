"""Writing checkpoints: safetensors shards streamed one tensor (or one block) at a time.

    write_tensors(folder, plan, ((name, tensor_or_location_or_Blocks), ...))   # shapes known in advance
    write_file(path, ((name, tensor), ...))                                     # shapes known as they come

Why not `safetensors.torch.save_file`? It needs the whole shard in memory. Here each shard's header is
written first from the plan, then each tensor's bytes as they arrive, so memory is one tensor (or one
block of a `Blocks`) whatever the model size. The format is plain safetensors (header.py) and the tests
check that safetensors itself loads what is written.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from readapt.checkpoint.header import DTYPE_CODES, TensorInfo
from readapt.checkpoint.reader import read_blocks
from readapt.errors import ReadaptError
from readapt.numerics import is_finite

Plan = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '2GiB', '1.5GB', or a plain number of bytes (at least 1)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    value = float(m.group(1)) * (1024 if m.group(3) else 1000) ** ("KMGT".find(m.group(2).upper()) + 1 if
                                                                    m.group(2) else 0) if m else math.nan
    if isinstance(size, bool) or not 1 <= value < math.inf:
        raise ReadaptError(f"cannot read size {size!r}: write it like 5GB, 500MB or 1000000 (bytes, at least 1)")
    return int(value)


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


@dataclass
class Blocks:
    """A tensor computed block by block: its dtype and shape, and its elements as consecutive 1-D blocks.
    `write_tensors` writes each block as it comes, so the whole tensor never exists in memory."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    blocks: Iterable[torch.Tensor]


def write_tensors(folder: Path, plan: Plan, tensors: Iterable[tuple[str, torch.Tensor | TensorInfo | Blocks]], *,
                  prefix: str = "model", max_shard_size: int | str = "5GB",
                  metadata: dict[str, str] | None = None, check_finite: bool = True) -> list[Path]:
    """Stream `tensors` (in `plan` order, matching its dtypes and shapes) into safetensors shards.

    One shard -> `{prefix}.safetensors`; several -> `{prefix}-0000i-of-0000n.safetensors` plus
    `{prefix}.safetensors.index.json` (the layout transformers and peft load). Each shard's header is
    written first from the plan, then each tensor's bytes as it arrives: one tensor in memory at a time.
    Nothing is written when the file system lacks the space the plan needs (`need_space`).
    A TensorInfo instead of a tensor (`Checkpoint.stored`) is copied unchanged from its file in 16 MB
    blocks; a `Blocks` is written block by block as it is computed. Non-finite values raise ReadaptError
    naming the tensor (check_finite=False: the caller checked the tensors it computed; copied blocks are
    always checked).
    """
    folder = Path(folder)
    shards = shard_plan(plan, parse_size(max_shard_size))
    names = [f"{prefix}.safetensors"] if len(shards) == 1 else [
        f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    headers = [header_bytes(metadata, shard) for shard in shards]
    need_space(folder, sum(map(len, headers)) + sum(_nbytes(dtype, shape) for _, dtype, shape in plan))
    it = iter(tensors)
    weight_map: dict[str, str] = {}
    for fname, shard, header in zip(names, shards, headers):
        with open(folder / fname, "wb") as f:
            f.write(header)
            for name, dtype, shape in shard:
                _write_tensor(f, name, dtype, shape, next(it), check_finite)
                weight_map[name] = fname
    if len(shards) > 1:
        total = sum(_nbytes(dtype, shape) for _, dtype, shape in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names]


def need_space(folder: Path, nbytes: int) -> None:
    """Refuse, before anything is written, to write `nbytes` (headers and tensors, from the plan) into `folder`
    when its file system has fewer bytes free."""
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        where = folder.parent if folder.name.startswith(".") else folder  # output_folder's temporary sibling
        raise ReadaptError(f"not enough disk space: the output needs {_size_text(nbytes)} but the file system of "
                           f"{where} has {_size_text(free)} free; free space there or write to another disk (-o)")


def _size_text(n: int) -> str:
    units = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("bytes", 1))
    return next(f"{n / d:.3g} {u}" for u, d in units if n >= d or d == 1)


def header_bytes(metadata: dict[str, str] | None, entries: Iterable[tuple[str, torch.dtype, Sequence[int]]]) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file whose tensors follow in `entries` order,
    padded with spaces to a multiple of 8 bytes (as safetensors pads it)."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in entries:
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                  item: tuple[str, torch.Tensor | TensorInfo | Blocks], check_finite: bool) -> None:
    """Write one planned tensor's bytes: a tensor at once, a location block by block, Blocks as they come."""
    got_name, t = item
    if got_name != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"writer expected {name} {dtype} {list(shape)}, got {got_name} "
                           f"{t.dtype} {list(t.shape)}")  # a bug in the job, not user input
    copied = isinstance(t, TensorInfo)
    blocks = read_blocks(t) if copied else t.blocks if isinstance(t, Blocks) else [t.contiguous().view(-1)]
    del item, t  # not held while the producer computes the next tensor
    written = 0
    for block in blocks:
        if (copied or check_finite) and not is_finite(block):
            raise ReadaptError(f"tensor {name!r} has NaN/Inf values; nothing was written. Check the "
                               f"inputs and scales (a NaN in an input tensor propagates).")
        f.write(block.view(torch.uint8).numpy().data)
        written += block.numel() * block.element_size()
    if written != _nbytes(dtype, shape):
        raise RuntimeError(f"writer got {written} bytes for {name}, expected {_nbytes(dtype, shape)}")


def write_file(path: Path, tensors: Iterable[tuple[str, torch.Tensor]],
               metadata: dict[str, str] | None = None) -> Path:
    """Stream tensors whose shapes are not known in advance into one safetensors file.

    Data goes to a spool file first (one tensor in memory at a time); the header is then written and
    the spool copied after it in chunks. Used for adapters, whose ranks are known only after each SVD.
    """
    path = Path(path)
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    spool = path.with_name(path.name + ".spool")
    with open(spool, "wb") as f:
        for name, t in tensors:
            if not is_finite(t):
                raise ReadaptError(f"tensor {name!r} has NaN/Inf values; nothing was written")
            entries.append((name, t.dtype, tuple(t.shape)))
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
            del t  # not held while the producer computes the next tensor
    with open(path, "wb") as out, open(spool, "rb") as src:
        out.write(header_bytes(metadata, entries))
        shutil.copyfileobj(src, out, 1 << 24)
    spool.unlink()
    return path
