"""Numbers and where they are computed: the dtypes readapt computes in and writes, their precision, the
devices it runs on, and the one finiteness check every job uses.

    parse_dtype("bf16") -> torch.bfloat16      (--dtype: float32, bfloat16, float16, float64 only)
    precision(torch.bfloat16) -> 8             (significand bits: which of two dtypes holds more)
    parse_device("cuda:1") -> torch.device     (--device, refused unless torch can use it here)
    is_finite(t)                               (no NaN/Inf, cheaply)
    with one_thread(): ...                     (small CPU ops on one thread)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from readapt.errors import ReadaptError

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


def parse_device(device: str | None, default: str = "cpu") -> torch.device:
    """'cpu', 'cuda', 'cuda:1', 'mps'... -> torch.device, refused unless torch can use it here (a one-line
    error instead of torch's AssertionError inside `.to()`). `default` stands in for None: "cpu" (LoRE's
    SVDs) or "auto", a CUDA GPU when torch sees one, else the CPU (generation)."""
    if default == "auto":
        default = "cuda" if torch.cuda.is_available() else "cpu"
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


def precision(dtype: torch.dtype) -> int:
    """Significand bits of a float dtype (bfloat16 8, float16 11, float32 24): which of two holds more."""
    return round(-math.log2(torch.finfo(dtype).eps)) + 1


def is_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`. A float32 sum is ~40x faster than isfinite().all() on CPU and is finite
    whenever every element is, unless it overflows: only then is the exact check run."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


@contextmanager
def one_thread(device: torch.device | None = None, small: bool = True) -> Iterator[None]:
    """Run a stretch of small CPU ops on one thread: thread hand-offs cost more than they save there, the
    more so on a busy machine (measured 5-10× faster for LoRE's small factorizations on a busy 2-core
    machine; 5-8× less CPU for LoRA terms in blocks of rows, merging.py). No-op off the CPU or if not small."""
    if (device is not None and device.type != "cpu") or not small:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
