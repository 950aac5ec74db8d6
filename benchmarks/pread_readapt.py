"""`readapt` with tensor data read through `safetensors.safe_open(..., backend="pread")` instead of
readapt.checkpoint.reader's own reads: the other side of the reader comparison in benchmarks/README.md.

    python benchmarks/pread_readapt.py extract BASE TUNED -o OUT     # any readapt command line
    python benchmarks/bench_checkpoint.py --readapt pread="python benchmarks/pread_readapt.py"

Header parsing and validation stay readapt's (read_header); only the data reads change:
`Checkpoint.read(name)` is `safe_open(file, "pt", backend="pread").get_tensor(name)` and `read_blocks` of a
safetensors location reads rows through `get_slice(name)[r0:r1]` (safetensors has no flat element range),
about the same bytes per block as readapt's BLOCK-element reads. Handles stay open for the whole job."""

from __future__ import annotations

import sys
from functools import lru_cache

import torch
from safetensors import safe_open

from readapt.checkpoint import pair, reader, writer
from readapt.checkpoint.header import read_header


@lru_cache(maxsize=None)
def handle(file):
    return safe_open(str(file), "pt", backend="pread")


@lru_cache(maxsize=None)
def names(file) -> dict[int, str]:
    return {info.start: name for name, info in read_header(file).items()}


def read(self, name: str) -> torch.Tensor:
    info = self.infos[name]
    if self.pickled:
        return self._read_pickled(name, info)
    return handle(info.file).get_tensor(name)


def read_blocks(stored, nbytes=None):
    if isinstance(stored, torch.Tensor):
        yield from ORIGINAL(stored, nbytes)
        return
    nbytes = nbytes or reader.COPY_BLOCK
    sl = handle(stored.file).get_slice(names(stored.file)[stored.start])
    shape = stored.shape or (1,)
    row = max(1, (stored.end - stored.start) // max(1, shape[0]))  # bytes per first-axis row
    step = max(1, nbytes // row)
    for r0 in range(0, shape[0], step):
        yield sl[r0: min(shape[0], r0 + step)].reshape(-1)


ORIGINAL = reader.read_blocks
reader.Checkpoint.read = read
reader.read_blocks = writer.read_blocks = pair.read_blocks = read_blocks

if __name__ == "__main__":
    from readapt.cli import main

    sys.exit(main(sys.argv[1:]))
