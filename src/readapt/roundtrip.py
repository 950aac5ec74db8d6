"""The round-trip exceptions of a float32 delta: where Φ + Δ ≠ Θ bit for bit, Θ's values, in their own file.

For almost every element fp32(Θ) − fp32(Φ) is exact; where it is not (a weight tuned to nearly zero,
|Θ| < 2^-16·|Φ|), extract records the element's flat index and Θ's value so that merge can give Θ back:

    readapt_exact.safetensors     index:{name}  int64 [e]   flat indices into {name}, strictly increasing
                                  tuned:{name}  float32 [e] Θ[name].flatten()[index], as float32

A file, not JSON in the manifest: the count is unbounded (tuned = base·1e-6 makes every element one),
and both sides stream. `ExceptionLog` spools each block's exceptions to two files as extract finds them and
writes the safetensors file at the end (memory: one block); `Exceptions` hands them back in index order,
`upto(end)` for merge's consecutive blocks, `blocks()` for a whole tensor (memory: one block of each).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from readapt.checkpoint import EXACT_FILE, TensorInfo, aligned_blocks, read_header
from readapt.checkpoint.writer import header_bytes
from readapt.errors import ReadaptError


class ExceptionLog:
    """Collects (flat index, tuned value) pairs tensor by tensor, block by block, in two spool files inside
    `folder` (an output's temporary folder); `write()` makes readapt_exact.safetensors from them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.counts: dict[str, int] = {}  # tensor name -> exceptions, in the order they were added
        self._spools = [folder / ".exact-index.spool", folder / ".exact-tuned.spool"]
        self._files = [open(p, "wb") for p in self._spools]

    def add(self, name: str, index: torch.Tensor, tuned: torch.Tensor) -> None:
        """Append one block's exceptions of `name` (indices increasing, after any added before for it)."""
        self.counts[name] = self.counts.get(name, 0) + len(index)
        self._files[0].write(index.to(torch.int64).numpy().tobytes())
        self._files[1].write(tuned.to(torch.float32).numpy().tobytes())

    def write(self) -> int:
        """Write EXACT_FILE (nothing when there are no exceptions), remove the spools; returns the count.
        Layout: every index:{name} in order, then every tuned:{name}: each spool copied once, in chunks."""
        for f in self._files:
            f.close()
        total = sum(self.counts.values())
        if total:
            entries = [(f"{kind}:{n}", dtype, (c,)) for kind, dtype in (("index", torch.int64),
                                                                         ("tuned", torch.float32))
                       for n, c in self.counts.items()]
            with open(self.folder / EXACT_FILE, "wb") as out:
                out.write(header_bytes({"readapt": "exact"}, entries))
                for spool in self._spools:
                    with open(spool, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 24)
        for spool in self._spools:
            spool.unlink()
        return total


class Exceptions:
    """The recorded exceptions of one tensor of `numel` elements, read in index order and checked as they
    come (int64 indices strictly increasing within [0, numel), one float32 value each); `where` names the
    source in errors."""

    def __init__(self, index: TensorInfo | torch.Tensor, tuned: TensorInfo | torch.Tensor, numel: int, where: str):
        if index.dtype != torch.int64 or tuned.dtype != torch.float32 or index.shape != tuned.shape \
                or len(index.shape) != 1:
            raise ReadaptError(f"{where} is corrupt: expected int64 indices and float32 values of one length")
        self._it, self._numel, self._where = aligned_blocks(index, tuned), numel, where
        self._last = -1
        self._idx, self._val = torch.empty(0, dtype=torch.long), torch.empty(0)
        self._pending = self.blocks()  # what `upto` has not read yet

    def blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices, tuned values) one block at a time, checked, in index order."""
        for idx, val in self._it:
            if len(idx) and (int(idx[0]) <= self._last or int(idx[-1]) >= self._numel
                             or (len(idx) > 1 and not bool((idx[1:] > idx[:-1]).all()))):
                raise ReadaptError(f"{self._where} is corrupt: indices must increase within [0, {self._numel})")
            self._last = int(idx[-1]) if len(idx) else self._last
            yield idx.clone(), val.clone()  # the reader reuses its buffers

    def upto(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The not yet taken exceptions with index < `end` (merge's blocks come in order)."""
        while (not len(self._idx) or int(self._idx[-1]) < end) and (nxt := next(self._pending, None)):
            self._idx, self._val = torch.cat([self._idx, nxt[0]]), torch.cat([self._val, nxt[1]])
        k = int(torch.searchsorted(self._idx, end))
        taken = self._idx[:k], self._val[:k]
        self._idx, self._val = self._idx[k:], self._val[k:]
        return taken


def open_exceptions(folder: Path, manifest: dict, name: str, numel: int) -> Exceptions | None:
    """The exceptions of tensor `name` of the delta folder `folder`, or None when it has none. Delta folders
    written by readapt ≤ 0.2 hold them as lists in the manifest (`exact.tensors[name]` = {index, tuned})."""
    entry = (manifest.get("exact") or {}).get("tensors") or {}
    if name not in entry:
        return None
    where = f"{folder / EXACT_FILE} ({name})"
    if isinstance(entry[name], dict):  # the manifest's lists (older delta folders)
        try:
            idx = torch.tensor(entry[name]["index"], dtype=torch.long)
            val = torch.tensor(entry[name]["tuned"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError):
            raise ReadaptError(f"{folder / 'readapt_delta.json'}: the `exact` entry of {name!r} is corrupt") from None
        return Exceptions(idx.view(-1), val.view(-1), numel, f"the `exact` entry of {name!r} in {folder}")
    infos = read_header(folder / EXACT_FILE) if (folder / EXACT_FILE).is_file() else {}
    if f"index:{name}" not in infos or f"tuned:{name}" not in infos:
        raise ReadaptError(f"{where} is missing: the manifest records exceptions for {name!r}; re-run extract")
    return Exceptions(infos[f"index:{name}"], infos[f"tuned:{name}"], numel, where)
