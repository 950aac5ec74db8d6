"""The safetensors format: dtype codes, and the header parsed and validated exactly as safetensors does.

    8 bytes   N, little-endian u64 (at most MAX_HEADER)
    N bytes   UTF-8 JSON: {name: {"dtype", "shape", "data_offsets"}, ..., "__metadata__": {str: str}}
    the rest  the tensors' raw little-endian data, tiled by their data_offsets

`read_header` turns one file's header into a `TensorInfo` per tensor (file, dtype, shape, absolute byte
range); the reader (reader.py) reads tensor data from those ranges, the writer (writer.py) writes the same
format back.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from readapt.errors import ReadaptError
from readapt.userfiles import members, open_regular

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


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

