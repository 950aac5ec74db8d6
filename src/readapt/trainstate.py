"""A training run's checkpoint folder: what it holds, how it is saved and resumed, and what may be deleted.

OUT.partial/ (or `checkpoint_dir`) while training; it survives an interruption and is deleted on success:

    run.json             the run's settings and "format": "readapt-train-checkpoint", which marks the
                         folder as readapt's (a resumed run must have the same settings)
    training_log.jsonl   one record per step (and the held-out losses)
    step-NNNNNN/         the latest checkpoint: trainable tensors, optimizer, scheduler, the RNG state of
                         every process, counters (written to .step-NNNNNN.tmp, then renamed)

Only a new or empty folder, or one so marked, is used; only these files are ever deleted, and the folder
itself only if readapt made it and nothing else is left in it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from readapt.errors import ReadaptError


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters training changes (the adapter's), by name."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


CHECKPOINT_FORMAT = "readapt-train-checkpoint"  # run.json's "format": this folder is readapt's
_OWN_FILES = re.compile(r"training_log\.jsonl|\.?step-\d{6}(\.tmp)?")  # and run.json, removed last


def run_json(ckpt_dir: Path) -> dict | None:
    """run.json of a checkpoint folder made by readapt train; None for any other folder (or none)."""
    try:
        run = json.loads((ckpt_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and run.get("format") == CHECKPOINT_FORMAT else None


def check_checkpoint_dir(ckpt_dir: Path, out: Path, inputs: Sequence[Path]) -> None:
    """Refuse a checkpoint folder that is, holds or lies inside the output or an input, or that exists,
    is not empty and was not made by readapt train: those are the user's files, never to be deleted."""
    here = ckpt_dir.resolve()
    for role, other in [("the output", out)] + [("the input", p) for p in inputs]:
        other = Path(other).expanduser().resolve()
        if here == other or other in here.parents or here in other.parents:
            raise ReadaptError(f"the checkpoint folder {ckpt_dir} overlaps {role} {other} (the same folder, or one "
                               f"inside the other); choose another --checkpoint-dir (nothing was touched)")
    if ckpt_dir.exists() and not (ckpt_dir.is_dir() and (run_json(ckpt_dir) or not any(ckpt_dir.iterdir()))):
        raise ReadaptError(f"the checkpoint folder {ckpt_dir} exists and was not made by readapt train (no run.json "
                           f"of ours); choose a new or empty --checkpoint-dir (nothing was touched)")


def remove_checkpoints(ckpt_dir: Path) -> None:
    """Delete what readapt train wrote in its checkpoint folder (run.json last: it marks the folder), then the
    folder if readapt made it and nothing else is in it. Files someone else put there stay."""
    run = run_json(ckpt_dir)
    if run is None:
        return
    for p in ckpt_dir.iterdir():
        if _OWN_FILES.fullmatch(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (ckpt_dir / "run.json").unlink()
    if run.get("created_folder"):
        try:
            ckpt_dir.rmdir()
        except OSError:  # not empty: someone else's files are in it
            pass


@contextmanager
def discard_unless_resumable(ckpt_dir: Path, main: bool):
    """On any failure, delete the checkpoints (_remove_checkpoints) if there is none to resume from."""
    try:
        yield
    except BaseException:
        if main and latest(ckpt_dir) is None:
            remove_checkpoints(ckpt_dir)
        raise


def latest(ckpt_dir: Path) -> Path | None:
    """The newest step-NNNNNN checkpoint in the folder, or None."""
    found = sorted(ckpt_dir.glob("step-[0-9]*")) if ckpt_dir.is_dir() else []
    return found[-1] if found else None


def save_checkpoint(acc, ckpt_dir: Path, step: int, model, optimizer, scheduler, counters: dict) -> None:
    """Write ckpt_dir/step-NNNNNN atomically (temporary folder, then rename) and delete older ones."""
    from safetensors.torch import save_file

    final, tmp = ckpt_dir / f"step-{step:06d}", ckpt_dir / f".step-{step:06d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({n: p.detach().contiguous().cpu() for n, p in trainable(acc.unwrap_model(model))},
                  tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(counters) + "\n")
    acc.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-{acc.process_index}.pt")  # dropout masks: one RNG per process
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp.rename(final)
        for old in ckpt_dir.glob("step-[0-9]*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def load_checkpoint(acc, path: Path, model, optimizer, scheduler) -> dict:
    """Restore trainable tensors, optimizer, scheduler and this process's RNG from `path`; the counters."""
    from safetensors.torch import load_file

    saved = load_file(path / "trainable.safetensors")
    params = dict(trainable(acc.unwrap_model(model)))
    if set(saved) != set(params):
        raise ReadaptError(f"checkpoint {path} holds other tensors than this model trains; "
                           f"start over with --overwrite")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng-{acc.process_index}.pt"
    if rng_file.exists():  # absent when resuming with more processes than before
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "state.json").read_text())


def start_run(ckpt_dir: Path, record: dict, resume: bool, overwrite: bool, acc) -> Path | None:
    """Prepare the checkpoint folder for a run whose run.json records `record`: the checkpoint to resume from
    (resume=True and one exists: its run.json must record the same settings), or None for a fresh start,
    which removes readapt's files of an earlier run (an interrupted run's checkpoints only with overwrite)
    and writes run.json."""
    found = latest(ckpt_dir)
    if found and not resume and not overwrite:
        raise ReadaptError(f"an interrupted run left checkpoints in {ckpt_dir}: pass --resume to continue it, "
                           f"or --overwrite to start over")
    if resume and found:
        saved = run_json(ckpt_dir) or {}
        changed = [k for k in record if saved.get(k) != record[k]]
        if changed:
            raise ReadaptError(f"cannot resume from {found}: these settings differ from the interrupted run: "
                               + ", ".join(f"{k} {saved.get(k)!r} -> {record[k]!r}" for k in changed)
                               + "; use the same ones, or --overwrite to start over")
    else:
        found = None
    acc.wait_for_everyone()
    if acc.is_main_process and found is None:  # a fresh start: readapt's files of an earlier run go, nothing else
        created = (run_json(ckpt_dir) or {}).get("created_folder", not ckpt_dir.exists())
        remove_checkpoints(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        run = {"format": CHECKPOINT_FORMAT, "created_folder": created, **record}
        (ckpt_dir / "run.json").write_text(json.dumps(run, indent=2, allow_nan=False) + "\n")
    acc.wait_for_everyone()
    return found
