"""The `readapt` command: a table from each subcommand to the public function it calls (COMMANDS).

    readapt extract BASE TUNED -o D         readapt.delta.extract
    readapt extract ... --tau 0.5           readapt.lowrank.extract_lowrank   (the row "extract --tau", see `row`)
    readapt compress / spectrum             readapt.lowrank.compress, readapt.spectra.spectrum
    readapt merge / port / train            readapt.merging.merge, readapt.porting.port, readapt.training.train
    readapt merge ... --as-lora             readapt.folding.fold                 (the row "merge --as-lora")
    readapt eval / sweep / score            readapt.evaluation.evaluate / sweep / score
    readapt demo                            readapt.demoworld.demo
    readapt demo --capacity-sweep           readapt.demoworld.capacity_sweep      (the row "demo --capacity-sweep")

A row holds the function, its --help line, the declaration of its flags (readapt.flags) and the function
that turns the parsed flags into the call. `train`'s flags are TrainSettings' fields; --allow-pickle makes the
job's ReadOptions. Errors of type ReadaptError print one line and exit 2; Ctrl-C exits 130 with no output left.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import readapt.flags as flags
from readapt._version import __version__
from readapt.cards import fold_summary, interference_summary, lore_summary, port_summary
from readapt.delta import extract
from readapt.demoworld import capacity_sweep, demo
from readapt.errors import ReadaptError, os_error
from readapt.evaluation import evaluate, score, sweep
from readapt.flags import policy, qa_kwargs, read_options, train_settings
from readapt.folding import fold
from readapt.interference import INTERFERENCE_FILE
from readapt.loreplan import Policy
from readapt.lowrank import compress, extract_lowrank
from readapt.merging import merge
from readapt.porting import port
from readapt.spectra import spectrum
from readapt.training import train


@dataclass(frozen=True)
class Command:
    """One subcommand: the public function it calls, its --help line, the declaration of its flags (None: the
    row shares another row's parser) and `call(function, args)`, which calls it with the parsed flags."""

    function: Callable
    help: str
    flags: Callable[[argparse.ArgumentParser], None] | None
    call: Callable[[Callable, argparse.Namespace], int | None]
    description: str | None = None


# --- how the parsed flags become the call --------------------------------------------------------------


def _extract(fn, a):
    if a.calibration is not None:
        raise ReadaptError("--calibration measures a LoRE adapter: give --tau or --rank with it")
    return _wrote(fn(a.base, a.tuned, a.output, dtype=a.dtype, skip_missing=a.skip_missing, overwrite=a.overwrite,
                     max_shard_size=a.max_shard_size, read=read_options(a)))


def _extract_lowrank(fn, a):
    print(lore_summary(fn(a.base, a.tuned, a.output, tau=a.tau, rank=a.rank, svd=a.svd, device=a.device,
                          dtype=a.dtype, policy=policy(a), skip_missing=a.skip_missing, overwrite=a.overwrite,
                          calibration=a.calibration, read=read_options(a))))


def _merge(fn, a):
    if not a.add:
        raise ReadaptError("merge needs at least one --add ADAPTER[:SCALE]")
    given = [f for f, v in (("--rank", a.rank), ("--tau", a.tau), ("--calibration", a.calibration),
                            ("--svd", None if a.svd == "auto" else a.svd), ("--device", a.device)) if v is not None]
    given += [f"--{k.replace('_', '-')}" for k, v in vars(policy(a)).items() if v != getattr(Policy(), k)]
    if given:
        raise ReadaptError(f"{given[0]} applies to a merge written as one LoRA: add --as-lora")
    out = fn(a.base, a.output, a.add, dtype=a.dtype, skip_missing=a.skip_missing, overwrite=a.overwrite,
             max_shard_size=a.max_shard_size, read=read_options(a), whole_tensors=a.whole_tensors)
    if (out / INTERFERENCE_FILE).is_file():
        print(interference_summary(json.loads((out / INTERFERENCE_FILE).read_text())))
    return _wrote(out)


def _fold(fn, a):
    if not a.add:
        raise ReadaptError("merge --as-lora needs at least one --add ADAPTER[:SCALE]")
    print(fold_summary(fn(a.base, a.output, a.add, rank=a.rank, tau=a.tau, svd=a.svd, device=a.device,
                          policy=policy(a), dtype=a.dtype, calibration=a.calibration, skip_missing=a.skip_missing,
                          overwrite=a.overwrite, read=read_options(a))))


def _compress(fn, a):
    print(lore_summary(fn(a.delta, a.output, tau=a.tau, rank=a.rank, svd=a.svd, device=a.device, base=a.base,
                          dtype=a.dtype, policy=policy(a), overwrite=a.overwrite, calibration=a.calibration,
                          read=read_options(a))))


def _spectrum(fn, a):
    try:
        layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    except ValueError:
        raise ReadaptError(f"--layers {a.layers!r}: give comma-separated layer numbers, e.g. 0,15,31") from None
    print(lore_summary(fn(a.source, a.tuned, a.output, tau=a.tau, svd="gram" if a.svd == "auto" else a.svd,
                          device=a.device, policy=policy(a), layers=layers, skip_missing=a.skip_missing,
                          overwrite=a.overwrite, read=read_options(a))))


def _port(fn, a):
    if a.output is None and not a.dry_run:
        raise ReadaptError("port needs -o OUTPUT (or --dry-run to print the report only)")
    report = fn(a.patch, a.to, None if a.dry_run else a.output, from_=a.from_, merge=a.merge, strict=a.strict,
                overwrite=a.overwrite, dtype=a.dtype, max_shard_size=a.max_shard_size, read=read_options(a),
                whole_tensors=a.whole_tensors)
    print(port_summary(report))
    if a.dry_run:
        print("  dry run: nothing written" + (f" (-o {a.output} ignored)" if a.output else ""))


def _train(fn, a):
    fn(a.base, a.data, a.output, eval_data=a.eval_data, overwrite=a.overwrite, settings=train_settings(a))


def _wrote(folder) -> int:
    """Tell the user what a job wrote: the folder, its files and size."""
    files = [f for f in Path(folder).iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    unit, div = next((u, d) for u, d in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("bytes", 1)) if size >= d or d == 1)
    print(f"wrote {folder} ({len(files)} files, {size / div:.3g} {unit})")
    return 0


def _capacity_sweep(fn, a):
    if a.quick:
        raise ReadaptError("demo --capacity-sweep and --quick do not go together: the sweep is of the full world")
    fn(a.output or "readapt-capacity", seeds=a.seeds, cache_dir=a.cache_dir, overwrite=a.overwrite)


# --- the table ------------------------------------------------------------------------------------------

_TRAIN_DESCRIPTION = (
    "Next-token prediction on unlabeled text, packed into max-length blocks with EOS between documents. Defaults "
    "are the RE-Adapt paper's (all linear layers, r=64, alpha=128, dropout 0.05, DoRA, batch 20, AdamW lr 2e-4, "
    "linear schedule). Several GPUs: `accelerate launch -m readapt train ...`.")
_PORT_DESCRIPTION = (
    "Retarget PATCH (a PEFT LoRA/DoRA adapter or a delta folder made on the old version) to NEW_BASE, or with "
    "--merge write NEW_BASE + PATCH as a model folder. Prints (and writes as port_report.json) what was carried, "
    "adjusted (vocabulary rows matched by the text each token stands for, DoRA magnitudes) or skipped, and why.")

COMMANDS: dict[str, Command] = {
    "extract": Command(extract, "RE-Adapter: delta = TUNED - BASE, streamed tensor by tensor", flags.extract_flags,
                       _extract),
    "extract --tau": Command(extract_lowrank, "LoRE-Adapter: extract with --tau or --rank", None, _extract_lowrank),
    "merge": Command(merge, "write BASE + sum(scale_i * adapter_i) as a Hugging Face model folder (--as-lora: as one "
                     "PEFT LoRA on BASE)", flags.merge_flags, _merge),
    "merge --as-lora": Command(fold, "fold: merge with --as-lora", None, _fold),
    "compress": Command(compress, "LoRE-Adapter: low-rank PEFT LoRA from a delta folder (by --tau or --rank)",
                        flags.compress_flags, _compress),
    "spectrum": Command(spectrum, "singular-value report of a delta: rank at tau, energy, plots (PNG+JSON)",
                        flags.spectrum_flags, _spectrum),
    "port": Command(port, "PortLLM: carry a LoRA/DoRA adapter or delta made on an old model version to a new version",
                    flags.port_flags, _port, _PORT_DESCRIPTION),
    "train": Command(train, "train a knowledge adapter (LoRA/DoRA) on the pretrained BASE with unlabeled text",
                     flags.train_flags, _train, _TRAIN_DESCRIPTION),
    "eval": Command(evaluate, "QA accuracy (RE-Adapt protocol): closed book, BM25 or oracle passage", flags.eval_flags,
                    lambda fn, a: fn(a.model, a.questions, a.output, adds=a.add, **qa_kwargs(a))),
    "sweep": Command(sweep, "partial adaptation grid: BASE + alpha*ADAPTER1 (+ beta*ADAPTER2), scored",
                     flags.sweep_flags, lambda fn, a: fn(a.base, a.add, a.questions, a.output, grid=a.grid,
                                                         val_fraction=a.val_fraction, seed=a.seed, select=a.select,
                                                         **qa_kwargs(a))),
    "score": Command(score, "score answers generated elsewhere: Rouge-L recall and contains-EM", flags.score_flags,
                     lambda fn, a: fn(a.predictions, a.output, metrics=a.metrics, overwrite=a.overwrite)),
    "demo": Command(demo, "both papers' experiments end to end in a synthetic world, on a CPU in minutes",
                    flags.demo_flags, lambda fn, a: fn(a.output or "readapt-demo", quick=a.quick, seeds=a.seeds,
                                                       cache_dir=a.cache_dir, overwrite=a.overwrite)),
    "demo --capacity-sweep": Command(capacity_sweep, "demo: closed-book experiments at three model sizes", None,
                                     _capacity_sweep),
}


def row(args: argparse.Namespace) -> str:
    """The row of COMMANDS that runs: `extract` with --tau or --rank is LoRE-Adapt (extract_lowrank), `merge`
    with --as-lora is the fold (readapt.folding.fold), `demo` with --capacity-sweep is capacity_sweep."""
    if args.command == "extract" and (args.tau is not None or args.rank is not None):
        return "extract --tau"
    if args.command == "merge" and args.as_lora:
        return "merge --as-lora"
    if args.command == "demo" and args.capacity_sweep:
        return "demo --capacity-sweep"
    return args.command


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage first), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """One subparser per row of COMMANDS that declares flags, in the table's order."""
    parser = _Parser(
        prog="readapt",
        description="Weight arithmetic for open LLMs: RE-Adapt, LoRE-Adapt, partial adaptation, PortLLM.",
    )
    parser.add_argument("--version", action="version", version=f"readapt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, command in COMMANDS.items():
        if command.flags is not None:
            command.flags(sub.add_parser(name, help=command.help, description=command.description))
    return parser


def _terminate(signum, frame):  # SIGTERM, SIGHUP, SIGQUIT behave like Ctrl-C: unwind, remove temporary output
    raise KeyboardInterrupt


_STOPS = [getattr(signal, s) for s in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, s)]


def _one_line(text) -> str:
    """A message as one line: newlines that came with user text (a tensor or file name) are escaped."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def _show_warning(message, category, filename, lineno, file=None, line=None):  # one line, no source dump
    print(f"readapt: warning: {_one_line(message)}", file=sys.stderr)


STREAMING = ("extract", "merge", "compress", "spectrum", "port")  # checkpoint jobs: one tensor at a time


def _return_freed_buffers() -> None:
    """glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), after which
    tensor-sized buffers come from heaps that are not given back: a streaming job's RSS then creeps up by
    tens of MB. Fixing the threshold at 1 MiB (as MALLOC_MMAP_THRESHOLD_=1048576 would) maps every
    tensor buffer on its own and unmaps it when freed. Cost: a page fault per fresh buffer page (merge: no
    change within noise; port at 168M: ~0.5 s on 1.1 s); see benchmarks/README.md."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _offline() -> None:
    """readapt never downloads: every Hugging Face lookup of the process is local (HF_HUB_OFFLINE), also
    huggingface_hub's own side requests (it fetches a registry for its user-agent even when a call passes
    local_files_only=True, as every lookup in readapt does)."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # already imported: it read the variable then
        hub.HF_HUB_OFFLINE = True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _offline()
    if args.command in STREAMING:
        _return_freed_buffers()
    for sig in _STOPS:  # a dropped ssh session (SIGHUP) or a kill cleans up as Ctrl-C does
        signal.signal(sig, _terminate)
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=FutureWarning)  # dependencies' deprecation chatter
    command = COMMANDS[row(args)]
    try:
        result = command.call(command.function, args)
    except ReadaptError as err:
        print(f"readapt {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"readapt {args.command}: interrupted; the output folder was not written", file=sys.stderr)
        return 130
    except OSError as err:  # the last resort: outputs map their own (checkpoint.output_folder)
        print(f"readapt {args.command}: error: {_one_line(os_error(err))}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
