"""The `readapt` command: a thin argparse layer over the typed functions of the package.

Each subcommand has one `_add_<name>(sub)` section below that declares its flags and calls exactly one
public function. Heavy imports (torch, transformers) happen inside the handlers, so `readapt --help`
is fast. Errors of type ReadaptError print one line and exit 2; Ctrl-C exits 130 with no output left.
"""

from __future__ import annotations

import argparse
import signal
import sys

from readapt import __version__
from readapt.errors import ReadaptError


def _scale_spec(text: str) -> tuple[str, float]:
    """'PATH[:SCALE]' -> (PATH, SCALE); the scale defaults to 1.0 and may be any real number."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _common_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _common_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickled .bin/.pt weights (with torch.load(weights_only=True)); refused by default",
    )


# --- extract / merge (checkpoint engine) -------------------------------------------------------------


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="RE-Adapter: delta = TUNED - BASE, streamed tensor by tensor")
    p.add_argument("base", help="pretrained checkpoint: folder or model id in the local HF cache")
    p.add_argument("tuned", help="fine-tuned (e.g. instruct) checkpoint of the same architecture")
    _common_output(p)
    _common_inputs(p)
    p.add_argument("--dtype", default=None, help="delta dtype (default float32: exact round trip)")
    p.add_argument("--skip-missing", action="store_true", help="skip tensors present on one side only")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (e.g. 5GB, 500MB)")

    def run(a):
        from readapt.delta import extract

        extract(
            a.base, a.tuned, a.output, dtype=a.dtype, skip_missing=a.skip_missing, overwrite=a.overwrite,
            max_shard_size=a.max_shard_size, allow_pickle=a.allow_pickle,
        )

    p.set_defaults(func=run)


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="write BASE + sum(scale_i * adapter_i) as a Hugging Face model folder")
    p.add_argument("base", help="base checkpoint: folder or model id in the local HF cache")
    p.add_argument(
        "--add", action="append", default=[], type=_scale_spec, metavar="ADAPTER[:SCALE]",
        help="delta folder, PEFT LoRA/DoRA folder or full checkpoint (its difference from BASE); "
        "scale defaults to 1.0, negative subtracts; repeat for several",
    )
    _common_output(p)
    _common_inputs(p)
    p.add_argument("--dtype", default=None, help="output dtype (default: the base checkpoint's)")
    p.add_argument("--skip-missing", action="store_true", help="for full-checkpoint adapters: skip one-sided tensors")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (e.g. 5GB, 500MB)")

    def run(a):
        from readapt.merge import merge

        if not a.add:
            raise ReadaptError("merge needs at least one --add ADAPTER[:SCALE]")
        merge(
            a.base, a.output, a.add, dtype=a.dtype, skip_missing=a.skip_missing, overwrite=a.overwrite,
            max_shard_size=a.max_shard_size, allow_pickle=a.allow_pickle,
        )

    p.set_defaults(func=run)


# --- compress / spectrum (LoRE-Adapt, issue 3) -------------------------------------------------------


def _add_lowrank(sub) -> None:
    pass


# --- port (PortLLM, issue 5) ---------------------------------------------------------------------------


def _add_port(sub) -> None:
    pass


# --- train (knowledge adapters, issue 4) ---------------------------------------------------------------


def _add_train(sub) -> None:
    pass


# --- eval / sweep / score (evaluation, issue 6) ---------------------------------------------------------


def _add_eval(sub) -> None:
    pass


# --- demo (the demo world, issue 7) --------------------------------------------------------------------


def _add_demo(sub) -> None:
    pass


_SECTIONS = (_add_extract, _add_merge, _add_lowrank, _add_port, _add_train, _add_eval, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="readapt",
        description="Weight arithmetic for open LLMs: RE-Adapt, LoRE-Adapt, partial adaptation, PortLLM.",
    )
    parser.add_argument("--version", action="version", version=f"readapt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _SECTIONS:
        add(sub)
    return parser


def _terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: unwind, remove temporary output
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = args.func(args)
    except ReadaptError as err:
        print(f"readapt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"readapt {args.command}: interrupted; no output folder was left behind", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
