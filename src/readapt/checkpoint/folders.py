"""Output folders: every job writes into a temporary sibling that is renamed to the output only when
everything succeeded, so nothing half-written is ever left at `-o`.

    out = check_output(path, overwrite, inputs=[...])    # the early check, before any long work
    with output_folder(path, overwrite, inputs=[...]) as tmp:
        ...write into tmp...                             # renamed to `path` on success, removed on failure

Also what output folders are filled with besides weights: the side files of a model folder (config,
tokenizer, chat template) and the progress bars jobs show while they write.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from readapt.checkpoint.reader import hub_repo
from readapt.errors import ReadaptError, os_error

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


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

